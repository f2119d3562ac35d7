"""Backbones: torchvision ResNet-family networks, their weights, and their φ blocks.

* :func:`load_backbone` builds a network by name and loads its weights from a
  torchvision enum name (``IMAGENET1K_V1`` = the paper's "ResNet #1",
  ``IMAGENET1K_V2`` = "ResNet #2", ``DEFAULT``), a local state_dict file, or
  ``none`` (a deterministic random initialisation). Enum weights come through
  torchvision's own loader and cache folder; when they cannot be had the error
  names the file and the folder to put it in.
* :func:`phi_block_names` finds the φ blocks structurally: the residual blocks
  after the last resolution change (the last stage), whatever the depth.
* :class:`PooledBlockFeatures` returns the average-pooled outputs of the chosen
  blocks as one ``(batch, K, D)`` tensor, pooled on the model's device.

Edge cases: every load is strict; a local file may be a bare state_dict or a
dict with a ``state_dict`` entry (linft's checkpoint format), and its
classifier size is taken from the file, since only the features are used.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from linft.errors import LinftError

#: Other names for the torchvision weights the paper uses.
WEIGHT_ALIASES = {"IMAGENET1K_V1": "ResNet #1", "IMAGENET1K_V2": "ResNet #2"}

#: Seed of the random initialisation used for ``weights="none"``, so that the
#: same command always builds the same network (and its cache can resume).
NONE_WEIGHTS_SEED = 0

# Backbones that are not torchvision models (the demo's small ResNet is registered
# here by its own module): name -> (builder(num_classes) -> nn.Module, default weights).
_EXTRA_BACKBONES: dict[str, tuple[Callable[[int], nn.Module], str]] = {}


def register_backbone(name: str, builder: Callable[[int], nn.Module], default_weights: str = "none") -> None:
    """Make a torchvision-style ResNet builder available to :func:`load_backbone` under ``name``."""
    _EXTRA_BACKBONES[name] = (builder, default_weights)


def resnet_family_names() -> list[str]:
    """The torchvision classification models of the ResNet family (resnet*, resnext*, wide_resnet*)."""
    names = torchvision.models.list_models(module=torchvision.models)
    torchvision_names = [n for n in names if n.startswith(("resnet", "resnext", "wide_resnet"))]
    return sorted(torchvision_names) + sorted(_EXTRA_BACKBONES)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's sorted keys, dtypes, shapes and raw bytes: the weights' identity."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Backbone:
    """A loaded network and where its weights came from."""

    model: nn.Module
    name: str
    weights: str  # resolved enum name, absolute file path, or "none"
    weights_sha256: str

    @property
    def weights_label(self) -> str:
        """The weights as the paper names them where it does (``ResNet #2``), else as given."""
        return WEIGHT_ALIASES.get(self.weights, self.weights)


def _build(name: str, num_classes: int) -> nn.Module:
    if name in _EXTRA_BACKBONES:
        return _EXTRA_BACKBONES[name][0](num_classes)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _check_name(name: str) -> None:
    known = resnet_family_names()
    if name not in known:
        raise LinftError(f"unknown backbone '{name}'; choose one of: {', '.join(known)}")


def _enum_state_dict(name: str, weights_name: str):
    """Load torchvision enum weights through torchvision, or say exactly where to put the file."""
    enum = torchvision.models.get_model_weights(name)
    weights = enum[weights_name]
    filename = os.path.basename(weights.url)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise LinftError(
            f"weights {name}/{weights_name} are not available (no download: {getattr(exc, 'reason', exc)}); "
            f"put {filename} ({weights.url}) in {folder}, or pass --weights PATH to a local state_dict"
        ) from None
    except PermissionError as exc:
        raise LinftError(f"cannot read {exc.filename or folder} (permission denied); fix its permissions "
                         f"or set TORCH_HOME to a folder you can read") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise LinftError(
            f"cannot read {folder / filename} ({exc.__class__.__name__}); "
            f"delete it and put a good copy of {weights.url} there"
        ) from None
    return state, weights


def _file_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several unrelated types for a bad file
        raise LinftError(
            f"cannot load weights file {path} as a state_dict ({exc.__class__.__name__}); "
            f"save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LinftError(f"weights file {path} holds no state_dict; save it with torch.save(model.state_dict(), path)")
    return obj


def _load_strict(model: nn.Module, state: dict, name: str, source: str) -> None:
    result_keys = set(model.state_dict())
    missing = sorted(result_keys - set(state))
    unexpected = sorted(set(state) - result_keys)
    if missing or unexpected:
        def _few(keys):
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"] if unexpected else [])
        raise LinftError(f"weights {source} do not fit {name}: {'; '.join(parts)}; pass weights saved from a {name}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise LinftError(f"weights {source} do not fit {name}: {first}; pass weights saved from a {name}") from None


def load_backbone(name: str = "resnet50", weights: str | os.PathLike | None = "DEFAULT") -> Backbone:
    """Build backbone ``name`` and load ``weights`` strictly; the model is returned in eval mode.

    ``weights``: ``DEFAULT`` (the backbone's recommended weights: torchvision's
    ``DEFAULT`` member, ``IMAGENET1K_V2`` = the paper's "ResNet #2" for
    ResNet-50; the shipped file for ``demo-resnet``), a torchvision enum member
    name of that model (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ...), a path to a
    state_dict file, or ``none``/``None`` for a random initialisation seeded
    with :data:`NONE_WEIGHTS_SEED`. For a registered extra backbone
    ``weights=None`` also means its default weights.
    """
    _check_name(name)
    if name in _EXTRA_BACKBONES and (weights is None or str(weights).upper() == "DEFAULT"):
        weights = _EXTRA_BACKBONES[name][1]
    text = "none" if weights is None else os.fspath(weights)

    if text.lower() == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(NONE_WEIGHTS_SEED)
            model = _build(name, 1000)
        resolved = "none"
    else:
        members = {}
        if name not in _EXTRA_BACKBONES:
            members = dict(torchvision.models.get_model_weights(name).__members__)
        upper = text.upper()
        if upper in members:
            state, enum_member = _enum_state_dict(name, upper)
            resolved = enum_member.name  # DEFAULT -> the member it stands for
            model = _build(name, 1000)
            _load_strict(model, state, name, f"{name}/{resolved}")
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                choices = ", ".join(members) if members else "none"
                raise LinftError(
                    f"weights '{text}' are neither a weight name of {name} ({choices}) nor an existing file; "
                    f"pass one of those names or the path of a state_dict"
                )
            state = _file_state_dict(path)
            fc = state.get("fc.weight")
            model = _build(name, int(fc.shape[0]) if fc is not None else 1000)
            _load_strict(model, state, name, str(path))
            resolved = str(path.resolve())
    model.eval()
    return Backbone(model=model, name=name, weights=resolved, weights_sha256=state_dict_sha256(model.state_dict()))


# --------------------------------------------------------------------------- φ blocks


def _is_residual_block(module: nn.Module) -> bool:
    # torchvision's BasicBlock and Bottleneck, and any block written in their style
    return hasattr(module, "downsample") and hasattr(module, "conv1")


def _block_stride(block: nn.Module) -> int:
    stride = getattr(block, "stride", None)
    if stride is None:
        strides = [max(m.stride) for m in block.modules() if isinstance(m, nn.Conv2d)]
        stride = max(strides) if strides else 1
    return int(stride if isinstance(stride, int) else max(stride))


def residual_block_names(model: nn.Module) -> list[str]:
    """Names of all residual blocks of ``model`` in forward (registration) order."""
    return [n for n, m in model.named_modules() if n and _is_residual_block(m)]


def phi_block_names(model: nn.Module, num_blocks: int | None = None) -> list[str]:
    """The φ blocks: the residual blocks after the last resolution change, or the last ``num_blocks`` of them.

    For ResNet-50 that is ``layer4.0, layer4.1, layer4.2``; for ResNet-18
    ``layer4.0, layer4.1``. The last name is the block the classifier reads.
    """
    blocks = residual_block_names(model)
    if not blocks:
        raise LinftError(
            f"{model.__class__.__name__} has no residual blocks (modules with conv1 and downsample); "
            f"pass a torchvision-style ResNet"
        )
    modules = dict(model.named_modules())
    start = 0
    for i, n in enumerate(blocks):
        if _block_stride(modules[n]) > 1:
            start = i
    stage = blocks[start:]
    if num_blocks is None:
        return stage
    if not 1 <= num_blocks <= len(stage):
        raise LinftError(
            f"--blocks {num_blocks} is out of range: the last stage of this backbone has {len(stage)} "
            f"residual blocks ({', '.join(stage)}); pass 1 to {len(stage)}"
        )
    return stage[-num_blocks:]


class PooledBlockFeatures(nn.Module):
    """``x -> (batch, K, D)``: the average-pooled outputs of K residual blocks, stacked in block order.

    The model runs its own ``forward`` (its in-place residual additions
    included: a traced copy such as torchvision's ``create_feature_extractor``
    makes them out-of-place and was measured about 8% slower on CPU); forward
    hooks on the blocks pool each output on the model's device, in float32 even
    under autocast. The classifier still runs, at a negligible cost, and its
    output is dropped. The last slice ``[:, -1]`` equals the input of the
    model's own classifier (its ``avgpool`` output).

    The hooks stay on ``model`` until :meth:`remove` is called.
    """

    def __init__(self, model: nn.Module, block_names: list[str]):
        super().__init__()
        self.model = model
        self.block_names = list(block_names)
        modules = dict(model.named_modules())
        unknown = [n for n in self.block_names if n not in modules]
        if unknown:
            raise LinftError(f"{model.__class__.__name__} has no module named {', '.join(unknown)}; "
                             f"pick blocks from phi_block_names(model)")
        self._pooled: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._pool_into(n)) for n in self.block_names]

    def _pool_into(self, name: str):
        def hook(module, inputs, output):
            self._pooled[name] = F.adaptive_avg_pool2d(output.float(), 1).flatten(1)
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._pooled.clear()
        self.model(x)
        try:
            return torch.stack([self._pooled[n] for n in self.block_names], dim=1)
        finally:
            self._pooled.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _register_demo_resnet():
    from linft.pretrain import demo_resnet, SHIPPED_CHECKPOINT
    register_backbone("demo-resnet", demo_resnet, str(SHIPPED_CHECKPOINT))


_register_demo_resnet()

"""The backbone registry: build a network by name and load its weights, strictly, from wherever they are.

* :func:`load_backbone` builds a network by name and loads its weights from a
  torchvision enum name (``IMAGENET1K_V1`` = the paper's "ResNet #1",
  ``IMAGENET1K_V2`` = "ResNet #2", ``DEFAULT``), a local state_dict file, or
  ``none`` (a deterministic random initialisation); ``None`` is refused (say which). Enum weights come through
  torchvision's own loader and cache folder; when they cannot be had the error
  names the file and the folder to put it in.
* :func:`register_backbone` adds an architecture that is not a torchvision
  model; :func:`register_family` adds a family that loads its own weights
  (torchvision's Vision Transformers, ``linft.models.vit``; OpenCLIP image
  towers, ``linft.models.clip``). Architectures register themselves; the
  registry never imports one.

Every backbone is a network whose classifier is ``model.fc`` and whose forward
ends with ``fc(representation)``; a :class:`Backbone` also says which images
it takes (``transform``: the weights' own evaluation transform, or DomainBed's
at ``image_size``; ``image_size``: the one size a transformer accepts).

Edge cases: every load is strict (:func:`linft.models.checkpoints.load_state_dict_strict`);
a local file may be a bare state_dict or a dict with a ``state_dict`` entry
(linft's checkpoint format; a fine-tuning head ``fc.1.*`` is read as ``fc.*``,
:func:`read_backbone_state`), and its classifier size is taken from the file,
since only the features are used.
"""

from __future__ import annotations

import os
import pickle
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from linft.data.images import NORMALIZE, eval_transform
from linft.errors import LinftError
from linft.models.checkpoints import load_state_dict_strict, read_state_dict, state_dict_sha256
from linft.models.heads import single_linear_head

#: Other names for the torchvision weights the paper uses.
WEIGHT_ALIASES = {"IMAGENET1K_V1": "ResNet #1", "IMAGENET1K_V2": "ResNet #2"}

#: Seed of the random initialisation used for ``weights="none"``, so that the
#: same command always builds the same network (and its cache can resume).
NONE_WEIGHTS_SEED = 0

#: torchvision model families linft knows the φ blocks of.
TORCHVISION_FAMILIES = ("resnet", "resnext", "wide_resnet")

# Backbones that are not torchvision models, registered by their own modules:
# name -> (builder(num_classes, **kwargs) -> nn.Module, default weights).
_EXTRA_BACKBONES: dict[str, tuple[Callable[..., nn.Module], str]] = {}


def check_new_backbone_name(name: str) -> None:
    """Refuse a ``name`` that a backbone already has (torchvision's, a family's or a registered one), as
    torchvision's ``register_model`` does: registering never silently replaces a backbone."""
    if name in _EXTRA_BACKBONES or _family(name) is not None or name in backbone_names():
        raise LinftError(f"a backbone named {name!r} already exists; register yours under another name",
                         param="name")


def register_backbone(name: str, builder: Callable[..., nn.Module], default_weights: str = "none") -> None:
    """Make ``builder(num_classes, **kwargs)`` available to :func:`load_backbone` under ``name`` (a new name:
    :func:`check_new_backbone_name`)."""
    check_new_backbone_name(name)
    _EXTRA_BACKBONES[name] = (builder, default_weights)


@dataclass(frozen=True)
class BackboneFamily:
    """Architectures that load their own weights: ``owns(name)``, ``names()`` (listed in errors and help),
    ``build(name, num_classes, **kwargs)`` (random init, global RNG) and ``load(name, weights) -> Backbone``
    (``weights``: ``DEFAULT``, a weight name, a file or ``none``; never None)."""

    owns: Callable[[str], bool]
    names: Callable[[], list[str]]
    build: Callable[..., nn.Module]
    load: Callable[[str, str], "Backbone"]


_FAMILIES: list[BackboneFamily] = []


def register_family(family: BackboneFamily) -> None:
    """Make the architectures of ``family`` available to :func:`load_backbone` and :func:`build_backbone`; none of
    its names may be a backbone already (:func:`check_new_backbone_name`)."""
    for name in family.names():
        check_new_backbone_name(name)
    _FAMILIES.append(family)


def _family(name: str) -> BackboneFamily | None:
    return next((f for f in _FAMILIES if f.owns(name)), None)


def backbone_names() -> list[str]:
    """Every backbone :func:`load_backbone` builds: torchvision's ResNet family, the families, the registered ones."""
    names = torchvision.models.list_models(module=torchvision.models)
    return (sorted(n for n in names if n.startswith(TORCHVISION_FAMILIES)) + [n for f in _FAMILIES for n in f.names()]
            + sorted(_EXTRA_BACKBONES))


@dataclass
class Backbone:
    """A loaded network and where its weights came from."""

    model: nn.Module
    name: str  # the architecture, resolved (``clip:ViT-B-32-quickgelu`` for OpenAI's weights)
    weights: str  # resolved enum name, absolute file path, or "none"
    weights_sha256: str
    transform: object | None = None  # the weights' own evaluation transform (PIL -> uint8); None: DomainBed's
    normalize: object | None = None  # the normalisation in effect, for the record (None: ImageNet's); the network
    # takes ImageNet-normalised input and folds in any other (CLIP's)
    image_size: int | None = None  # the one input size the network takes; None: any

    @property
    def weights_label(self) -> str:
        """The weights as the paper names them where it does (``ResNet #2``), else as given."""
        return WEIGHT_ALIASES.get(self.weights, self.weights)

    def input_transform(self, image_size: int):
        """``(transform, normalize, size)`` of the images this network evaluates: the weights' own transform, or
        DomainBed's at ``image_size`` (refused in one line when the network takes another size)."""
        if self.transform is not None:
            return self.transform, self.normalize or NORMALIZE, int(self.image_size)
        self.check_image_size(image_size)
        return eval_transform(image_size), NORMALIZE, int(image_size)

    def check_image_size(self, image_size: int) -> None:
        """One line when the network takes only another image size (a transformer's position embedding fixes it)."""
        if self.image_size is not None and int(image_size) != int(self.image_size):
            raise LinftError(f"{self.name} with weights {self.weights_label} takes {self.image_size} px images; "
                             f"pass image_size={self.image_size}", param="image_size")


def check_backbone_name(name: str) -> None:
    """One-line error for a name :func:`load_backbone` does not know."""
    if _family(name) is not None:
        return
    known = backbone_names()
    if name not in known:
        raise LinftError(f"unknown backbone '{name}'; choose one of: {', '.join(known)}")


def build_backbone(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """A freshly initialised network ``name`` (global RNG); ``kwargs`` go to its builder (``zero_init_residual``)."""
    check_backbone_name(name)
    family = _family(name)
    if family is not None:
        return family.build(name, num_classes, **kwargs)
    if name in _EXTRA_BACKBONES:
        return _EXTRA_BACKBONES[name][0](num_classes, **kwargs)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` under the seed of ``weights="none"`` (:data:`NONE_WEIGHTS_SEED`), the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(NONE_WEIGHTS_SEED)
        return build()


def weights_file(name: str, text: str, choices: list[str]) -> Path:
    """The existing file ``text`` names, or one LinftError listing the weight names of ``name``."""
    path = Path(text).expanduser()
    if not path.is_file():
        raise LinftError(f"weights '{text}' are neither a weight name of {name} ({', '.join(choices) or 'none'}) "
                         f"nor an existing file; pass one of those names or the path of a state_dict")
    return path


def read_backbone_state(path: Path) -> dict:
    """The state_dict of a backbone's weights file (:func:`~linft.models.checkpoints.read_state_dict`), its
    classifier as the backbone's one ``Linear`` ``fc``: the head ``fc.1.*`` of linft's fine-tuning checkpoints
    (``selected.pt``) is read as ``fc.*`` (:func:`~linft.models.heads.single_linear_head`). Every family reads
    its files through here."""
    return single_linear_head(read_state_dict(path))


def file_classes(state: dict) -> int:
    """The classes of a weights file's head ``fc.weight`` (classes, features); 1000 when it has none or one of
    another rank (0-d, 1-d, ...), which the strict load then names with its shape."""
    fc = state.get("fc.weight")
    return int(fc.shape[0]) if isinstance(fc, torch.Tensor) and fc.dim() == 2 else 1000


def torchvision_state_dict(name: str, weights_name: str):
    """``(state_dict, enum member)``: torchvision's weights through torchvision, or say exactly where to put
    the file."""
    enum = torchvision.models.get_model_weights(name)
    weights = enum[weights_name]
    filename = os.path.basename(weights.url)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise LinftError(
            f"weights {name}/{weights_name} are not available (no download: {getattr(exc, 'reason', exc)}); "
            f"put {filename} ({weights.url}) in {folder}, or pass weights=PATH, a local state_dict",
            param="weights") from None
    except PermissionError as exc:
        raise LinftError(f"cannot read {exc.filename or folder} (permission denied); fix its permissions "
                         f"or set TORCH_HOME to a folder you can read") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise LinftError(
            f"cannot read {folder / filename} ({exc.__class__.__name__}); "
            f"delete it and put a good copy of {weights.url} there"
        ) from None
    return state, weights


def load_weights(model: nn.Module, state: dict, name: str, source: str) -> None:
    """The strict load of ``state`` (from ``source``) into a ``name`` network, with linft's one-line error."""
    load_state_dict_strict(model, state, f"weights {source}", f"a {name}", f"pass weights saved from a {name}")


def load_backbone(name: str = "resnet50", weights: str | os.PathLike = "DEFAULT") -> Backbone:
    """Build backbone ``name`` and load ``weights`` strictly; the model is returned in eval mode.

    ``weights``: ``DEFAULT`` (the backbone's recommended weights: torchvision's
    ``DEFAULT`` member, ``IMAGENET1K_V2`` = the paper's "ResNet #2" for
    ResNet-50; the shipped file for ``demo-resnet``), a torchvision enum member
    name of that model (``IMAGENET1K_V1``, ``IMAGENET1K_V2``, ...), a path to a
    state_dict file, or ``"none"`` for a random initialisation seeded with
    :data:`NONE_WEIGHTS_SEED`. ``None`` is refused: it meant random weights
    for torchvision backbones and the shipped file for ``demo-resnet``; say
    ``"DEFAULT"`` or ``"none"``.
    """
    check_backbone_name(name)
    if weights is None:
        raise LinftError('weights=None is ambiguous; pass weights="DEFAULT" (the backbone\'s recommended weights) or '
                         'weights="none" (a seeded random initialisation)')
    family = _family(name)
    if family is not None:
        bb = family.load(name, os.fspath(weights))
        bb.model.eval()
        return bb
    if name in _EXTRA_BACKBONES and str(weights).upper() == "DEFAULT":
        weights = _EXTRA_BACKBONES[name][1]
    text = os.fspath(weights)

    if text.lower() == "none":
        model = seeded(lambda: build_backbone(name, 1000))
        resolved = "none"
    else:
        members = {}
        if name not in _EXTRA_BACKBONES:
            members = dict(torchvision.models.get_model_weights(name).__members__)
        upper = text.upper()
        if upper in members:
            state, enum_member = torchvision_state_dict(name, upper)
            resolved = enum_member.name  # DEFAULT -> the member it stands for
            model = build_backbone(name, 1000)
            load_weights(model, state, name, f"{name}/{resolved}")
        else:
            path = weights_file(name, text, list(members))
            state = read_backbone_state(path)
            model = build_backbone(name, file_classes(state))  # a head of another rank: the strict load names it
            load_weights(model, state, name, str(path))
            resolved = str(path.resolve())
    model.eval()
    return Backbone(model=model, name=name, weights=resolved, weights_sha256=state_dict_sha256(model.state_dict()))

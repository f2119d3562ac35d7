"""φ blocks: the residual blocks after the last resolution change, their pooled outputs, and block dropout.

* :func:`phi_block_names` finds the φ blocks structurally (``layer4.0-2`` of a
  ResNet-50, ``layer4.0-1`` of a ResNet-18), whatever the depth.
* :class:`PooledBlockFeatures` returns the average-pooled outputs of the chosen
  blocks as one ``(batch, K, D)`` tensor, pooled on the model's device.
* :func:`add_stochastic_depth` drops residual branches (the paper's baseline)
  without changing the model's modules or state_dict keys.

A residual block is a module with ``conv1`` and ``downsample`` (torchvision's
``BasicBlock`` and ``Bottleneck``, and any block written in their style).

Transformers say their own φ blocks (the φ-block protocol): a network with
``phi_candidates()`` (its blocks in order), ``default_phi_blocks`` (how many of
the last ones by default), ``pool_block_output(output) -> (batch, D)`` (a block's
output pooled the way the model pools its last one) and
``residual_branch_ends()`` (the modules whose outputs are added to the residual
stream). :mod:`linft.models.vit` and :mod:`linft.models.clip` implement it.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from linft.errors import LinftError


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
    if hasattr(model, "phi_candidates"):
        return _last_blocks(model.phi_candidates(), model.default_phi_blocks if num_blocks is None else num_blocks,
                            "encoder blocks")
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
    return stage if num_blocks is None else _last_blocks(stage, num_blocks, "residual blocks in its last stage")


def _last_blocks(blocks: list[str], num_blocks: int, what: str) -> list[str]:
    if not 1 <= num_blocks <= len(blocks):
        shown = ", ".join(blocks) if len(blocks) <= 6 else f"{blocks[0]} ... {blocks[-1]}"
        raise LinftError(f"num_blocks {num_blocks} is out of range: this backbone has {len(blocks)} {what} "
                         f"({shown}); pass 1 to {len(blocks)}", param="num_blocks")
    return blocks[-num_blocks:]


def _average_pool(output: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(output.float(), 1).flatten(1)


class PooledBlockFeatures(nn.Module):
    """``x -> (batch, K, D)``: the pooled outputs of K φ blocks, stacked in block order.

    A ResNet block's output is average-pooled; a transformer's is pooled by its
    ``pool_block_output`` (final norm, class token, projection: what its head reads).

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
        self._pool = getattr(model, "pool_block_output", None) or _average_pool
        self._pooled: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._pool_into(n)) for n in self.block_names]

    def _pool_into(self, name: str):
        def hook(module, inputs, output):
            self._pooled[name] = self._pool(output).float()
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


def _branch_end(block: nn.Module) -> nn.Module:
    # the last BatchNorm of the residual branch: bn3 of a Bottleneck, bn2 of a BasicBlock
    end = getattr(block, "bn3", None) or getattr(block, "bn2", None)
    if end is None:
        raise LinftError(f"{block.__class__.__name__} has no bn3/bn2; stochastic depth needs torchvision-style blocks")
    return end


def residual_branch_ends(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are residual branches (added to the stream): a ResNet's last BatchNorm of
    each block, a transformer's attention and MLP outputs (its ``residual_branch_ends()``)."""
    if hasattr(model, "residual_branch_ends"):
        return list(model.residual_branch_ends())
    modules = dict(model.named_modules())
    return [_branch_end(modules[name]) for name in residual_block_names(model)]


#: How residual branches are dropped: ``row`` — per example, rescaled by 1/(1 − rate) in training
#: (``torchvision.ops.StochasticDepth(rate, "row")``, linft's default); ``official`` — the official code's: one
#: draw for the whole batch, no rescaling in training or evaluation, and a dropped branch is skipped.
STOCHASTIC_DEPTH_MODES = ("row", "official")


def check_stochastic_depth(rate: float, mode: str = "row") -> None:
    """The one check of a stochastic depth ``rate`` (in [0, 1)) and ``mode`` (:data:`STOCHASTIC_DEPTH_MODES`)."""
    if not 0.0 <= rate < 1.0:
        raise LinftError(f"stochastic_depth {rate} is outside [0, 1); the paper uses 0.1 to 0.3",
                         param="stochastic_depth")
    if mode not in STOCHASTIC_DEPTH_MODES:
        raise LinftError(f"unknown stochastic_depth_mode '{mode}'; use {' or '.join(STOCHASTIC_DEPTH_MODES)}",
                         param="stochastic_depth_mode")


def add_stochastic_depth(model: nn.Module, rate: float, mode: str = "row") -> list:
    """Residual-block dropout on every residual branch, with probability ``rate`` (see :data:`STOCHASTIC_DEPTH_MODES`).

    The model's modules and state_dict keys are unchanged and pretrained weights load strictly (as the official
    code's do; its parameter is the survival probability: 0.9 there is ``rate`` 0.1 here). Active in training mode
    only (the model's mode: frozen BatchNorms stay in eval mode). Draws come from torch's global generator.
    Returns handles whose ``remove()`` undoes it.

    ``row``: a forward hook on the end of each branch (:func:`residual_branch_ends`: a ResNet's last BatchNorm; a
    transformer's attention and MLP outputs, each dropped on its own). ``official``: one draw per branch and batch
    on the CPU generator, in forward order, and a dropped branch is skipped as in the official code's StoDepth
    blocks: a ResNet block returns ``relu(downsample(x) or x)`` without running its branch, so the branch's
    parameters get no gradient (None: SGD applies neither weight decay nor momentum to them that step) and its
    BatchNorms do not update their running statistics; a transformer branch's output is replaced by zeros outside
    the autograd graph (no gradient either; it has no running statistics).
    """
    check_stochastic_depth(rate, mode)
    if mode == "official":
        return _official_stochastic_depth(model, rate)

    def per_row(drop):
        def hook(module, inputs, output):
            drop.training = model.training
            return drop(output)
        return hook

    return [end.register_forward_hook(per_row(torchvision.ops.StochasticDepth(rate, "row")))
            for end in residual_branch_ends(model)]


def _dropped(rate: float) -> bool:
    """One host-side draw (the CPU generator: no device sync): whether a branch is dropped for this batch."""
    return bool(torch.rand(()) < rate)


def _official_block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision-style residual block with the official code's stochastic depth: a dropped branch is skipped."""
    if block.training and _dropped(block.linft_drop_rate):
        return F.relu(x if block.downsample is None else block.downsample(x))  # not in place: x is the stream
    return type(block).forward(block, x)


class _ForwardOverride:
    """The handle of an instance ``forward``: ``remove()`` restores the class's."""

    def __init__(self, block: nn.Module):
        self.block = block

    def remove(self) -> None:
        self.block.__dict__.pop("forward", None)
        self.block.__dict__.pop("linft_drop_rate", None)


def _official_stochastic_depth(model: nn.Module, rate: float) -> list:
    if hasattr(model, "residual_branch_ends"):  # transformers: zeros outside the graph in place of the branch

        def skip(module, inputs, output):
            return torch.zeros_like(output) if model.training and _dropped(rate) else output
        return [end.register_forward_hook(skip) for end in residual_branch_ends(model)]
    modules = dict(model.named_modules())
    handles = []
    for name in residual_block_names(model):
        block = modules[name]
        _branch_end(block)  # torchvision-style blocks only
        block.linft_drop_rate = rate
        block.forward = types.MethodType(_official_block_forward, block)  # deepcopy rebinds it to the copy
        handles.append(_ForwardOverride(block))
    return handles

"""φ blocks: the residual blocks after the last resolution change, their pooled outputs, and block dropout.

* :func:`phi_block_names` finds the φ blocks structurally (``layer4.0-2`` of a
  ResNet-50, ``layer4.0-1`` of a ResNet-18), whatever the depth.
* :class:`PooledBlockFeatures` returns the average-pooled outputs of the chosen
  blocks as one ``(batch, K, D)`` tensor, pooled on the model's device.
* :func:`add_stochastic_depth` drops residual branches (the paper's baseline)
  without changing the model's modules or state_dict keys.

A residual block is a module with ``conv1`` and ``downsample`` (torchvision's
``BasicBlock`` and ``Bottleneck``, and any block written in their style).
"""

from __future__ import annotations

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


def _branch_end(block: nn.Module) -> nn.Module:
    # the last BatchNorm of the residual branch: bn3 of a Bottleneck, bn2 of a BasicBlock
    end = getattr(block, "bn3", None) or getattr(block, "bn2", None)
    if end is None:
        raise LinftError(f"{block.__class__.__name__} has no bn3/bn2; stochastic depth needs torchvision-style blocks")
    return end


def add_stochastic_depth(model: nn.Module, rate: float) -> list:
    """Residual-block dropout: ``torchvision.ops.StochasticDepth(rate, "row")`` on every residual branch.

    Implemented as a forward hook on the last BatchNorm of each branch, so the
    model's modules and state_dict keys are unchanged and pretrained weights
    load strictly (the official code's version leaves the network randomly
    initialised). Active in training mode only. Returns the hook handles.
    """
    if not 0.0 <= rate < 1.0:
        raise LinftError(f"--stochastic-depth {rate} is outside [0, 1); the paper uses 0.1 to 0.3")
    modules = dict(model.named_modules())
    handles = []
    for name in residual_block_names(model):
        drop = torchvision.ops.StochasticDepth(rate, "row")
        end = _branch_end(modules[name])

        def hook(module, inputs, output, drop=drop, block=modules[name]):
            drop.training = block.training  # the block's mode: its BatchNorms stay in eval mode when frozen
            return drop(output)
        handles.append(end.register_forward_hook(hook))
    return handles

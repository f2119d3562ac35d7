"""One training step of the linear engine for a block of runs: the compiled sparse step, or the pure-torch step.

A grid's runs are split in two :class:`RunBlock`: the dropout runs (rate > 0,
not probes), trained by the compiled sparse step when it is available
(:mod:`linft.train.sparse_step`), and the others (dropout 0, probes, and every
run when the kernel is not available), trained by :func:`torch_step`.

:func:`torch_step` writes the gradients by hand (no autograd) with fixed
shapes and no host synchronisation: dead runs are masked by multiplication
and ``torch.where``, never by boolean indexing, so the step can be captured by
CUDA graphs. Both steps are ``torch.optim.SGD`` with momentum and weight decay
(the momentum buffer starts at zero, so its first value is the first
gradient, as torch's), and a run whose loss is not finite stops there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linft.train.linear_draws import keep_threshold
from linft.train.sparse_step import run_sparse_step


@dataclass
class RunBlock:
    """Runs of a grid that one step function trains, stacked (G, h, ...) over groups and the block's grid points.

    ``params`` are ``v`` (G, h, K, D), ``Vt`` (G, h, D, C) (the head transposed: a unit's C weights are
    contiguous) and ``b`` (G, h, C); ``bufs`` their momentum buffers; ``grads`` the compiled step's gradient
    scratch (None for the torch step); ``live`` (G, h) bool, False once a run's loss was not finite.
    """

    points: list[int]  # positions of the block's runs in the group's grid points
    params: list[torch.Tensor]
    bufs: list[torch.Tensor]
    lr: torch.Tensor  # (h,) float32 base learning rates
    wd: torch.Tensor  # (h,)
    thr: torch.Tensor  # (h,) int64 noise thresholds (0: no dropout)
    scale: torch.Tensor  # (h,) 1 / (1 - rate)
    train_v: torch.Tensor  # (h,) 0 for probes (v fixed), else 1
    live: torch.Tensor  # (G, h) bool
    loss: torch.Tensor  # (G, h) float32, this step's training loss
    masked: bool  # some run drops out
    kernel: object = None  # the compiled sparse step, or None
    grads: list[torch.Tensor] | None = None


def new_block(points: list[int], rates, lrs, wds, probes, init: list[torch.Tensor], kernel=None) -> RunBlock:
    """A block of the grid points ``points`` from their initial parameters ``init`` (v, V, b of shape (G, h, ...))."""
    v, V, b = init
    params = [v.contiguous(), V.transpose(-1, -2).contiguous(), b.contiguous()]
    f32 = dict(device=v.device, dtype=torch.float32)
    G, h = v.shape[:2]
    block = RunBlock(points=points, params=params, bufs=[torch.zeros_like(t) for t in params],
                     lr=torch.tensor(lrs, **f32), wd=torch.tensor(wds, **f32),
                     thr=torch.tensor([keep_threshold(r) for r in rates], dtype=torch.long, device=v.device),
                     scale=torch.tensor([1.0 / (1.0 - r) for r in rates], **f32),
                     train_v=torch.tensor([0.0 if p else 1.0 for p in probes], **f32),
                     live=torch.ones(G, h, dtype=torch.bool, device=v.device), loss=torch.zeros(G, h, **f32),
                     masked=any(r > 0 for r in rates), kernel=kernel)
    if kernel is not None:
        block.grads = [torch.zeros_like(t) for t in params]
    return block


def torch_step(block: RunBlock, phi: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None,
               lr: torch.Tensor, momentum: float) -> None:
    """Forward, hand-written backward and SGD update of every run of ``block`` on the step's features
    ``phi`` (G, B, K, D) float32, labels ``y`` (G, B) and unit noise (G, B, D) (None: no run drops out)."""
    v, Vt, b = block.params
    G, h, _, D = v.shape
    B, C = phi.shape[1], Vt.shape[-1]
    rep = torch.einsum("gbkd,ghkd->ghbd", phi, v)  # Φ̃ of every run and row
    mask = None
    if noise is not None:
        mask = (noise[:, None] >= block.thr.view(1, h, 1, 1)) * block.scale.view(1, h, 1, 1)
        rep = rep * mask
    logp = torch.baddbmm(b.reshape(G * h, 1, C), rep.reshape(G * h, B, D), Vt.reshape(G * h, D, C))
    logp = logp.view(G, h, B, C).log_softmax(-1)
    onehot = F.one_hot(y, C).to(phi.dtype)[:, None]  # (G, 1, B, C)
    block.loss.copy_(-(logp * onehot).sum(-1).mean(-1))
    gz = (logp.exp() - onehot) / B
    g_Vt = rep.transpose(-1, -2) @ gz
    g_rep = gz @ Vt.transpose(-1, -2)
    if mask is not None:
        g_rep = g_rep * mask
    g_v = torch.einsum("ghbd,gbkd->ghkd", g_rep, phi) * block.train_v.view(1, h, 1, 1)
    sgd_update(block, [g_v, g_Vt, gz.sum(2)], lr, momentum)


@torch.no_grad()
def sgd_update(block: RunBlock, grads, lr: torch.Tensor, momentum: float) -> None:
    """``torch.optim.SGD`` on every live run of ``block``; runs whose loss is not finite are marked dead first."""
    block.live &= torch.isfinite(block.loss)
    G, h = block.live.shape
    for i, (p, grad, buf) in enumerate(zip(block.params, grads, block.bufs)):
        shape = (1, h) + (1,) * (p.dim() - 2)
        live = block.live.view(G, h, *shape[2:])
        step_lr = (lr * block.train_v if i == 0 else lr).view(shape)
        buf.copy_(torch.where(live, momentum * buf + (grad + block.wd.view(shape) * p), buf))
        p.sub_(torch.where(live, step_lr * buf, 0.0))


def kernel_step(block: RunBlock, feats: torch.Tensor, offs: torch.Tensor, y: torch.Tensor, words: torch.Tensor,
                lr: torch.Tensor, momentum: float) -> None:
    """The compiled sparse step of ``block`` (:mod:`linft.train.sparse_step`), in place."""
    run_sparse_step(block.kernel, feats, offs, y, words, block.params, block.bufs, block.grads, block.thr,
                    block.scale, lr.contiguous(), block.wd, momentum, block.live, block.loss)

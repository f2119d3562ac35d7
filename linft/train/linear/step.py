"""One training step of the linear engine for a block of runs: the compiled sparse step, or the pure-torch step.

A grid's runs are split in two :class:`RunBlock`: the dropout runs (rate > 0,
not probes), trained by the compiled sparse step when it is available
(:mod:`linft._kernels.sparse_step`), and the others (dropout 0, probes, and every
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

from linft.train.linear.draws import keep_threshold
from linft._kernels.sparse_step import padded, run_sparse_step


@dataclass
class RunBlock:
    """Runs of a grid that one step function trains, stacked (G, h, ...) over groups and the block's grid points.

    ``params`` are ``v`` (G, h, K, D), ``Vt`` (G, h, D, C) (the head transposed: a unit's C weights are
    contiguous) and ``b`` (G, h, C); for the kernel, chunks of 8 runs as SIMD lanes (:func:`to_lanes`, runs and
    classes zero-padded to multiples of 8, per-run tensors padded too); :meth:`model` gives the model's shapes;
    ``bufs`` their momentum buffers; ``live`` (G, h) bool, False once a run's loss was not finite.
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
    num_classes: int
    rates: list[float]  # the dropout rate of each run (the block's runs are sorted by rate)
    slices: list[tuple[int, int]]  # runs of equal rate: (start, end)
    kernel: object = None  # the compiled sparse step, or None


    def model(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``v`` (G, h, K, D), ``Vt`` (G, h, D, C), ``b`` (G, h, C), padding dropped."""
        v, Vt, b = self.params if self.kernel is None else from_lanes(*self.params)
        h = len(self.points)
        return v[:, :h], Vt[:, :h, :, :num_classes], b[:, :h, :num_classes]


def new_block(points: list[int], rates, lrs, wds, probes, init: list[torch.Tensor], kernel=None) -> RunBlock:
    """A block of the grid points ``points`` from their initial parameters ``init`` (v, V, b of shape (G, h, ...)).

    For the kernel the runs are padded to a multiple of 8 (dead lanes: never kept, lr 0) and the classes too.
    """
    v, V, b = init
    Vt = V.transpose(-1, -2)
    G, h = v.shape[:2]
    if kernel is not None:
        hp, C = padded(h), b.shape[-1]
        v, Vt, b = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, hp - h)) for t in (v, Vt, b))
        Vt, b = F.pad(Vt, (0, padded(C) - C)), F.pad(b, (0, padded(C) - C))
        v, Vt, b = to_lanes(v, Vt, b)
        rates, lrs, wds, probes = (list(x) + [pad] * (hp - h) for x, pad in
                                   ((rates, 1.0), (lrs, 0.0), (wds, 0.0), (probes, False)))
    params = [v.contiguous(), Vt.contiguous(), b.contiguous()]
    f32 = dict(device=v.device, dtype=torch.float32)
    live = torch.ones(G, len(rates), dtype=torch.bool, device=v.device)
    live[:, h:] = False
    block = RunBlock(points=points, params=params, bufs=[torch.zeros_like(t) for t in params],
                     lr=torch.tensor(lrs, **f32), wd=torch.tensor(wds, **f32),
                     thr=torch.tensor([keep_threshold(r) for r in rates], dtype=torch.long, device=v.device),
                     scale=torch.tensor([1.0 / (1.0 - r) if r < 1 else 0.0 for r in rates], **f32),
                     train_v=torch.tensor([0.0 if p else 1.0 for p in probes], **f32),
                     live=live, loss=torch.zeros(G, len(rates), **f32),
                     masked=any(r > 0 for r in rates), num_classes=V.shape[-2], rates=list(rates),
                     slices=rate_slices(list(rates)), kernel=kernel)
    return block


def to_lanes(v, Vt, b):
    """(G, h, K, D), (G, h, D, C), (G, h, C) with h a multiple of 8 -> the kernel's chunks of 8 runs as SIMD lanes:
    (G, h/8, D, K, 8), (G, h/8, D, C, 8), (G, h/8, C, 8)."""
    G, h = v.shape[:2]
    v = v.reshape(G, h // 8, 8, *v.shape[2:]).permute(0, 1, 4, 3, 2)
    Vt = Vt.reshape(G, h // 8, 8, *Vt.shape[2:]).permute(0, 1, 3, 4, 2)
    b = b.reshape(G, h // 8, 8, b.shape[-1]).permute(0, 1, 3, 2)
    return v, Vt, b


def from_lanes(v, Vt, b):
    """The inverse of :func:`to_lanes` (views)."""
    G, Q = v.shape[:2]
    return (v.permute(0, 1, 4, 3, 2).reshape(G, 8 * Q, v.shape[3], v.shape[2]),
            Vt.permute(0, 1, 4, 2, 3).reshape(G, 8 * Q, Vt.shape[2], Vt.shape[3]),
            b.permute(0, 1, 3, 2).reshape(G, 8 * Q, b.shape[2]))


def rate_slices(rates: list[float]) -> list[tuple[int, int]]:
    """``(start, end)`` of each stretch of equal dropout rate in ``rates`` (a block's runs are sorted by rate)."""
    starts = [i for i in range(len(rates)) if i == 0 or rates[i] != rates[i - 1]]
    return list(zip(starts, starts[1:] + [len(rates)]))


def torch_step(block: RunBlock, phi: torch.Tensor, y: torch.Tensor, noise: torch.Tensor | None,
               lr: torch.Tensor, momentum: float) -> None:
    """Forward, hand-written backward and SGD update of every run of ``block`` on the step's features
    ``phi`` (G, B, K, D) float32, labels ``y`` (G, B) and unit noise (G, B, D) (None: no run drops out).

    Folded form: ``logits = Σ_k (m ⊙ φ_k / (1-λ)) · (V ⊙ v_k)ᵀ + b``; runs of one rate share the masked
    features, so one batched matmul (B × K·D by K·D × runs·C per group) serves them all, forward and backward.
    """
    v, Vt, b = block.params
    G, h, K, D = v.shape
    B, C = phi.shape[1], Vt.shape[-1]
    W = (v[..., None] * Vt[:, :, None]).reshape(G, h, K * D, C)  # (V ⊙ v_k)ᵀ of every run
    onehot = torch.zeros(G, B, C, device=phi.device).scatter_(-1, y[..., None], 1.0)  # (G, B, C), no host sync
    g_W, losses, g_b = [], [], []
    for a, e in block.slices:
        psi = phi if noise is None or block.rates[a] == 0 else \
            phi * ((noise >= block.thr[a]) * block.scale[a])[:, :, None, :]
        psi = psi.reshape(G, B, K * D)
        Wr = W[:, a:e].permute(0, 2, 1, 3).reshape(G, K * D, (e - a) * C)
        logp = torch.baddbmm(b[:, a:e].reshape(G, 1, -1), psi, Wr).view(G, B, e - a, C).log_softmax(-1)
        losses.append(-(logp * onehot[:, :, None]).sum(-1).mean(1))  # (G, e - a)
        gz = (logp.exp() - onehot[:, :, None]) / B  # (G, B, e - a, C)
        g_b.append(gz.sum(1))
        g_W.append((gz.reshape(G, B, -1).transpose(1, 2) @ psi).view(G, e - a, C, K, D))
    one = lambda parts: parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    block.loss.copy_(one(losses))
    g_W = one(g_W)  # (G, h, C, K, D)
    g_Vt = (g_W * v[:, :, None]).sum(3).transpose(-1, -2)
    g_v = (g_W * Vt.transpose(-1, -2)[:, :, :, None]).sum(2) * block.train_v.view(1, h, 1, 1)
    sgd_update(block, [g_v, g_Vt, one(g_b)], lr, momentum)


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
    """The compiled sparse step of ``block`` (:mod:`linft._kernels.sparse_step`), in place."""
    run_sparse_step(block.kernel, feats, offs, y, words, block.params, block.bufs, block.thr,
                    block.scale, lr.contiguous(), block.wd, momentum, block.live, block.loss, block.num_classes)

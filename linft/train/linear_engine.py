"""The linear fine-tuning engine: the paper's linear model (Section 4.3) trained over a whole grid at once.

The model, per φ block k a vector ``v_k`` in R^D, a head ``V`` (C x D) and ``b``::

    Φ̃ = Σ_k v_k ⊙ φ_k                       (the adapted representation)
    logits = V · dropout_λ(Φ̃) + b            (inverted dropout, identity at evaluation)

Linear probing is the same model with ``v`` fixed to ``v_l = 1`` on the last
block and 0 elsewhere, and only ``V, b`` trained.

:func:`train_linear_grid` trains every (held-out domain, seed) *group* times
every grid point (lr, weight decay, dropout, probe) as stacked tensors of
shape (G, H, ...): one einsum per step for all runs. Each run follows the
protocol exactly as a plain ``torch.optim.SGD`` loop would (momentum 0.9,
weight decay added to the gradient, lr ÷10 at the milestones, 32 examples
per training domain drawn with replacement from the "in" splits, evaluation
every ``eval_every`` steps and at the last step). Runs of one group share
their batches, dropout noise and initialisation, as in the official code
(runs with the same seed see the same batches whatever their lr and weight
decay); a keep-mask is ``u >= λ`` on noise ``u`` shared by the group, so
different dropout rates also share their noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from linft.data.splits import seed_hash
from linft.errors import LinftError
from linft.models.heads import check_dropout_rate
from linft.protocol.schedule import eval_steps, lr_at, milestone_steps

V_INITS = ("normal", "last")


# --------------------------------------------------------------------------- the model (pure functions)


def adapted_representation(phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_k v_k ⊙ φ_k``: phi (..., K, D), v (K, D) -> (..., D)."""
    return (phi * v).sum(-2)


def inverted_dropout(x: torch.Tensor, keep: torch.Tensor, rate: float | torch.Tensor) -> torch.Tensor:
    """Kept units scaled by ``1/(1-rate)``, the others zeroed (``keep`` is a boolean mask)."""
    return x * keep / (1.0 - rate)


def linear_ft_logits(phi, v, V, b, keep=None, rate=0.0) -> torch.Tensor:
    """Logits of the linear fine-tuning model; ``keep=None`` is evaluation (no dropout)."""
    rep = adapted_representation(phi, v)
    if keep is not None:
        rep = inverted_dropout(rep, keep, rate)
    return rep @ V.T + b


def initial_parameters(num_blocks: int, dim: int, num_classes: int, generator: torch.Generator,
                       v_init: str = "last", probe: bool = False, device="cpu"):
    """``(v, V, b)`` of one run: V, b as ``nn.Linear`` initialises them (U(±1/√D));
    v ~ N(0, 1) (``normal``, the official code) or the last block's ``1`` (``last``, and always for a probe)."""
    if v_init not in V_INITS:
        raise LinftError(f"unknown v init '{v_init}'; use one of {', '.join(V_INITS)}")
    bound = 1.0 / dim**0.5
    V = (torch.rand(num_classes, dim, generator=generator, device=device) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=generator, device=device) * 2 - 1) * bound
    normal = torch.randn(num_blocks, dim, generator=generator, device=device)
    if v_init == "last" or probe:
        v = torch.zeros(num_blocks, dim, device=device)
        v[-1] = 1.0
    else:
        v = normal
    return v, V, b


# --------------------------------------------------------------------------- runs and streams


@dataclass(frozen=True)
class GridPoint:
    """The hyper-parameters of one run inside its group."""

    lr: float
    weight_decay: float
    dropout: float
    probe: bool = False


@dataclass
class Group:
    """One (held-out domain, seed): its training pools, its random stream, and its grid points."""

    test_domain: int
    seed: int
    train_pools: list[torch.Tensor]  # global row indices of each training domain's "in" split
    points: list[GridPoint]


def group_generator(seed: int, test_domain: int, purpose: str, device) -> torch.Generator:
    """The random stream of a group: one per purpose (``batches``, ``init``), seeded by DomainBed's seed_hash."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_hash("linft-linear", purpose, seed, test_domain))
    return g


def draw_batch(pools: list[torch.Tensor], batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` rows per training domain, uniformly with replacement, concatenated in domain order."""
    return torch.cat([pool[torch.randint(len(pool), (batch_size,), generator=generator, device=pool.device)]
                      for pool in pools])


def draw_views(num_rows: int, num_views: int, generator: torch.Generator, device) -> torch.Tensor:
    """Which cached augmented view each batch row uses this step (uniform)."""
    return torch.randint(num_views, (num_rows,), generator=generator, device=device)


def draw_noise(num_rows: int, dim: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform noise for the dropout masks of one step (shared by the runs of a group)."""
    return torch.rand(num_rows, dim, generator=generator, device=device)


# --------------------------------------------------------------------------- the engine


@dataclass
class EvalPoint:
    """What the engine reports at one evaluation step for every run of the grid."""

    step: int
    correct: np.ndarray  # (G, H, S) correct counts per split
    total: np.ndarray  # (G, S) examples per split (depends on the group's seed)
    loss: np.ndarray  # (G, H) training loss of this step
    diverged: np.ndarray  # (G, H) bool: loss became NaN/inf at or before this step
    final: bool


@dataclass
class LinearGridConfig:
    """Protocol settings shared by every run of a grid."""

    steps: int = 10_000
    batch_size: int = 32
    eval_every: int = 300
    momentum: float = 0.9
    v_init: str = "last"
    lr_milestones: tuple[float, ...] = (0.5,)  # fractions of ``steps``
    eval_chunk: int = 4096
    extra: dict = field(default_factory=dict)

    def milestone_steps(self) -> tuple[int, ...]:
        return milestone_steps(self.lr_milestones, self.steps)

    def check(self) -> None:
        """One-line errors for settings that cannot run."""
        for name in ("steps", "batch_size", "eval_every", "eval_chunk"):
            if getattr(self, name) < 1:
                raise LinftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.v_init not in V_INITS:
            raise LinftError(f"unknown v init '{self.v_init}'; use one of {', '.join(V_INITS)}")


@dataclass
class LinearData:
    """What the engine trains on, on the training device: the cache's tensors and each seed's split of its rows."""

    features: torch.Tensor  # (N, K, D), any float dtype (the math is float32)
    labels: torch.Tensor  # (N,)
    split_rows: dict[int, torch.Tensor]  # seed -> (N,) split id of each row (-1: in no split)
    num_splits: int
    num_classes: int
    views: torch.Tensor | None = None  # (N, V, K, D) augmented views: one is drawn per row and step


@dataclass
class _GridState:
    """Parameters, momentum buffers and random streams of every run of a grid, stacked (G, H, ...)."""

    params: list[torch.Tensor]  # v (G, H, K, D), V (G, H, C, D), b (G, H, C)
    bufs: list[torch.Tensor]
    masks: list[torch.Tensor | None]  # probe runs keep v fixed
    lr: torch.Tensor  # (G, H)
    wd: torch.Tensor  # (G, H)
    rate_groups: list[tuple[float, torch.Tensor]]  # dropout rate -> the grid points that use it
    batch_gens: list[torch.Generator]
    diverged: torch.Tensor  # (G, H) bool


def _initial_state(data: LinearData, groups: list[Group], config: LinearGridConfig) -> _GridState:
    points, device = groups[0].points, data.features.device
    _, K, D = data.features.shape
    G, H, C = len(groups), len(points), data.num_classes
    f32 = dict(device=device, dtype=torch.float32)
    v, V, b = torch.empty(G, H, K, D, **f32), torch.empty(G, H, C, D, **f32), torch.empty(G, H, C, **f32)
    batch_gens = []
    for gi, g in enumerate(groups):
        for hi, p in enumerate(points):
            gen = group_generator(g.seed, g.test_domain, "init", device)  # same init for every point of a group
            v[gi, hi], V[gi, hi], b[gi, hi] = initial_parameters(K, D, C, gen, config.v_init, p.probe, device)
        batch_gens.append(group_generator(g.seed, g.test_domain, "batches", device))
    params = [t.requires_grad_(True) for t in (v, V, b)]
    train_v = torch.tensor([0.0 if p.probe else 1.0 for p in points], **f32).view(1, H, 1, 1).expand(G, H, 1, 1)
    rate_groups = [(r, torch.tensor([h for h, p in enumerate(points) if p.dropout == r], device=device))
                   for r in sorted({p.dropout for p in points})]
    return _GridState(params=params, bufs=[torch.zeros_like(t) for t in params], masks=[train_v, None, None],
                      lr=torch.tensor([p.lr for p in points], **f32).expand(G, H),
                      wd=torch.tensor([p.weight_decay for p in points], **f32).expand(G, H),
                      rate_groups=rate_groups, batch_gens=batch_gens,
                      diverged=torch.zeros(G, H, dtype=torch.bool, device=device))


def _draw_step(data: LinearData, groups: list[Group], state: _GridState, batch_size: int):
    """The step's features (G, B, K, D) in float32, labels (G, B) and dropout noise (G, B, D), per group."""
    gens, device = state.batch_gens, data.features.device
    rows = torch.stack([draw_batch(g.train_pools, batch_size, gen) for g, gen in zip(groups, gens)])
    B = rows.shape[1]
    if data.views is None:
        phi = data.features[rows].float()
    else:
        which = torch.stack([draw_views(B, data.views.shape[1], gen, device) for gen in gens])
        phi = data.views[rows, which].float()
    u = torch.stack([draw_noise(B, phi.shape[-1], gen, device) for gen in gens])
    return phi, data.labels[rows], u


@torch.no_grad()
def _sgd_update(state: _GridState, grads, step: int, milestones: tuple[int, ...], momentum: float) -> None:
    """``torch.optim.SGD`` (momentum, weight decay added to the gradient) on every live run at once."""
    G, H = state.lr.shape
    step_lr = lr_at(step, state.lr, milestones) * ~state.diverged
    for t, grad, buf, mask in zip(state.params, grads, state.bufs, state.masks):
        shape = (G, H) + (1,) * (t.dim() - 2)
        d_p = grad + state.wd.view(shape) * t
        if step == 0:
            buf.copy_(d_p)  # torch.optim.SGD starts the momentum buffer at the first gradient
        else:
            buf.mul_(momentum).add_(d_p)
        update = step_lr.view(shape) * buf
        if mask is not None:
            update = update * mask
        t.sub_(update)


def train_linear_grid(data: LinearData, groups: list[Group], config: LinearGridConfig = LinearGridConfig(),
                      on_eval: Callable[[EvalPoint], None] | None = None,
                      on_step: Callable[[int], None] | None = None):
    """Train every run of ``groups`` (same grid points in every group) as one stacked computation.

    Returns the final parameters ``(v, V, b)`` of shape (G, H, ...).
    ``on_eval`` receives an :class:`EvalPoint` at every evaluation step,
    ``on_step`` the step number after every step.
    """
    if not groups:
        raise LinftError("the grid is empty: give at least one held-out domain, seed and grid point")
    if any(g.points != groups[0].points for g in groups):
        raise LinftError("every group of one call must have the same grid points")
    for p in groups[0].points:
        check_dropout_rate(p.dropout)
    state = _initial_state(data, groups, config)
    v, V, b = state.params
    G, H, C = len(groups), len(groups[0].points), data.num_classes
    milestones, evals = config.milestone_steps(), set(eval_steps(config.steps, config.eval_every))
    seed_split = torch.stack([data.split_rows[g.seed] for g in groups])  # (G, N)
    totals = np.stack([np.bincount(data.split_rows[g.seed][data.split_rows[g.seed] >= 0].cpu().numpy(),
                                   minlength=data.num_splits) for g in groups])
    for step in range(config.steps):
        phi, y, u = _draw_step(data, groups, state, config.batch_size)
        B = phi.shape[1]
        logits = _train_logits(phi, u, v, V, b, state.rate_groups)  # (G, H, B, C)
        loss = F.cross_entropy(logits.reshape(G * H * B, C), y[:, None, :].expand(G, H, B).reshape(-1),
                               reduction="none").view(G, H, B).mean(-1)
        state.diverged |= ~torch.isfinite(loss)
        live = ~state.diverged
        grads = torch.autograd.grad(loss[live].sum(), state.params, allow_unused=False) if live.any() \
            else [torch.zeros_like(t) for t in state.params]
        _sgd_update(state, grads, step, milestones, config.momentum)
        if on_step is not None:
            on_step(step)
        if step in evals and on_eval is not None:
            correct = _evaluate(data.features, data.labels, seed_split, v.detach(), V.detach(), b.detach(),
                                data.num_splits, config.eval_chunk)
            on_eval(EvalPoint(step=step, correct=correct, total=totals, loss=loss.detach().cpu().numpy(),
                              diverged=state.diverged.cpu().numpy(), final=step == config.steps - 1))
    return v.detach(), V.detach(), b.detach()


def _train_logits(phi, u, v, V, b, rate_groups):
    """Training logits (G, H, B, C) of every run, with each run's dropout mask.

    ``V · (m ⊙ Σ_k v_k ⊙ φ_k) / (1-λ) = Σ_k (V ⊙ v_k) · (m ⊙ φ_k) / (1-λ)``: the
    mask ``m = u ≥ λ`` depends only on the group's noise and the rate, so
    runs of one rate share the masked features and one batched matmul
    (B x K·D by K·D x H·C per group) serves them all. This avoids
    materialising a (G, H, B, D) adapted representation, which is what makes
    stacking runs pay off on a CPU.
    """
    G, B, K, D = phi.shape
    H, C = V.shape[1], V.shape[2]
    W = (V.unsqueeze(3) * v.unsqueeze(2)).reshape(G, H, C, K * D)  # (G, H, C, K·D)
    parts, order = [], []
    for rate, hidx in rate_groups:
        if rate > 0:
            psi = phi * ((u >= rate).unsqueeze(2) / (1.0 - rate))
        else:
            psi = phi
        Wr = W.index_select(1, hidx).reshape(G, len(hidx) * C, K * D)
        parts.append(torch.bmm(psi.reshape(G, B, K * D), Wr.transpose(1, 2)).view(G, B, len(hidx), C))
        order.append(hidx)
    logits = torch.cat(parts, 2) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        logits = logits.index_select(2, torch.argsort(torch.cat(order)))
    return logits.permute(0, 2, 1, 3) + b[:, :, None, :]


def _evaluate(features, labels, seed_split, v, V, b, num_splits, chunk):
    """Correct counts (G, H, S) of every run on every split, without dropout.

    Uses ``logits = Σ_k φ_k (V ⊙ v_k)^T + b`` so that one matmul per chunk of
    rows serves all runs.
    """
    G, H, K, D = v.shape
    C = V.shape[2]
    W = (V[:, :, None, :, :] * v[:, :, :, None, :])  # (G, H, K, C, D)
    W = W.permute(2, 4, 0, 1, 3).reshape(K * D, G * H * C)
    correct = torch.zeros(G, H, num_splits, device=features.device, dtype=torch.float64)
    N = features.shape[0]
    for a in range(0, N, chunk):
        phi = features[a:a + chunk].float().reshape(-1, K * D)
        logits = (phi @ W).view(-1, G, H, C) + b
        right = (logits.argmax(-1) == labels[a:a + chunk, None, None]).double()  # (n, G, H)
        split = seed_split[:, a:a + chunk]  # (G, n)
        onehot = F.one_hot(split.clamp(min=0), num_splits).double() * (split >= 0)[..., None]  # (G, n, S)
        correct += torch.einsum("ngh,gns->ghs", right, onehot)
    return correct.round().long().cpu().numpy()

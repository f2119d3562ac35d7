"""Linear fine-tuning from the feature cache (the paper's Section 4.3), trained over a whole grid at once.

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

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from linft.data import seed_hash
from linft.errors import LinftError
from linft.features import FeatureCache, open_cache, resolve_device
from linft.progress import progress_bar
from linft.protocol import domain_split_rows
from linft.records import RECORDS_FILE, RecordWriter, finished_run_ids, run_id

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


def lr_at(step: int, base_lr, milestones: tuple[int, ...]):
    """Learning rate at ``step``: ``base_lr`` divided by 10 at each milestone reached."""
    return base_lr * 0.1 ** sum(step >= m for m in milestones)


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """DomainBed's evaluation steps: every ``eval_every`` steps from 0, and the last step."""
    return sorted(set(range(0, steps, eval_every)) | {steps - 1})


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
        return tuple(int(round(m * self.steps)) for m in self.lr_milestones)


def train_linear_grid(
    features: torch.Tensor,
    labels: torch.Tensor,
    split_rows: dict[int, torch.Tensor],
    num_splits: int,
    groups: list[Group],
    num_classes: int,
    config: LinearGridConfig = LinearGridConfig(),
    on_eval: Callable[[EvalPoint], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    views: torch.Tensor | None = None,
):
    """Train every run of ``groups`` (same grid points in every group) as one stacked computation.

    ``features`` (N, K, D) on the target device (any float dtype; the math is
    float32), ``labels`` (N,), ``split_rows[seed]`` (N,) the split id of each
    row for that trial seed (-1: in no split). Returns the final parameters
    ``(v, V, b)`` of shape (G, H, ...). ``on_eval`` receives an :class:`EvalPoint`.
    """
    if not groups:
        raise LinftError("the grid is empty: give at least one held-out domain, seed and grid point")
    points = groups[0].points
    if any(g.points != points for g in groups):
        raise LinftError("every group of one call must have the same grid points")
    for p in points:
        if not 0.0 <= p.dropout < 1.0:
            raise LinftError(f"dropout rate {p.dropout} is outside [0, 1)")
    device = features.device
    N, K, D = features.shape
    G, H, C = len(groups), len(points), num_classes
    f32 = dict(device=device, dtype=torch.float32)

    lr = torch.tensor([p.lr for p in points], **f32).expand(G, H)
    wd = torch.tensor([p.weight_decay for p in points], **f32).expand(G, H)
    rates = sorted({p.dropout for p in points})
    rate_groups = [(r, torch.tensor([h for h, p in enumerate(points) if p.dropout == r], device=device))
                   for r in rates]
    train_v = torch.tensor([0.0 if p.probe else 1.0 for p in points], **f32).view(1, H, 1, 1).expand(G, H, 1, 1)

    v = torch.empty(G, H, K, D, **f32)
    V = torch.empty(G, H, C, D, **f32)
    b = torch.empty(G, H, C, **f32)
    batch_gens = []
    for gi, g in enumerate(groups):
        for hi, p in enumerate(points):
            gen = group_generator(g.seed, g.test_domain, "init", device)  # same init for every point of a group
            v[gi, hi], V[gi, hi], b[gi, hi] = initial_parameters(K, D, C, gen, config.v_init, p.probe, device)
        batch_gens.append(group_generator(g.seed, g.test_domain, "batches", device))
    params = [v, V, b]
    for t in params:
        t.requires_grad_(True)
    bufs = [torch.zeros_like(t) for t in params]
    masks = [train_v, None, None]  # probe runs keep v fixed
    diverged = torch.zeros(G, H, dtype=torch.bool, device=device)
    milestones = config.milestone_steps()
    evals = set(eval_steps(config.steps, config.eval_every))
    seed_split = torch.stack([split_rows[g.seed] for g in groups])  # (G, N)
    totals = np.stack([np.bincount(split_rows[g.seed][split_rows[g.seed] >= 0].cpu().numpy(), minlength=num_splits)
                       for g in groups])

    for step in range(config.steps):
        rows = torch.stack([draw_batch(g.train_pools, config.batch_size, gen) for g, gen in zip(groups, batch_gens)])
        B = rows.shape[1]
        if views is None:
            phi = features[rows].float()  # (G, B, K, D)
        else:
            which = torch.stack([draw_views(B, views.shape[1], gen, device) for gen in batch_gens])
            phi = views[rows, which].float()
        y = labels[rows]  # (G, B)
        u = torch.stack([draw_noise(B, D, gen, device) for gen in batch_gens])  # (G, B, D)
        logits = _train_logits(phi, u, v, V, b, rate_groups)  # (G, H, B, C)
        loss = F.cross_entropy(logits.reshape(G * H * B, C), y[:, None, :].expand(G, H, B).reshape(-1),
                               reduction="none").view(G, H, B).mean(-1)
        finite = torch.isfinite(loss)
        diverged |= ~finite
        live = ~diverged
        grads = torch.autograd.grad(loss[live].sum(), params, allow_unused=False) if live.any() \
            else [torch.zeros_like(t) for t in params]
        with torch.no_grad():
            step_lr = lr_at(step, lr, milestones) * live
            for t, grad, buf, mask in zip(params, grads, bufs, masks):
                shape = (G, H) + (1,) * (t.dim() - 2)
                d_p = grad + wd.view(shape) * t
                if step == 0:
                    buf.copy_(d_p)  # torch.optim.SGD starts the momentum buffer at the first gradient
                else:
                    buf.mul_(config.momentum).add_(d_p)
                update = step_lr.view(shape) * buf
                if mask is not None:
                    update = update * mask
                t.sub_(update)
        if on_step is not None:
            on_step(step)
        if step in evals:
            correct = _evaluate(features, labels, seed_split, v.detach(), V.detach(), b.detach(), num_splits,
                                config.eval_chunk)
            if on_eval is not None:
                on_eval(EvalPoint(step=step, correct=correct, total=totals, loss=loss.detach().cpu().numpy(),
                                  diverged=diverged.cpu().numpy(), final=step == config.steps - 1))
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


# --------------------------------------------------------------------------- the protocol driver


@dataclass
class LinearProtocolResult:
    """Where the records went and how many runs were trained or found finished."""

    records: Path
    trained: int
    skipped: int
    diverged: int


def linear_method(probe: bool) -> str:
    return "linear-probe" if probe else "linear-ft"


def linear_label(point: GridPoint) -> str:
    """The unit a report compares: linear probing, or linear fine-tuning at one dropout rate."""
    return "linear probe" if point.probe else f"linear FT, dropout {point.dropout:g}"


def train_linear(
    cache,
    out_dir,
    *,
    dropouts=(0.9,),
    probe: bool = False,
    lrs=(1e-3, 5e-4),
    weight_decays=(1e-4, 5e-5, 1e-5),
    seeds: int = 3,
    test_domains=None,
    config: LinearGridConfig | None = None,
    device="auto",
    progress: bool = True,
) -> LinearProtocolResult:
    """Run the leave-one-domain-out protocol of linear fine-tuning (and/or probing) from a feature cache.

    Every held-out domain x seed x lr x weight decay x dropout rate (plus the
    probe runs when ``probe``) is trained; records are appended to
    ``out_dir/records.jsonl`` as evaluations happen. Runs already finished in
    that file are skipped, so re-running the same call completes only what
    is missing. ``cache`` is a path or a :class:`~linft.features.FeatureCache`.
    """
    config = config or LinearGridConfig()
    cache = cache if isinstance(cache, FeatureCache) else open_cache(cache)
    names = cache.domain_names
    if len(names) < 2:
        raise LinftError(f"{cache.path} has {len(names)} domain; leave-one-domain-out needs at least 2")
    if test_domains is None or len(test_domains) == 0:
        test_idx = list(range(len(names)))
    else:
        unknown = [d for d in test_domains if d not in names]
        if unknown:
            raise LinftError(f"held-out domain {', '.join(map(repr, unknown))} is not in the cache; "
                             f"choose from {', '.join(names)}")
        test_idx = [names.index(d) for d in test_domains]
    for p in dropouts:
        if not 0.0 <= float(p) < 1.0:
            raise LinftError(f"dropout rate {p} is outside [0, 1); use e.g. 0.9")
    if seeds < 1 or not lrs or not weight_decays or (not dropouts and not probe):
        raise LinftError("the grid is empty: give at least one seed, lr, weight decay and dropout rate (or --probe)")
    if config.steps < 1 or config.eval_every < 1 or config.batch_size < 1:
        raise LinftError("--steps, --batch-size and the evaluation interval must be at least 1")
    if config.v_init not in V_INITS:
        raise LinftError(f"unknown v init '{config.v_init}'; use one of {', '.join(V_INITS)}")

    points = [GridPoint(float(lr), float(wd), float(p)) for p in dropouts for lr in lrs for wd in weight_decays]
    if probe:
        points += [GridPoint(float(lr), float(wd), 0.0, True) for lr in lrs for wd in weight_decays]

    dev = resolve_device(device)
    num_views = 0 if cache.views is None else int(cache.views.shape[1])
    out_dir = Path(out_dir)
    records_path = out_dir / RECORDS_FILE
    done = finished_run_ids([records_path])
    provenance = cache.provenance_sha256

    def hparams(p: GridPoint) -> dict:
        return {"lr": p.lr, "weight_decay": p.weight_decay, "dropout": p.dropout, "probe": p.probe,
                "v_init": "last" if p.probe else config.v_init, "batch_size": config.batch_size,
                "steps": config.steps, "eval_every": config.eval_every, "momentum": config.momentum,
                "lr_milestones": list(config.milestone_steps()), "train_views": num_views}

    def rid(e: int, s: int, p: GridPoint) -> str:
        return run_id(method=linear_method(p.probe), source=provenance, test_domain=names[e], hparams=hparams(p), seed=s)

    # which runs remain, bucketed by their list of grid points (one engine call per bucket)
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    skipped = 0
    for e in test_idx:
        for s in range(seeds):
            todo = tuple(p for p in points if rid(e, s, p) not in done)
            skipped += len(points) - len(todo)
            if todo:
                buckets.setdefault(todo, []).append((e, s))
    trained = sum(len(k) * len(v) for k, v in buckets.items())
    if not buckets:
        return LinearProtocolResult(records_path, 0, skipped, 0)

    features = torch.from_numpy(cache.features).to(dev)
    views = torch.from_numpy(cache.views).to(dev) if num_views else None
    labels = torch.from_numpy(cache.labels).to(dev)
    split_names = [f"{d}_{part}" for d in names for part in ("in", "out")]
    split_rows, rows_by_seed = {}, {}
    for s in range(seeds):
        rows_by_seed[s] = domain_split_rows(cache.domains, len(names), s, cache.valid)
        ids = np.full(len(cache.labels), -1, dtype=np.int64)
        for (d, part), rows in rows_by_seed[s].items():
            ids[rows] = 2 * d + (part == "out")
        split_rows[s] = torch.from_numpy(ids).to(dev)
    attempt = uuid.uuid4().hex[:12]
    diverged_runs = 0
    total_steps = config.steps * len(buckets)

    with RecordWriter(records_path) as writer, \
            progress_bar(total_steps, "training", unit="step", enabled=progress) as update:
        for bucket_points, pairs in buckets.items():
            groups = []
            for e, s in pairs:
                train = [d for d in range(len(names)) if d != e]
                pools = [torch.from_numpy(rows_by_seed[s][(d, "in")]).to(dev) for d in train]
                small = [names[d] for d in train if len(rows_by_seed[s][(d, "in")]) == 0
                         or len(rows_by_seed[s][(d, "out")]) == 0]
                if small:
                    raise LinftError(f"domain {', '.join(small)} has an empty 'in' or 'out' split (20% held out); "
                                     f"each training domain needs at least 5 valid images")
                groups.append(Group(e, s, pools, list(bucket_points)))
            flagged: set[tuple[int, int]] = set()

            def on_eval(ev: EvalPoint, groups=groups, bucket_points=bucket_points, flagged=flagged):
                nonlocal diverged_runs
                for gi, g in enumerate(groups):
                    for hi, p in enumerate(bucket_points):
                        if (gi, hi) in flagged:
                            continue
                        is_div = bool(ev.diverged[gi, hi])
                        if is_div:
                            flagged.add((gi, hi))
                            diverged_runs += 1
                        writer.write({
                            "method": linear_method(p.probe), "label": linear_label(p),
                            "dataset": cache.meta.get("dataset_name"), "cache": str(cache.path),
                            "cache_provenance": provenance,
                            "backbone": cache.meta.get("backbone"), "weights": cache.meta.get("weights"),
                            "test_domain": names[g.test_domain],
                            "train_domains": [names[d] for d in range(len(names)) if d != g.test_domain],
                            "hparams": hparams(p), "grid": {"lr": p.lr, "weight_decay": p.weight_decay},
                            "seed": g.seed, "run_id": rid(g.test_domain, g.seed, p), "attempt": attempt,
                            "step": ev.step,
                            "splits": {n: [int(ev.correct[gi, hi, si]), int(ev.total[gi, si])]
                                       for si, n in enumerate(split_names)},
                            "loss": float(ev.loss[gi, hi]) if not is_div else None,
                            "status": "diverged" if is_div else "ok",
                            "final": ev.final or is_div,
                        })

            train_linear_grid(features, labels, split_rows, len(split_names), groups, len(cache.class_names),
                              config, on_eval=on_eval, on_step=lambda step: update(1), views=views)
    return LinearProtocolResult(records_path, trained, skipped, diverged_runs)

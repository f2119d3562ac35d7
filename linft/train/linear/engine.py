"""The linear fine-tuning engine: the paper's linear model (Section 4.3) trained over a whole grid at once.

The model and its initialisation are :mod:`linft.train.linear.model`.

:func:`train_linear_grid` trains every (held-out domain, seed) *group* times
every grid point (lr, weight decay, dropout, probe) as stacked tensors of
shape (G, H, ...), in blocks (:mod:`linft.train.linear.step`): on a CPU the
dropout runs take the compiled sparse step (:mod:`linft._kernels.sparse_step`,
only the kept (row, unit) pairs), the others the pure-torch step; on CUDA the
torch step, captured once as a CUDA graph. Each run follows the protocol
exactly as a plain ``torch.optim.SGD`` loop would (momentum 0.9, weight decay
added to the gradient, lr ÷10 at the milestones, 32 examples per training
domain drawn with replacement from the "in" splits, evaluation every
``eval_every`` steps and at the last step). Runs of one group share their
batches, dropout noise and initialisation, as in the official code (runs
with the same seed see the same batches whatever their lr and weight decay);
the draws are hashes of (group, step, row, unit) (:mod:`linft.train.linear.draws`),
so masks are nested across dropout rates. A training array left in the cache
file (:class:`~linft.cache.chunks.H5Rows`) is read a window of steps at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from linft.cache.chunks import H5Rows, window_steps
from linft.errors import LinftError
from linft.protocol.grid import GridPoint, check_dropout_rate
from linft.protocol.schedule import Schedule, eval_steps, lr_at
from linft.train.linear.draws import (NOISE, ROWS, VIEWS, draw_rows, draw_views, group_key, padded_pools, row_words,
                                      unit_noise)
from linft.train.linear.evaluate import EVAL_FORMS, evaluate_grid
from linft.train.linear.model import V_INITS, group_generator, initial_parameters
from linft.train.linear.step import RunBlock, kernel_step, new_block, torch_step
from linft._kernels.sparse_step import MAX_KERNEL_DIM, load_kernel, warn_fallback

STEP_KINDS = ("auto", "sparse", "torch")
#: eager steps before a CUDA graph of the step is captured
GRAPH_WARMUP = 3


# --------------------------------------------------------------------------- runs and streams


@dataclass
class Group:
    """One (held-out domain, seed): its training pools, its random stream, and its grid points."""

    test_domain: int
    seed: int
    train_pools: list[torch.Tensor]  # global row indices of each training domain's "in" split
    points: list[GridPoint]


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


@dataclass(frozen=True)
class LinearGridConfig(Schedule):
    """Protocol settings shared by every run of a grid: the :class:`~linft.protocol.schedule.Schedule` (the paper's
    by default), and how the engine computes."""

    v_init: str = "last"
    eval_chunk: int = 4096
    # "sparse": the compiled sparse step (CPU), "torch": the pure-torch step, "auto": sparse when available
    step_kind: str = "auto"
    eval_form: str = "auto"  # see linft.train.linear.evaluate
    cuda_graph: bool = True  # on CUDA, capture the step once and replay it
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """One-line errors for settings that cannot run."""
        super().check()
        if self.eval_chunk < 1:
            raise LinftError(f"eval_chunk must be at least 1, got {self.eval_chunk}", param="eval_chunk")
        if self.v_init not in V_INITS:
            raise LinftError(f"unknown v init '{self.v_init}'; use one of {', '.join(V_INITS)}")
        if self.step_kind not in STEP_KINDS:
            raise LinftError(f"unknown step kind '{self.step_kind}'; use one of {', '.join(STEP_KINDS)}",
                             param="step_kind")
        if self.eval_form not in EVAL_FORMS:
            raise LinftError(f"unknown evaluation form '{self.eval_form}'; use one of {', '.join(EVAL_FORMS)}",
                             param="eval_form")


@dataclass
class LinearData:
    """What the engine trains on, on the training device: the cache's tensors and each seed's split of its rows."""

    features: torch.Tensor  # (N, K, D), any float dtype (the math is float32)
    labels: torch.Tensor  # (N,)
    split_rows: dict[int, torch.Tensor]  # seed -> (N,) split id of each row (-1: in no split)
    num_splits: int
    num_classes: int
    views: torch.Tensor | None = None  # (N, V, K, D) augmented views: one is drawn per row and step
    #: bytes that the rows read from the file for a window of steps may take, when the training array (views, else
    #: features) is an :class:`~linft.cache.chunks.H5Rows` left in the file, and that an evaluation's chunk of rows
    #: (with its float32 copy and logits) may take (None: no limit)
    stream_budget: int | None = None

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @property
    def train_array(self):
        """What a step reads its rows from: the views when there are, else the features."""
        return self.features if self.views is None else self.views


# --------------------------------------------------------------------------- the engine


def _initial_blocks(data: LinearData, groups: list[Group], config: LinearGridConfig) -> list[RunBlock]:
    """The grid's runs as blocks: the dropout runs for the compiled sparse step (when it is used), the others for
    the torch step. Every grid point of a group starts from the same V, b (and v, probes aside)."""
    points, dev = groups[0].points, data.device
    _, K, D = data.features.shape
    C = data.num_classes
    kernel = _kernel_for(data, config)
    sparse = sorted((h for h, p in enumerate(points) if takes_compiled_step(p)),
                    key=lambda h: points[h].dropout) if kernel is not None else []
    rest = sorted((h for h in range(len(points)) if h not in sparse), key=lambda h: points[h].dropout)
    parts = [(sparse, kernel), (rest, None)]
    inits = []
    for g in groups:
        inits.append({probe: initial_parameters(K, D, C, group_generator(g.seed, g.test_domain, "init", dev),
                                                config.v_init, probe, dev) for probe in (False, True)})
    blocks = []
    for hs, kern in parts:
        if not hs:
            continue
        init = [torch.stack([torch.stack([inits[gi][points[h].probe][t] for h in hs]) for gi in range(len(groups))])
                for t in range(3)]
        blocks.append(new_block(hs, [points[h].dropout for h in hs], [points[h].lr for h in hs],
                                [points[h].weight_decay for h in hs], [points[h].probe for h in hs], init, kern))
    return blocks


def takes_compiled_step(point: GridPoint) -> bool:
    """Whether a grid point trains with the compiled sparse step where it is used: dropout runs; probes and
    dropout 0 take the torch step (a dense GEMM is the right tool there)."""
    return point.dropout > 0 and not point.probe


def compiled_step_used(data: LinearData, config: LinearGridConfig) -> bool:
    """Whether the compiled sparse step is used on ``data`` under ``config`` (for :func:`takes_compiled_step`
    points)."""
    return _kernel_for(data, config) is not None


def step_name(point: GridPoint, compiled: bool) -> str:
    """The step that trains ``point``, as records name it: ``compiled sparse step`` or ``torch step``."""
    return "compiled sparse step" if compiled and takes_compiled_step(point) else "torch step"


def _kernel_for(data: LinearData, config: LinearGridConfig):
    """The compiled sparse step when ``config.step_kind`` asks for it and the data allow it, else None."""
    if config.step_kind == "torch":
        return None
    source = data.train_array
    usable = (source.dtype in (torch.float16, torch.float32) and source.shape[-1] <= MAX_KERNEL_DIM
              and (isinstance(source, H5Rows) or source.is_contiguous()))
    kernel, why = load_kernel() if data.device.type == "cpu" else (None, "it runs on the CPU only")
    if config.step_kind == "sparse" and (kernel is None or not usable):
        why = why or (f"features of dtype {source.dtype} and dimension {source.shape[-1]} (float16 or float32 "
                      f"contiguous, at most {MAX_KERNEL_DIM} units needed)")
        raise LinftError(f"the compiled sparse step is not available: {why}; use step kind auto or torch")
    if kernel is None and data.device.type == "cpu":
        warn_fallback(why)  # once per process
    return kernel if usable else None


@dataclass
class _Draws:
    """The group keys and padded training pools from which every step's rows and masks are drawn."""

    keys: torch.Tensor  # (G,)
    pools: torch.Tensor  # (G, T, P)
    sizes: torch.Tensor  # (G, T)


def _batch_rows(draws: _Draws, step, batch_size: int) -> torch.Tensor:
    return draw_rows(draws.pools, draws.sizes, row_words(draws.keys, step, ROWS, draws.pools.shape[1] * batch_size),
                     batch_size)


class _Window:
    """The rows of the next steps read from a training array left in the file: one sorted read serves as many
    steps as ``data.stream_budget`` allows (the draws are a function of the step, so they are known ahead)."""

    def __init__(self, data: LinearData, draws: _Draws, config: LinearGridConfig):
        self.data, self.draws, self.config = data, draws, config
        src = data.train_array
        G, T = draws.sizes.shape
        self.steps = window_steps(G * T * config.batch_size, int(np.prod(src.shape[1:])) * src.dtype.itemsize,
                                  data.stream_budget, config.steps)
        self.end = 0
        self.rows = self.table = None

    def __call__(self, step: int):
        """(sorted global rows, their data) covering ``step``."""
        if step >= self.end:
            self.table = None  # free the last window before reading the next
            steps = range(step, min(step + self.steps, self.config.steps))
            drawn = torch.cat([_batch_rows(self.draws, s, self.config.batch_size).flatten() for s in steps])
            self.rows = torch.unique(drawn)  # sorted
            self.table = torch.from_numpy(self.data.train_array.take(self.rows.cpu().numpy())).to(self.data.device)
            self.end = steps.stop
        return self.rows, self.table


def _step_draws(data: LinearData, draws: _Draws, config: LinearGridConfig, step: torch.Tensor):
    """The draws of a step (``step`` 0-dim) or of S steps at once (``step`` (S, 1)): batch rows, their labels,
    their views (None without views) and noise words, each (G, B) or (S, G, B)."""
    B = draws.pools.shape[1] * config.batch_size
    rows = _batch_rows(draws, step, config.batch_size)
    which = None if data.views is None else draw_views(row_words(draws.keys, step, VIEWS, B), data.views.shape[1])
    return rows, data.labels[rows].long(), which, row_words(draws.keys, step, NOISE, B)


#: steps whose draws are made at once on a CPU (fewer small tensor operations per step)
DRAW_STEPS = 64


def _step(data: LinearData, draws: _Draws, blocks: list[RunBlock], config: LinearGridConfig,
          step: torch.Tensor, lr_factor: torch.Tensor, window=None, drawn=None) -> None:
    """One training step of every run: the step's rows, views and masks, then each block's step.

    ``step`` and ``lr_factor`` are 0-dim tensors on the device, so that a captured CUDA graph replays any step;
    ``window`` is the (rows, data) of a :class:`_Window` when the training array is read from the file; ``drawn``
    the step's :func:`_step_draws` when they were made ahead.
    """
    rows, y, which, words = _step_draws(data, draws, config, step) if drawn is None else drawn
    source, at = (data.train_array, rows) if window is None else (window[1], torch.searchsorted(window[0], rows))
    phi = noise = None
    for block in blocks:
        lr = block.lr * lr_factor
        if block.kernel is not None:
            K, D = source.shape[-2:]
            offs = at * (K * D) if which is None else (at * source.shape[1] + which) * (K * D)
            kernel_step(block, source, offs, y, words, lr, config.momentum)
            continue
        if phi is None:
            phi = (source[at] if which is None else source[at, which]).float()
        if block.masked and noise is None:
            noise = unit_noise(words, phi.shape[-1])
        torch_step(block, phi, y, noise if block.masked else None, lr, config.momentum)


class _Stepper:
    """Runs :func:`_step`; on CUDA (``config.cuda_graph``) the step is captured once as a CUDA graph after
    :data:`GRAPH_WARMUP` eager steps and replayed for every later step (the step has no host synchronisation);
    otherwise the draws of :data:`DRAW_STEPS` steps are made at once."""

    def __init__(self, data: LinearData, draws: _Draws, blocks: list[RunBlock], config: LinearGridConfig):
        self.args = (data, draws, blocks, config)
        dev = data.device
        self.step = torch.zeros((), dtype=torch.long, device=dev)
        self.lr_factor = torch.ones((), device=dev)
        self.window = _Window(data, draws, config) if isinstance(data.train_array, H5Rows) else None
        self.capture = dev.type == "cuda" and config.cuda_graph and self.window is None
        self.graph = None
        self.ahead, self.ahead_from = None, 0

    def _drawn(self, step: int):
        """The draws of ``step``, made :data:`DRAW_STEPS` steps at a time (the same values as one at a time)."""
        data, draws, _, config = self.args
        if self.ahead is None or not self.ahead_from <= step < self.ahead_from + len(self.ahead[0]):
            steps = torch.arange(step, min(step + DRAW_STEPS, config.steps), device=data.device)[:, None]
            self.ahead, self.ahead_from = _step_draws(data, draws, config, steps), step
        j = step - self.ahead_from
        return tuple(None if t is None else t[j] for t in self.ahead)

    def __call__(self, step: int, lr_factor: float) -> None:
        self.step.fill_(step)
        self.lr_factor.fill_(lr_factor)
        if self.window is not None:
            _step(*self.args, self.step, self.lr_factor, self.window(step))
        elif not self.capture:
            _step(*self.args, self.step, self.lr_factor, drawn=self._drawn(step))
        elif self.graph is not None:
            self.graph.replay()
        elif step >= GRAPH_WARMUP:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                _step(*self.args, self.step, self.lr_factor)
            self.graph.replay()
        else:  # warm-up steps on a side stream, as CUDA graph capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _step(*self.args, self.step, self.lr_factor)
            torch.cuda.current_stream().wait_stream(side)


def _grid_tensors(blocks: list[RunBlock], num_classes: int):
    """``v`` (G, H, K, D), ``Vt`` (G, H, D, C), ``b``, loss and live (G, H) in the groups' grid-point order."""
    order = torch.tensor([h for blk in blocks for h in blk.points])
    inv = torch.argsort(order).to(blocks[0].live.device)
    cat = lambda ts: torch.cat(ts, 1).index_select(1, inv)
    models = [blk.model(num_classes) for blk in blocks]
    return (*(cat([m[i] for m in models]) for i in range(3)),
            cat([blk.loss[:, :len(blk.points)] for blk in blocks]),
            cat([blk.live[:, :len(blk.points)] for blk in blocks]))


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
    config.check()
    dev = data.device
    blocks = _initial_blocks(data, groups, config)
    pools, sizes = padded_pools([g.train_pools for g in groups], dev)
    draws = _Draws(torch.tensor([group_key(g.seed, g.test_domain) for g in groups], device=dev), pools, sizes)
    milestones, evals = config.milestone_steps(), set(eval_steps(config.steps, config.eval_every))
    seed_split = torch.stack([data.split_rows[g.seed] for g in groups])  # (G, N)
    totals = np.stack([np.bincount(data.split_rows[g.seed][data.split_rows[g.seed] >= 0].cpu().numpy(),
                                   minlength=data.num_splits) for g in groups])
    stepper = _Stepper(data, draws, blocks, config)
    for step in range(config.steps):
        stepper(step, lr_at(step, 1.0, milestones))
        if on_step is not None:
            on_step(step)
        if step in evals and on_eval is not None:
            v, Vt, b, loss, live = _grid_tensors(blocks, data.num_classes)
            correct = evaluate_grid(data.features, data.labels, seed_split, v, Vt, b, data.num_splits,
                                    config.eval_chunk, config.eval_form, data.stream_budget)
            on_eval(EvalPoint(step=step, correct=correct, total=totals, loss=loss.cpu().numpy(),
                              diverged=(~live).cpu().numpy(), final=step == config.steps - 1))
    v, Vt, b, _, _ = _grid_tensors(blocks, data.num_classes)
    return v, Vt.transpose(-1, -2).contiguous(), b

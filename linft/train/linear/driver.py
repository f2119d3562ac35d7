"""The linear fine-tuning protocol from a feature cache: every held-out domain × seed × grid point, as records.

:func:`train_linear` turns a cache and a :class:`LinearGrid` into engine calls
(:func:`linft.train.linear.engine.train_linear_grid`, one per set of runs that
still need the same grid points) and writes one record per run and evaluation
(:func:`linft.protocol.records.make_record`). Finished runs are skipped by the
one rule of :func:`linft.protocol.records.final_records`.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from linft.cache.chunks import H5Rows, in_memory_bytes, memory_budget_bytes, open_cache_within
from linft.cache.format import FeatureCache
from linft.data.folders import check_output_apart
from linft.data.splits import check_split_seed, check_training_splits, domain_split_rows, split_names, split_seed
from linft.errors import LinftError
from linft.locks import output_lock
from linft.protocol.grid import Grid
from linft.protocol.identity import RunHeader, new_keys_unless_default, run_header, run_id
from linft.protocol.records import RecordWriter, existing_records, final_records, finals_of, make_record
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.protocol.sinks import TensorBoardSink
from linft.output import progress_bar
from linft.runtime import resolve_device
from linft.train.linear.engine import (EvalPoint, GridPoint, Group, LinearData, LinearGridConfig, compiled_step_used,
                                       step_name, train_linear_grid)
from linft.train.sweeps.folder import SweepFolder
from linft.train.sweeps.plan import plan_entry, write_plan
from linft.train.sweeps.status import divergence_note


@dataclass(frozen=True)
class LinearGrid(Grid):
    """The runs of the linear protocol: a :class:`~linft.protocol.grid.Grid` (the paper's lr × weight decay and
    seeds) at dropout 0.9 by default, and the data split of its seeds."""

    dropouts: tuple = (0.9,)
    split_seed: int | None = None  # one data split for every seed (0: the official code's); None: each seed its own


@dataclass
class LinearProtocolResult:
    """Where the records went and how many runs were trained or found finished.

    ``diverged`` counts the runs of this call that diverged; ``usable`` the runs of the grid (trained now or
    before) whose final record is ``ok``; ``divergence`` is one line on the grid's diverged runs (how many, at
    which hyper-parameters; None when none did).
    """

    records: Path
    trained: int
    skipped: int
    diverged: int
    usable: int = 0
    divergence: str | None = None


def default_linear_out(cache_path) -> Path:
    """Where ``linft train-linear`` writes when not told: ``runs/linear/<cache file stem>``."""
    return Path("runs") / "linear" / Path(cache_path).stem


def linear_method(probe: bool) -> str:
    return "linear-probe" if probe else "linear-ft"


def linear_label(point: GridPoint, split_seed: int | None = None) -> str:
    """The unit a report compares: linear probing, or linear fine-tuning at one dropout rate (and the fixed split
    seed when one is set: runs on one split and on each seed's own split are never pooled)."""
    label = "linear probe" if point.probe else f"linear FT, dropout {point.dropout:g}"
    return label if split_seed is None else f"{label}, split seed {split_seed}"


@dataclass
class _Protocol:
    """The cache, the settings, and the record header of every run of the protocol."""

    cache: FeatureCache
    config: LinearGridConfig
    num_views: int
    split_seed: int | None = None
    memory_budget: int | None = None  # bytes of cached arrays in memory (linft.cache.chunks); None: no limit
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def hparams(self, p: GridPoint) -> dict:
        """Every hyper-parameter of a run (``split_seed`` only when set: earlier ids kept)."""
        c = self.config
        hparams = {"lr": p.lr, "weight_decay": p.weight_decay, "dropout": p.dropout, "probe": p.probe,
                   "v_init": "last" if p.probe else c.v_init, "batch_size": c.batch_size, "steps": c.steps,
                   "eval_every": c.eval_every, "momentum": c.momentum, "lr_milestones": list(c.milestone_steps()),
                   "train_views": self.num_views, "split_seed": self.split_seed}
        return new_keys_unless_default(hparams, {"split_seed": None})

    def run_id(self, e: int, s: int, p: GridPoint) -> str:
        return run_id(linear_method(p.probe), self.cache.provenance_sha256,
                      {"test_domain": self.cache.domain_names[e], "hparams": self.hparams(p), "seed": s})

    def header(self, e: int, s: int, p: GridPoint) -> RunHeader:
        names, meta = self.cache.domain_names, self.cache.meta
        return run_header(linear_method(p.probe), linear_label(p, self.split_seed), run_id=self.run_id(e, s, p),
                          source=self.cache.provenance_sha256, dataset=meta.get("dataset_name"),
                          backbone=meta.get("backbone"), weights=meta.get("weights"), test_domain=names[e],
                          train_domains=[names[d] for d in range(len(names)) if d != e], hparams=self.hparams(p),
                          grid={"lr": p.lr, "weight_decay": p.weight_decay}, seed=s, attempt=self.attempt,
                          extra={"cache": str(self.cache.path)})


def _buckets(protocol: _Protocol, test_idx: list[int], seeds: int, points: list[GridPoint], done: set[str]):
    """Runs still to do, as {grid points: [(held-out domain, seed), ...]} (one engine call each), and the skipped."""
    buckets: dict[tuple, list[tuple[int, int]]] = {}
    skipped = 0
    for e in test_idx:
        for s in range(seeds):
            todo = tuple(p for p in points if protocol.run_id(e, s, p) not in done)
            skipped += len(points) - len(todo)
            if todo:
                buckets.setdefault(todo, []).append((e, s))
    return buckets, skipped


def _on_device(array, dev):
    """An in-memory array as a tensor on ``dev``; an :class:`H5Rows` left in its file as it is."""
    return array if array is None or isinstance(array, H5Rows) else torch.from_numpy(array).to(dev)


def _linear_data(cache: FeatureCache, seeds: int, dev: torch.device, fixed_split: int | None = None,
                 memory_budget: int | None = None):
    """The engine's tensors on ``dev``, and the rows of every (domain, part) split per seed."""
    names = cache.domain_names
    split_rows, rows_by_seed = {}, {}
    for s in range(seeds):
        trial = split_seed(s, {"split_seed": fixed_split})
        rows_by_seed[s] = domain_split_rows(cache.domains, len(names), trial, cache.valid)
        ids = np.full(len(cache.labels), -1, dtype=np.int64)
        for (d, part), rows in rows_by_seed[s].items():
            ids[rows] = 2 * d + (part == "out")
        split_rows[s] = torch.from_numpy(ids).to(dev)
    data = LinearData(features=_on_device(cache.features, dev), labels=torch.from_numpy(cache.labels).to(dev),
                      split_rows=split_rows, num_splits=2 * len(names), num_classes=len(cache.class_names),
                      views=_on_device(cache.views, dev),
                      stream_budget=None if memory_budget is None else max(0, memory_budget - in_memory_bytes(cache)))
    return data, rows_by_seed


def _group(cache: FeatureCache, rows_by_seed: dict, e: int, s: int, points, dev) -> Group:
    names = cache.domain_names
    train = [d for d in range(len(names)) if d != e]
    check_training_splits(rows_by_seed[s], train, names)
    return Group(e, s, [torch.from_numpy(rows_by_seed[s][(d, "in")]).to(dev) for d in train], list(points))


def grid_eval_line(step: int, steps: int, records: list[dict], runs: int, diverged: int) -> str:
    """One line on a grid at one evaluation: training loss, best and median i.i.d. and o.o.d. accuracy over its
    runs that have not diverged, and how many diverged."""
    head = f"step {step} of {steps}: {runs} runs"
    if not records:
        return f"{head}, all diverged"
    iid, ood = [iid_accuracy(r) for r in records], [ood_accuracy(r) for r in records]
    return (f"{head}, loss median {np.median([r['loss'] for r in records]):.3g}, i.i.d. best {100 * max(iid):.1f}% "
            f"median {100 * np.median(iid):.1f}%, o.o.d. best {100 * max(ood):.1f}% median "
            f"{100 * np.median(ood):.1f}%, {diverged} diverged")


def _record_writer(writer: RecordWriter, protocol: _Protocol, groups: list[Group], counter: dict, compiled: bool,
                   say: Callable[[str], None] | None = None, prefix: str = ""):
    """The engine's ``on_eval``: one record per run, a run's records ending at its divergence, each naming the step
    that computed it (``compiled``: whether the dropout runs take the compiled sparse step; not in the run id);
    then one :func:`grid_eval_line` to ``say``."""
    names = split_names(protocol.cache.domain_names)
    flagged: set[tuple[int, int]] = set()
    runs = sum(len(g.points) for g in groups)

    def on_eval(ev: EvalPoint) -> None:
        written = []
        for gi, g in enumerate(groups):
            for hi, p in enumerate(g.points):
                if (gi, hi) in flagged:
                    continue
                is_div = bool(ev.diverged[gi, hi])
                if is_div:
                    flagged.add((gi, hi))
                    counter["diverged"] += 1
                splits = {n: [int(ev.correct[gi, hi, si]), int(ev.total[gi, si])] for si, n in enumerate(names)}
                header = protocol.header(g.test_domain, g.seed, p)
                header = replace(header, extra={**header.extra, "engine": step_name(p, compiled)})
                record = make_record(header, ev.step, splits,
                                     loss=None if is_div else float(ev.loss[gi, hi]),
                                     status="diverged" if is_div else "ok", final=ev.final or is_div)
                writer.write(record)
                if not is_div:
                    written.append(record)
        if say is not None:
            say(prefix + grid_eval_line(ev.step, protocol.config.steps, written, runs, len(flagged)))
    return on_eval


def _outcome(records_path: Path, grid_runs: dict[str, RunHeader]) -> tuple[int, str | None]:
    """The grid's usable runs (final record ``ok``) and the line on its diverged runs."""
    finals = final_records([records_path])
    ended = [finals[rid] for rid in grid_runs if rid in finals]
    diverged = [{"label": r["label"], **r["grid"]} for r in ended if r.get("status") == "diverged"]
    return len(ended) - len(diverged), divergence_note(diverged, len(grid_runs))


def check_one_source(records: list[dict], records_path: Path, cache: FeatureCache) -> None:
    """Refuse a records file that holds linear runs of another feature cache (before anything is trained).

    Runs of two caches in one file cannot be reported together; appending to such a file would leave the folder
    unusable for ``report`` and for re-runs. This happens after a forced extraction re-made the cache (new
    provenance) while ``out_dir`` kept the old folder.
    """
    linear = (r.get("source") for r in records if r.get("method") in ("linear-ft", "linear-probe"))
    others = set(linear) - {cache.provenance_sha256}
    if others:
        other = sorted(str(o) for o in others)[0]
        raise LinftError(f"{records_path} holds linear runs of another feature cache (source {other[:12]}, this "
                         f"cache {cache.provenance_sha256[:12]}: the cache was re-extracted or is another one); "
                         f"choose another out_dir, or move that folder away", param="out_dir")


def train_linear(cache, out_dir, grid: LinearGrid = LinearGrid(), config: LinearGridConfig | None = None, *,
                 device="auto", progress: bool = True, say: Callable[[str], None] | None = None,
                 tensorboard_dir=None, memory_budget: float | None = None, **grid_fields) -> LinearProtocolResult:
    """Run the leave-one-domain-out protocol of linear fine-tuning (and/or probing) from a feature cache.

    Every run of ``grid`` (whose fields ``grid_fields`` override:
    ``dropouts=(0, 0.9), probe=True``) is trained; records are appended to
    ``out_dir/records.jsonl`` as evaluations happen. Runs already finished in
    that file are skipped, so re-running the same call completes only what
    is missing. ``cache`` is a path or a :class:`~linft.cache.format.FeatureCache`.
    Every run of the grid is added to ``out_dir/planned.json`` (:mod:`linft.train.sweeps.status`).

    ``say`` receives one line per evaluation step (:func:`grid_eval_line`: a summary over the grid, not one
    line per run); ``tensorboard_dir`` also writes the records as TensorBoard event files
    (:class:`linft.protocol.sinks.TensorBoardSink`).

    ``memory_budget`` (bytes; None or +inf: no limit) bounds the cached features and views held in memory: what does not
    fit stays in the file and is read in chunks (:mod:`linft.cache.chunks`); training refuses in one line when one
    step's rows alone do not fit.
    """
    memory_budget = memory_budget_bytes(memory_budget)
    grid = LinearGrid(**{**asdict(grid), **grid_fields})
    config = config or LinearGridConfig()
    cache = cache if isinstance(cache, FeatureCache) else \
        open_cache_within(cache, memory_budget)
    check_output_apart(out_dir, [root] if (root := cache.meta.get("dataset_root")) else [], param="out_dir")
    names = cache.domain_names
    test_names = grid.check(names, usable=cache.usable_counts(), where="the cache")
    config.check()
    dev = resolve_device(device)
    sinks = [TensorBoardSink(tensorboard_dir)] if tensorboard_dir is not None else []
    check_split_seed(grid.split_seed)
    protocol = _Protocol(cache, config, 0 if cache.views is None else int(cache.views.shape[1]), grid.split_seed,
                         memory_budget)
    records_path = SweepFolder(out_dir).records
    with output_lock(out_dir, folder=True):  # creates the folder
        records = existing_records(records_path)  # read once: the source check and the runs already done
        check_one_source(records, records_path, cache)
        return _train_grid(cache, out_dir, grid, config, protocol, records_path, set(finals_of(records)), test_names,
                           dev, sinks, progress, say)


def _train_grid(cache: FeatureCache, out_dir, grid: LinearGrid, config: LinearGridConfig, protocol: _Protocol,
                records_path: Path, done: set[str], test_names, dev, sinks, progress: bool,
                say) -> LinearProtocolResult:
    """:func:`train_linear` once its inputs are checked and its output folder locked."""
    names = cache.domain_names
    test_idx = [names.index(d) for d in test_names]
    grid_runs = {h.run_id: h for h in (protocol.header(e, s, p) for e in test_idx for s in range(grid.seeds)
                                        for p in grid.points())}
    buckets, skipped = _buckets(protocol, test_idx, grid.seeds, grid.points(), done)
    trained, counter = sum(len(k) * len(v) for k, v in buckets.items()), {"diverged": 0}
    if buckets:
        write_plan(out_dir, {rid: plan_entry(asdict(h)) for rid, h in grid_runs.items()})
        data, rows_by_seed = _linear_data(cache, grid.seeds, dev, grid.split_seed, protocol.memory_budget)
        compiled = compiled_step_used(data, config)  # which step made the numbers goes in every record
        with RecordWriter(records_path, sinks=sinks) as writer, \
                progress_bar(config.steps * len(buckets), "training", unit="step", enabled=progress) as update:
            for i, (points, pairs) in enumerate(buckets.items()):
                groups = [_group(cache, rows_by_seed, e, s, points, dev) for e, s in pairs]
                prefix = f"[{i + 1}/{len(buckets)}] " if len(buckets) > 1 else ""
                train_linear_grid(data, groups, config, on_step=lambda step: update(1),
                                  on_eval=_record_writer(writer, protocol, groups, counter, compiled, say,
                                                         prefix))
    usable, divergence = _outcome(records_path, grid_runs)
    return LinearProtocolResult(records_path, trained, skipped, counter["diverged"], usable, divergence)

"""``linft demo``: the whole pipeline on the built-in procedural benchmark, on a laptop CPU.

Every stage calls the same library function as the corresponding command
(``demo-data``, ``extract``, ``train-linear``, ``finetune``, ``interpolate``, ``report``);
there is no demo code path. Work already on disk is reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from linft.interpolation.run import interpolate
from linft.analysis.report import write_report
from linft.cache.extract import extract_features
from linft.cache.verify import verify_cache
from linft.data.folders import find_dataset
from linft.data.shapes import write_demo_data
from linft.protocol.grid import PAPER_GRID
from linft.protocol.records import done_summary
from linft.protocol.schedule import PAPER, decay_shrinkage
from linft.train.finetune.model import FineTuneConfig
from linft.train.finetune.run import sweep_runs
from linft.train.sweeps.launch import LaunchOptions, launch_sweep
from linft.train.sweeps.result import LaunchResult, RunStatus
from linft.train.linear.driver import train_linear
from linft.train.linear.engine import LinearGridConfig

#: The demo's backbone: linft's small pretrained ResNet shipped in the package, at the data's 64 px.
DEMO_BACKBONE = ("demo-resnet", "DEFAULT")
DEMO_IMAGE_SIZE = 64

#: The demo's linear fine-tuning: the paper's grid, a dropout sweep and probing, on a shorter schedule.
#: (The sizes below keep the whole demo within 4 minutes on a 2-core CPU.)
DEMO_LINEAR = dict(dropouts=(0.0, 0.9, 0.95), probe=True, lrs=PAPER_GRID.lrs, weight_decays=PAPER_GRID.weight_decays,
                   seeds=PAPER_GRID.seeds)
DEMO_LINEAR_STEPS = 800

#: The demo's full fine-tuning: dropout 0 and 0.9, one grid point and seed, a short schedule (lr ÷10 at half),
#: trajectory ensembles and averages, and the tensor augmentation (:func:`demo_notes` says how this differs from
#: the paper's protocol). ``across_runs`` adds the paper's second lr, :data:`DEMO_ACROSS_RUNS_LRS`: two grid
#: points per held-out domain, what ensembles and soups across runs need (about twice the fine-tuning time).
DEMO_FINETUNE = dict(dropouts=(0.0, 0.9), lrs=PAPER_GRID.lrs[:1], weight_decays=PAPER_GRID.weight_decays[:1], seeds=1)
DEMO_ACROSS_RUNS_LRS = PAPER_GRID.lrs
DEMO_FINETUNE_STEPS = 150
DEMO_FINETUNE_EVAL_EVERY = 75
DEMO_AUGMENT = "tensor"

#: The demo's interpolation: the plain fine-tuned run (dropout 0) of this held-out domain, 11 values of α.
DEMO_INTERPOLATION_DOMAIN = "sketch"
DEMO_ALPHAS = "0:1:11"


@dataclass
class DemoResult:
    """Where the demo wrote its data, cache, records and report."""

    out: Path
    data: Path
    cache: Path
    records: list[Path]
    report: Path


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes (the defaults keep it within 4 minutes on a 2-core CPU)."""

    seed: int = 0
    per_class: int = 100
    linear_steps: int = DEMO_LINEAR_STEPS
    seeds: int | None = None  # linear fine-tuning seeds; None: DEMO_LINEAR's
    finetune_steps: int = DEMO_FINETUNE_STEPS
    finetune_eval_every: int = DEMO_FINETUNE_EVAL_EVERY
    augment: str = DEMO_AUGMENT  # full fine-tuning's augmentation (FineTuneConfig.augment)
    trajectory: bool = True  # trajectory ensembles and weight averages of every fine-tuning run
    across_runs: bool = False  # also lr 5e-4, and ensembles and soups across the two runs of each held-out domain

    def finetune_grid(self) -> dict:
        """The arguments of :func:`linft.train.finetune.run.sweep_runs` for the demo's full fine-tuning."""
        return dict(DEMO_FINETUNE, lrs=DEMO_ACROSS_RUNS_LRS if self.across_runs else DEMO_FINETUNE["lrs"])


STAGES = 6


def _values(values) -> str:
    """``{1e-3, 5e-4}``: a grid's values as the paper writes them."""
    return "{" + ", ".join(f"{v:.0e}".replace("e-0", "e-") for v in values) + "}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def demo_notes(config: DemoConfig) -> list[str]:
    """How the demo's protocol differs from the paper's (written at the end of the report's ``summary.md``)."""
    ft = config.finetune_grid()
    augment = {"tensor": "the batched tensor augmentation on the device instead of DomainBed's PIL augmentation "
                         "(the same family of random crop, flip, colour jitter and grayscale, not bit-identical to it: "
                         "linft.data.tensor_augment)",
               "pil": "DomainBed's PIL augmentation, as the paper",
               "none": "no augmentation instead of DomainBed's"}[config.augment]
    notes = [
        "This is the demo, not the paper's protocol. Data: the procedural demo-shapes benchmark (4 style domains x 7 "
        f"shapes, {config.per_class} images per domain and class, 64 px), not the paper's DomainBed datasets; "
        "backbone: demo-resnet (small, pretrained by linft on a procedural source at 64 px), not an ImageNet "
        "ResNet-50 at 224 px.",
        f"Linear fine-tuning and probing: the paper's grid, {_count(config.seeds or DEMO_LINEAR['seeds'], 'seed')}, "
        f"{config.linear_steps} steps instead of {PAPER.steps:,}.",
        f"Full fine-tuning: {config.finetune_steps} steps, evaluated every {config.finetune_eval_every} (lr ÷10 at "
        f"half), instead of {PAPER.steps:,} and {PAPER.eval_every}; lr {' and '.join(f'{lr:g}' for lr in ft['lrs'])} "
        f"at weight decay {ft['weight_decays'][0]:g} instead of the paper's lr {_values(PAPER_GRID.lrs)} x weight "
        f"decay {_values(PAPER_GRID.weight_decays)}; {_count(ft['seeds'], 'seed')} instead of {PAPER_GRID.seeds}; "
        f"{augment}.",
    ]
    shrink = decay_shrinkage(LinearGridConfig(steps=config.linear_steps), max(PAPER_GRID.lrs),
                             max(PAPER_GRID.weight_decays))
    notes.append(f"Weight decay in linear fine-tuning: at lr {max(PAPER_GRID.lrs):g}, the grid's largest weight decay "
                 f"takes {shrink:.2%} off a weight over {config.linear_steps} steps "
                 "(linft.protocol.schedule.decay_shrinkage). Where that changes no prediction the three weight "
                 "decays give the same accuracies and the linear selection ties between them (the Runs table's "
                 "ties at the best score; the tie rule takes the first): only the learning rates are ranked.")
    if config.trajectory:
        notes.append("Trajectory ensembles and averages: over the evaluations after step 0 of each run.")
    notes.append(f"Ensembles and soups across runs: over the {len(ft['lrs'])} grid runs of each held-out domain "
                 "(the paper: its 6)." if config.across_runs else "No ensembles or soups across runs (one grid point; "
                 "`linft demo --across-runs` adds lr 5e-4 and them).")
    return notes


def _stage_linear(out: Path, cache: Path, config: DemoConfig, progress: bool, say, took) -> Path:
    linear = dict(DEMO_LINEAR, seeds=config.seeds or DEMO_LINEAR["seeds"])
    say(f"[3/{STAGES}] linear fine-tuning (dropout {', '.join(f'{p:g}' for p in linear['dropouts'])}) and linear "
        f"probing, every held-out domain, {linear['seeds']} seeds, {config.linear_steps} steps")
    lin = train_linear(cache, out / "runs" / "linear", config=LinearGridConfig(steps=config.linear_steps),
                       device="auto", progress=progress, say=say if progress else None, **linear)
    say(f"      {done_summary(lin.trained, lin.skipped, diverged=lin.diverged)} -> {lin.records}{took()}")
    return lin.records


def _stage_finetune(out: Path, data: Path, config: DemoConfig, progress: bool, say, took) -> LaunchResult:
    grid, across = config.finetune_grid(), config.across_runs
    say(f"[4/{STAGES}] full fine-tuning (dropout {', '.join(f'{p:g}' for p in grid['dropouts'])}; lr "
        f"{', '.join(f'{lr:g}' for lr in grid['lrs'])}), every held-out domain, {config.finetune_steps} steps, "
        f"{config.augment} augmentation" + (", trajectory ensembles and averages" if config.trajectory else "")
        + (", ensembles and soups across runs" if across else ""))
    ft_config = FineTuneConfig(steps=config.finetune_steps, eval_every=config.finetune_eval_every,
                               image_size=DEMO_IMAGE_SIZE, eval_batch_size=512, augment=config.augment,
                               trajectory=config.trajectory)
    backbone, weights = DEMO_BACKBONE
    ds = find_dataset(data)
    ft = launch_sweep(ds, out / "runs" / "finetune", sweep_runs(ds.domains, **grid), backbone=backbone,
                      weights=weights, config=ft_config,
                      options=LaunchOptions(device="auto", across_runs=across, progress=progress,
                                            say=say if progress else None))
    say(f"      {done_summary(ft.launched, ft.skipped, diverged=ft.count(RunStatus.DIVERGED))} -> {ft.out}{took()}")
    if ft.across_runs is not None:
        say(f"      ensembles, soups and greedy soups across the grid's runs -> {ft.across_runs}{took()}")
    return ft


def _stage_interpolate(out: Path, data: Path, ft: LaunchResult, progress: bool, say, took) -> None:
    plain = [r for r in ft.runs if r.run.dropout == 0.0 and r.final == "ok"]
    chosen = next((r for r in plain if r.run.test_domain == DEMO_INTERPOLATION_DOMAIN), plain[0] if plain else None)
    if chosen is None:
        say(f"[5/{STAGES}] skipping interpolation: no plain fine-tuning run finished")
        return
    say(f"[5/{STAGES}] weight vs representation interpolation (α {DEMO_ALPHAS}) and first-order path, "
        f"fine-tuned run {chosen.run_dir.name}")
    interp = interpolate(data, chosen.run_dir, alphas=DEMO_ALPHAS, linearity=True, blocks=False,
                         out_dir=out / "runs" / "interpolate", device="auto", progress=progress)
    total = sum(len(curve) for curve in interp.curves.values())
    say(f"      {done_summary(interp.records_written, total - interp.records_written, verb='written', unit='record')} "
        f"-> {interp.records}; plot {interp.plot}{took()}")


def run_demo(out: str | Path = "demo_out", config: DemoConfig = DemoConfig(), *, progress: bool = True,
             say: Callable[[str], None] = print, **settings) -> DemoResult:
    """Generate the demo data (if absent), extract features, train linear FT and probing, fine-tune, interpolate
    and report, each stage with the library call of its command. ``settings`` override fields of ``config``."""
    config = replace(config, **settings)
    out = Path(out)
    data = out / "demo-shapes"
    started = time.perf_counter()

    def took() -> str:
        return f" ({time.perf_counter() - started:.0f} s so far)"

    if not (data / "photo").is_dir():
        say(f"[1/{STAGES}] generating the demo benchmark in {data}")
        write_demo_data(data, seed=config.seed, per_class=config.per_class, force=True)  # its own folder
    else:
        say(f"[1/{STAGES}] using the demo benchmark already in {data}")
    backbone, weights = DEMO_BACKBONE
    cache = out / "features" / f"demo_{backbone}.h5"
    say(f"[2/{STAGES}] extracting features with {backbone} at {DEMO_IMAGE_SIZE} px")
    result = extract_features(data, cache, backbone=backbone, weights=weights, image_size=DEMO_IMAGE_SIZE,
                              batch_size=128, device="auto", progress=progress)
    counts = done_summary(result.num_extracted, result.num_examples - result.num_extracted, verb="extracted",
                          unit="image")
    say(f"      {counts} -> {result.path}; verified: {'ok' if verify_cache(cache).ok else 'FAILED'}{took()}")
    records = _stage_linear(out, cache, config, progress, say, took)
    ft = _stage_finetune(out, data, config, progress, say, took)
    _stage_interpolate(out, data, ft, progress, say, took)
    paths = write_report([out / "runs"], out / "report", notes=demo_notes(config), force=True,
                         findings_title="What this demo shows")
    say(f"[{STAGES}/{STAGES}] report: {paths['summary']}{took()}")
    return DemoResult(out=out, data=data, cache=cache, records=[records, ft.out, out / "runs" / "interpolate"],
                      report=out / "report")

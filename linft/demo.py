"""``linft demo``: the whole pipeline on the built-in procedural benchmark, on a laptop CPU.

Every stage calls the same library function as the corresponding command
(``demo-data``, ``extract``, ``train-linear``, ``finetune``, ``interpolate``, ``report``);
there is no demo code path. Work already on disk is reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from linft.demo_data import write_demo_data
from linft.features import extract_features, verify_cache
from linft.finetune import FineTuneConfig, finetune
from linft.interpolate import interpolate
from linft.linear import LinearGridConfig, train_linear
from linft.report import write_report

#: The demo's backbone: linft's small pretrained ResNet shipped in the package, at the data's 64 px.
DEMO_BACKBONE = ("demo-resnet", None)
DEMO_IMAGE_SIZE = 64

#: The demo's linear fine-tuning: the paper's grid, a dropout sweep and probing, on a shorter schedule.
#: (The schedules below keep the whole demo within about 5 minutes on a 2-core CPU.)
DEMO_LINEAR = dict(dropouts=(0.0, 0.9, 0.95), probe=True, lrs=(1e-3, 5e-4), weight_decays=(1e-4, 5e-5, 1e-5), seeds=3)
DEMO_LINEAR_STEPS = 800

#: The demo's full fine-tuning: dropout 0 and 0.9, one grid point and seed, a short schedule (lr ÷10 at half).
DEMO_FINETUNE = dict(dropouts=(0.0, 0.9), lrs=(1e-3,), weight_decays=(1e-4,), seeds=1)
DEMO_FINETUNE_STEPS = 50
DEMO_FINETUNE_EVAL_EVERY = 25

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


def run_demo(out: str | Path = "demo_out", *, seed: int = 0, per_class: int = 150, linear_steps: int = DEMO_LINEAR_STEPS,
             seeds: int | None = None, finetune_steps: int = DEMO_FINETUNE_STEPS,
             finetune_eval_every: int = DEMO_FINETUNE_EVAL_EVERY, progress: bool = True,
             say: Callable[[str], None] = print) -> DemoResult:
    """Generate the demo data (if absent), extract features, train linear FT and probing, fine-tune, and report."""
    out = Path(out)
    data = out / "demo-shapes"
    stages = 6
    started = time.perf_counter()

    def took() -> str:
        return f" ({time.perf_counter() - started:.0f} s so far)"

    if not (data / "photo").is_dir():
        say(f"[1/{stages}] generating the demo benchmark in {data}")
        write_demo_data(data, seed=seed, per_class=per_class)
    else:
        say(f"[1/{stages}] using the demo benchmark already in {data}")
    backbone, weights = DEMO_BACKBONE
    cache = out / "features" / f"demo_{backbone}.h5"
    say(f"[2/{stages}] extracting features with {backbone} at {DEMO_IMAGE_SIZE} px")
    result = extract_features(data, cache, backbone=backbone, weights=weights, image_size=DEMO_IMAGE_SIZE,
                              batch_size=128, device="auto", progress=progress)
    say(f"      {result.status}: {result.path} ({result.num_examples} images); "
        f"verified: {'ok' if verify_cache(cache).ok else 'FAILED'}{took()}")

    linear = dict(DEMO_LINEAR, seeds=seeds or DEMO_LINEAR["seeds"])
    say(f"[3/{stages}] linear fine-tuning (dropout {', '.join(f'{p:g}' for p in linear['dropouts'])}) and linear "
        f"probing, every held-out domain, {linear['seeds']} seeds, {linear_steps} steps")
    lin = train_linear(cache, out / "runs" / "linear", config=LinearGridConfig(steps=linear_steps), device="auto",
                       progress=progress, **linear)
    say(f"      trained {lin.trained} runs ({lin.skipped} already done, {lin.diverged} diverged) -> {lin.records}"
        f"{took()}")
    say(f"[4/{stages}] full fine-tuning (dropout {', '.join(f'{p:g}' for p in DEMO_FINETUNE['dropouts'])}), "
        f"every held-out domain, {finetune_steps} steps")
    ft_config = FineTuneConfig(steps=finetune_steps, eval_every=finetune_eval_every, image_size=DEMO_IMAGE_SIZE,
                               eval_batch_size=512)
    ft = finetune(data, out / "runs" / "finetune", backbone=backbone, weights=weights, config=ft_config, device="auto",
                  progress=progress, say=None, **DEMO_FINETUNE)
    say(f"      {len(ft.runs) - ft.count('done')} runs trained ({ft.count('done')} already done, "
        f"{ft.count('diverged')} diverged) -> {ft.out}{took()}")
    plain = [r for r in ft.runs if r.run.dropout == 0.0 and r.status != "diverged"]
    chosen = next((r for r in plain if r.run.test_domain == DEMO_INTERPOLATION_DOMAIN), plain[0] if plain else None)
    if chosen is None:
        say(f"[5/{stages}] skipping interpolation: no plain fine-tuning run finished")
    else:
        say(f"[5/{stages}] weight vs representation interpolation (α {DEMO_ALPHAS}) and first-order path, "
            f"fine-tuned run {chosen.run_dir.name}")
        interp = interpolate(data, chosen.run_dir, alphas=DEMO_ALPHAS, linearity=True, blocks=False,
                             out_dir=out / "runs" / "interpolate", device="auto", progress=progress)
        say(f"      {interp.records_written} records -> {interp.records}; plot {interp.plot}{took()}")
    report_dir = out / "report"
    paths = write_report([out / "runs"], report_dir)
    say(f"[{stages}/{stages}] report: {paths['summary']}{took()}")
    return DemoResult(out=out, data=data, cache=cache, records=[lin.records, ft.out, out / "runs" / "interpolate"],
                      report=report_dir)

"""The demo-sized pipeline whose run identities are pinned across releases (``identity.json`` beside this file).

:func:`run_pipeline` extracts a cache of the demo benchmark, trains linear FT and probing (with and without a fixed
split seed), fine-tunes each variant for a few steps (dropout, 10x head lr, both stochastic depth modes, from
scratch, the first-order model, LP-FT, a split seed, other lr milestones, trajectory ensembles and averages),
evaluates ensembles and soups across runs and interpolates one run. :func:`identity_view` keeps what identifies each
record, not what it measured: run ids, methods, labels, sources, hyper-parameters, grids, steps; no counts, losses
or paths of this machine. ``python tests/compat/pipeline.py`` rewrites ``identity.json``: only ever do that on a
release whose ids are the reference, never to make the test pass after a change.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

#: Record fields that depend on numerics, on this machine or on this process, not on what the run is.
MEASURED = {"splits", "loss", "status", "attempt", "cache", "engine", "linearity_gap"}
#: Hyper-parameters that record a measurement: the greedy soup's chosen members, the fine-tuned end's selected step.
MEASURED_HPARAMS = {"chosen", "finetuned_step"}
#: An interpolation's id hashes the selected checkpoint's bytes (numerics): its recipe is pinned on fixed inputs.
ID_FROM_NUMERICS = ("interpolation-",)

#: Keys that records gained after ``identity.json`` was written: ``schema`` (the record schema version, 2 since issue
#: 19). Dropped from the view: they say which schema a record follows, not what the run is.
NEW_KEYS = {"schema"}
#: Labels changed on purpose after ``identity.json`` was written, per file: ``(old start, new start)``. A fine-tuning
#: run whose lr milestones are not the paper's says so in its label (issue 19: runs that compute different things
#: never share a table row). Only the label: run ids, hyper-parameters and every other field stay pinned.
RELABELED = {"ft/milestones/<run>/records.jsonl": ("full FT, tensor augmentation",
                                                   "full FT, lr \u00f710 at steps 1/3, tensor augmentation")}

IDENTITY_FILE = Path(__file__).with_name("identity.json")


def _finetune_variants():
    from linft.train.finetune.model import FineTuneConfig

    base = dict(steps=3, eval_every=2, image_size=64, eval_batch_size=512, augment="tensor")
    grid = dict(test_domains=("sketch",), seeds=1, lrs=(1e-3,), weight_decays=(1e-4,))
    return [
        ("plain", FineTuneConfig(**base, trajectory=True), dict(grid, dropouts=(0.0, 0.9), lrs=(1e-3, 5e-4)),
         "DEFAULT"),
        ("head-lr", FineTuneConfig(**base), dict(grid, last_layer_lr_mult=10.0), "DEFAULT"),
        ("sd-row", FineTuneConfig(**base), dict(grid, stochastic_depth=0.1), "DEFAULT"),
        ("sd-official", FineTuneConfig(**base), dict(grid, stochastic_depth=0.1, stochastic_depth_mode="official"),
         "DEFAULT"),
        ("scratch", FineTuneConfig(**base), dict(grid), "none"),
        ("linearized", FineTuneConfig(**base), dict(grid, linearized=True), "DEFAULT"),
        ("lp-ft", FineTuneConfig(**base), dict(grid, lp_ft=True), "DEFAULT"),
        ("split-seed", FineTuneConfig(**base, split_seed=0), dict(grid), "DEFAULT"),
        ("milestones", FineTuneConfig(**{**base, "steps": 4}, lr_milestones=(0.25, 0.75)), dict(grid), "DEFAULT"),
        ("pil", FineTuneConfig(**{**base, "augment": "pil"}, workers=0), dict(grid), "DEFAULT"),
    ]


def run_pipeline(out: Path) -> dict:
    """Every stage at demo size into ``out``; returns ``{"cache": provenance, "records": {file: [records]}}``."""
    from linft.interpolation.run import interpolate
    from linft.cache.extract import extract_features
    from linft.cache.format import FeatureCache  # noqa: F401  (the cache contract this pins)
    from linft.cache import open_cache
    from linft.data.folders import find_dataset
    from linft.data.shapes import write_demo_data
    from linft.protocol.records import read_records
    from linft.train.finetune.across_runs import evaluate_across_runs
    from linft.train.finetune.run import finetune
    from linft.train.linear.driver import train_linear
    from linft.train.linear.engine import LinearGridConfig

    data = write_demo_data(out / "data", seed=0, per_class=3, force=True)
    cache = out / "demo.h5"
    extract_features(data, cache, backbone="demo-resnet", weights="DEFAULT", image_size=64, batch_size=128,
                     device="cpu", progress=False)
    linear = LinearGridConfig(steps=6, eval_every=4)
    grid = dict(dropouts=(0.0, 0.9), probe=True, lrs=(1e-3, 5e-4), weight_decays=(1e-4,), seeds=1)
    train_linear(cache, out / "linear", config=linear, device="cpu", progress=False, **grid)
    train_linear(cache, out / "linear-split", config=linear, device="cpu", progress=False, split_seed=0,
                 test_domains=("sketch",), **grid)
    ds = find_dataset(data)
    plain_dirs = []
    for name, config, ft_grid, weights in _finetune_variants():
        kwargs = dict(ft_grid)
        if name == "lp-ft":
            config = type(config)(**{**config.__dict__, "lp_ft_cache": str(cache)})
        result = finetune(ds, out / "ft" / name, backbone="demo-resnet", weights=weights, config=config,
                          device="cpu", progress=False, **kwargs)
        if name == "plain":
            plain_dirs = [r.run_dir for r in result.runs if r.run.dropout == 0.0]
            evaluate_across_runs(ds, result.out, plain_dirs, config=config, device="cpu",
                                 eval_images=result.eval_images)
    interpolate(data, plain_dirs[0], alphas="0:1:3", linearity=True, blocks=False, out_dir=out / "interpolate",
                device="cpu", progress=False)
    records = {}
    for path in sorted(out.rglob("records.jsonl")):
        records[str(path.relative_to(out))] = read_records([path])
    return {"cache": open_cache(cache).provenance_sha256, "records": records}


def stable_hashes(out: Path) -> tuple[str, str]:
    """The demo data's file-list hash and the demo backbone's weights hash (what a fine-tuning run's source is made
    of), by the library calls of today's release."""
    from linft.data.folders import find_dataset
    from linft.models.registry import load_backbone

    return find_dataset(out / "data").file_list_sha256, load_backbone("demo-resnet", "DEFAULT").weights_sha256


def _rel(value, out: Path):
    """``value`` with this machine's output folder written ``<out>`` and linft's folder ``<linft>`` (inside lists and
    objects too)."""
    if isinstance(value, str):
        import linft

        return value.replace(str(out), "<out>").replace(str(Path(linft.__file__).parent), "<linft>")
    if isinstance(value, list):
        return [_rel(v, out) for v in value]
    if isinstance(value, dict):
        return {k: _rel(v, out) for k, v in value.items()}
    return value


def identity_view(result: dict, out: Path) -> dict:
    """What identifies each record (see :data:`MEASURED`), per records file, sorted; ids of run folders kept."""
    files = {}
    for name, records in result["records"].items():
        parts = Path(name).parts
        key = "/".join(p if len(p) != 16 else "<run>" for p in parts)  # run folders are named by run id
        rows = []
        for r in records:
            kept = {k: v for k, v in r.items() if k not in MEASURED | NEW_KEYS}
            kept["hparams"] = {k: v for k, v in r["hparams"].items() if k not in MEASURED_HPARAMS}
            if r["method"].startswith(ID_FROM_NUMERICS):
                del kept["run_id"]
            rows.append(json.dumps(_rel(kept, out), sort_keys=True))
        files.setdefault(key, []).extend(rows)
    return {"cache": result["cache"], "records": {k: sorted(v) for k, v in sorted(files.items())}}


def relabeled(name: str, rows: list[str]) -> list[str]:
    """The pinned rows of file ``name`` with the labels of :data:`RELABELED` as today's release writes them."""
    if name not in RELABELED:
        return rows
    old, new = RELABELED[name]
    out = []
    for row in rows:
        record = json.loads(row)
        assert record["label"].startswith(old), record["label"]
        out.append(json.dumps({**record, "label": new + record["label"][len(old):]}, sort_keys=True))
    return sorted(out)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        view = identity_view(run_pipeline(out), out)
    IDENTITY_FILE.write_text(json.dumps(view, indent=1, sort_keys=True) + "\n")
    print(f"wrote {IDENTITY_FILE}: {sum(len(v) for v in view['records'].values())} records", file=sys.stderr)


if __name__ == "__main__":
    main()

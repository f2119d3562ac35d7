"""LP-FT (linft.train.finetune.lp_ft): the head starts from the linear-probe solution, and the run is its own method.

Tiny data: three 12-image style domains of 32 px shapes (2 classes), the shipped demo backbone, a float32 cache
of it made on the CPU. A run is observed through its hooks; with lr = 0 and no weight decay the SGD update is
zero, so the head seen at the step-0 evaluation is, by construction, the head the run started from.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from linft.cache.extract import extract_features
from linft.cache.format import open_cache
from linft.cli.main import main
from linft.data.folders import load_image_folder
from linft.data.images import EvalImages
from linft.data.splits import domain_split_rows
from linft.errors import LinftError
from linft.models.heads import classifier_head, fit_probe_head
from linft.protocol.records import METHODS, is_known_method, read_records, run_id
from linft.train.finetune.run import run_identity, sweep_runs, train_run
from linft.train.finetune.hooks import RunHooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun, build_run_model
from linft.train.finetune.lp_ft import BACKBONE_FEATURES, lp_ft_identity, probe_features
from linft.train.finetune.run_folder import RunFolder
from helpers import refused

from conftest import assert_one_line_error

HELD_OUT, SEED = "photo", 1
#: lr = 0, no weight decay: the step-0 update leaves every weight as it was (the head seen at step 0 is the start)
FROZEN = FineTuneRun(HELD_OUT, SEED, lr=0.0, weight_decay=0.0, dropout=0.5, lp_ft=True)
CFG = dict(steps=1, eval_every=1, batch_size=4, image_size=32, eval_batch_size=64, workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds(shapes_root):
    return load_image_folder(shapes_root)


@pytest.fixture(scope="module")
def cache(ds, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "shapes_demo.h5"
    extract_features(ds, path, backbone="demo-resnet", image_size=32, dtype="float32", device="cpu", workers=0,
                     progress=False)
    return path


def training_rows(ds) -> np.ndarray:
    """The rows a run of (HELD_OUT, SEED) trains on: the training domains' "in" splits, in increasing order."""
    split_rows = domain_split_rows(ds.domain_ids, len(ds.domains), SEED)
    held_out = ds.domains.index(HELD_OUT)
    return np.sort(np.concatenate([split_rows[(d, "in")] for d in range(len(ds.domains)) if d != held_out]))


def start_head(ds, out, run, config):
    """The classifier head of ``run`` at its step-0 evaluation, seen through the run's hooks."""
    heads = {}

    def on_eval(event):
        heads[event.step] = classifier_head(event.model)

    train_run(ds, out, run, backbone="demo-resnet", config=config, device="cpu", progress=False,
              hooks=RunHooks(on_eval=on_eval))
    return heads[0]


def test_the_lp_ft_head_is_the_probe_solution_at_step_0(ds, cache, tmp_path):
    head = start_head(ds, tmp_path / "lpft", FROZEN, FineTuneConfig(**CFG, lp_ft_cache=str(cache)))
    rows = training_rows(ds)
    features = open_cache(cache).features[rows, -1]  # φ_l: the last block, the classifier's input
    probe = fit_probe_head(torch.from_numpy(features.astype(np.float32)), ds.labels[rows], len(ds.classes))
    # the same fit of the same float32 rows, computed twice: bit for bit
    assert torch.equal(head.weight, probe.weight) and torch.equal(head.bias, probe.bias)
    # and without LP-FT the same run starts from its seeded random head instead (so the step-0 head above
    # comes from the probe fit, not from the initialisation)
    plain = start_head(ds, tmp_path / "plain", FineTuneRun(**{**asdict(FROZEN), "lp_ft": False}),
                       FineTuneConfig(**CFG))
    assert not torch.equal(plain.weight, probe.weight) and not torch.equal(plain.bias, probe.bias)


def test_the_backbone_computes_the_same_features_as_the_cache(ds, cache):
    model, bb = build_run_model("demo-resnet", "DEFAULT", len(ds.classes), FROZEN, torch.device("cpu"))
    images, rows = EvalImages(ds, 32, 64, 0), training_rows(ds)
    modes = [m.training for m in model.modules()]
    from_cache, keep = probe_features(ds, rows, model, bb.weights_sha256, FineTuneConfig(**CFG, lp_ft_cache=str(cache)),
                                      images)
    computed, all_rows = probe_features(ds, rows, model, bb.weights_sha256, FineTuneConfig(**CFG), images)
    assert keep.all() and all_rows.all() and computed.shape == (len(rows), 512)
    # two code paths (the extraction's batches of 256 vs evaluation batches of 64, another memory layout): float32
    # convolutions agree to ~2e-6 on features up to ~6 (measured); 1e-4 leaves room for other CPUs
    torch.testing.assert_close(computed, from_cache, rtol=0, atol=1e-4)
    assert [m.training for m in model.modules()] == modes  # the features are computed in eval mode, then restored


def test_lp_ft_records_are_their_own_method_and_the_source_is_part_of_the_identity(ds, cache, tmp_path):
    config = FineTuneConfig(**CFG, lp_ft_cache=str(cache))
    outcome = train_run(ds, tmp_path, FROZEN, backbone="demo-resnet", config=config, device="cpu", progress=False)
    records = read_records([outcome.run_dir])
    assert {r["method"] for r in records} == {"lp-ft"} and METHODS["lp-ft"] == "LP-FT"
    assert {r["label"] for r in records} == {"LP-FT, dropout 0.5"}
    assert records[0]["hparams"]["lp_ft"] is True and records[0]["hparams"]["lp_ft_cache"] == str(cache)
    assert is_known_method("lp-ft-trajectory-ensemble") and is_known_method("lp-ft-soup")
    saved = json.loads((outcome.run_dir / "run.json").read_text())
    assert saved["lp_ft"]["features"] == open_cache(cache).provenance_sha256 and saved["run"]["lp_ft"] is True
    sha, files = "0" * 64, ds.file_list_sha256
    from_backbone = run_identity(FROZEN, "demo-resnet", sha, files, FineTuneConfig(**CFG))
    assert from_backbone["lp_ft"]["features"] == BACKBONE_FEATURES
    plain = FineTuneRun(**{**asdict(FROZEN), "lp_ft": False})
    ids = {run_id(**run_identity(r, "demo-resnet", sha, files, c)) for r, c in
           [(FROZEN, config), (FROZEN, FineTuneConfig(**CFG)), (plain, config)]}
    assert len(ids) == 3


def test_runs_without_lp_ft_keep_the_ids_of_earlier_releases(ds):
    run = FineTuneRun(HELD_OUT, SEED, lr=1e-3, weight_decay=1e-4, dropout=0.5)
    config = FineTuneConfig(**CFG)
    earlier = {"method": "finetune", "backbone": "demo-resnet", "weights_sha256": "0" * 64,
               "dataset": ds.file_list_sha256, "protocol": config.protocol(),
               "run": {"test_domain": HELD_OUT, "seed": SEED, "lr": 1e-3, "weight_decay": 1e-4, "dropout": 0.5,
                       "last_layer_lr_mult": 1.0, "stochastic_depth": 0.0, "linearized": False}}
    identity = run_identity(run, "demo-resnet", "0" * 64, ds.file_list_sha256, config)
    assert RunFolder.of("out", identity).run_id == run_id(**earlier)


def test_cli_lp_ft_cache_implies_lp_ft(shapes_root, cache, tmp_path):
    out = tmp_path / "runs"
    args = ["finetune", str(shapes_root), "--backbone", "demo-resnet", "--image-size", "32", "--lp-ft-cache",
            str(cache), "--dropout", "0", "--lr", "1e-3", "--weight-decay", "1e-4", "--seeds", "1", "--test-domains",
            HELD_OUT, "--steps", "2", "--eval-every", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu",
            "--quiet", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = read_records([out])
    assert {r["method"] for r in records} == {"lp-ft"} and "LP-FT, dropout 0" in result.output
    assert "1 run trained, 0 already done" in result.output


def test_lp_ft_refuses_what_it_cannot_start_from(ds, shapes_root, cache, tmp_path):
    base = ["finetune", str(shapes_root), "--backbone", "demo-resnet", "--image-size", "32", "--seeds", "1",
            "--device", "cpu", "--quiet", "--out", str(tmp_path / "runs")]
    assert_one_line_error(CliRunner().invoke(main, [*base, "--lp-ft", "--linearized"]), "--lp-ft", "--linearized")
    assert_one_line_error(CliRunner().invoke(main, [*base, "--lp-ft", "--weights", "none", "--test-domains", HELD_OUT,
                                                    "--lr", "1e-3", "--weight-decay", "1e-4", "--workers", "0"]),
                          "LP-FT", "--weights none")
    with refused("lp_ft"):
        sweep_runs(ds.domains, lp_ft=True, linearized=True)
    small = FineTuneConfig(**{**CFG, "image_size": 16}, lp_ft_cache=str(cache))
    with pytest.raises(LinftError, match="32 px images, the run 16 px"):
        train_run(ds, tmp_path / "small", FROZEN, backbone="demo-resnet", config=small, device="cpu", progress=False)


def test_an_edited_lp_ft_cache_is_refused_like_every_cache_reader_does(ds, cache, tmp_path):
    import h5py

    broken = tmp_path / "broken.h5"
    broken.write_bytes(cache.read_bytes())
    with h5py.File(broken, "r+") as f:
        del f["valid"]
    with pytest.raises(LinftError, match="not a usable linft feature cache: it lacks the dataset valid"):
        lp_ft_identity(FineTuneConfig(**CFG, lp_ft_cache=str(broken)))

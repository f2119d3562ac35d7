"""Sweeps of fine-tuning runs (linft.train.finetune.run.sweep_runs, linft.train.sweeps.launch.launch_sweep) and the
ensembles and soups across the runs of a grid (linft.train.finetune.across_runs), on tiny data (CPU).

The data are the 2-class shapes of ``conftest.shapes_root``; the runs start from the shipped demo-resnet
weights and take 2 to 4 steps of 4 images per training domain.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from linft.analysis.report import write_report
from linft.data.folders import load_image_folder
from linft.data.images import EvalImages
from linft.data.splits import domain_split_rows
from linft.errors import LinftError
from linft.models.averaging import average_state_dicts, soup_order
from linft.models.demo_resnet import demo_resnet
from linft.models.heads import build_classifier
from linft.models.registry import load_backbone
from linft.protocol.records import read_records
from linft.protocol.selection import split_counts
from linft.train.finetune.across_runs import evaluate_across_runs
from linft.train.finetune.run import run_identity, sweep_runs
from linft.train.finetune.model import FineTuneConfig, FineTuneRun, predict_logits
from linft.train.finetune.run_folder import RunFolder
from linft.train.finetune.selected import load_selected, save_selected
from linft.train.sweeps.folder import SweepFolder
from linft.train.sweeps.launch import LaunchOptions, launch_sweep
from linft.train.sweeps.plan import read_plan_file
from linft.train.sweeps.result import LaunchResult, RunStatus
from helpers import refused

CFG = FineTuneConfig(steps=4, batch_size=4, eval_every=100, image_size=32, eval_batch_size=64, workers=0)
RUN = FineTuneRun("photo", seed=2, lr=0.01, weight_decay=1e-4, dropout=0.5, last_layer_lr_mult=10.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def ds(shapes_root):
    return load_image_folder(shapes_root, "Shapes")  # jobs in other processes must keep the dataset's name


def folders_of(ds, out, runs, config, backbone="demo-resnet", weights="DEFAULT") -> list[RunFolder]:
    sha = load_backbone(backbone, weights).weights_sha256
    return [RunFolder.of(out, run_identity(r, backbone, sha, ds.file_list_sha256, config)) for r in runs]


def test_sweep_runs_is_the_grid(ds):
    runs = sweep_runs(ds.domains, test_domains=["photo", "sketch"], dropouts=(0.0, 0.5), lrs=(1e-3,),
                      weight_decays=(1e-4, 0.0), seeds=2, last_layer_lr_mult=10.0)
    assert len(runs) == 2 * 2 * 2 * 1 * 2 and len(set(runs)) == len(runs)
    assert {(r.test_domain, r.seed, r.dropout, r.weight_decay) for r in runs} == \
        {(d, s, p, wd) for d in ("photo", "sketch") for s in (0, 1) for p in (0.0, 0.5) for wd in (1e-4, 0.0)}
    assert all(r.lr == 1e-3 and r.last_layer_lr_mult == 10.0 and not r.linearized for r in runs)
    with pytest.raises(LinftError):
        sweep_runs(ds.domains, last_layer_lr_mult=0.0)
    with refused("stochastic_depth"):
        sweep_runs(ds.domains, stochastic_depth=1.0)


# --------------------------------------------------------------------------- ensembles and soups across runs


@pytest.fixture(scope="module")
def grid(ds, tmp_path_factory):
    """Two runs of one label (10x head lr, lr and weight decay varied), launched in this process with the
    ensembles and soups across runs."""
    out = tmp_path_factory.mktemp("grid")
    runs = [RUN, replace(RUN, lr=0.005, weight_decay=0.0)]
    result = launch_sweep(ds, out, runs, backbone="demo-resnet", weights="DEFAULT", config=CFG,
                          options=LaunchOptions(device="cpu", across_runs=True, progress=False))
    assert isinstance(result, LaunchResult) and result.launched == 2 and result.skipped == 0
    assert [r.status for r in result.runs] == [RunStatus.TRAINED, RunStatus.TRAINED]
    return out, folders_of(ds, out, runs, CFG), result


def test_launch_result_is_one_typed_outcome_per_run(grid, ds):
    """Each run given is one LaunchedRun, in order: its run, its folder (the id computed here from run_identity),
    a RunStatus, its final status; the across-runs records and the sweep's plan are where SweepFolder says."""
    out, folders, result = grid
    runs = [RUN, replace(RUN, lr=0.005, weight_decay=0.0)]
    assert [r.run for r in result.runs] == runs
    assert [(r.run_id, r.run_dir) for r in result.runs] == [(f.run_id, f.root) for f in folders]
    assert all(type(r.status) is RunStatus and r.final == "ok" and r.detail is None for r in result.runs)
    assert result.out == out and result.usable == 2 and result.divergence is None and result.jobs == [] \
        and result.failed == []
    assert result.across_runs == SweepFolder(out).across_runs_records == out / "across_runs" / "records.jsonl"
    assert set(read_plan_file(out / "planned.json")) == {f.run_id for f in folders}
    assert str(RunStatus.TRAINED) == "trained" and RunStatus("resumed") is RunStatus.RESUMED
    with pytest.raises(ValueError):
        RunStatus("finished")  # a status outside the enum is refused, never passed on as a string


def test_ensembles_and_soups_across_runs(grid, ds):
    out, folders, _ = grid
    path = out / "across_runs" / "records.jsonl"
    records = read_records([path])
    label = "full FT, 10x head lr, dropout 0.5"
    assert sorted(r["method"] for r in records) == ["finetune-ensemble", "finetune-greedy-soup", "finetune-soup"]
    for r in records:
        assert r["label"].startswith(label + ", ") and r["test_domain"] == "photo"
        assert r["final"] and len(r["members"]) == 2 and r["seed"] == 2 and r["hparams"]["members"] == 2
        assert set(r["splits"]) == {f"{d}_{p}" for d in ds.domains for p in ("in", "out")}
    # the ensemble is the mean of the two selected models' probabilities; the soup their weight average. With two
    # members every sum is one commutative addition, so the order the library takes them in does not matter, and the
    # same functions run on the same inputs (the same code path): the counts are equal
    split_rows = domain_split_rows(ds.domain_ids, 3, RUN.seed)
    images = EvalImages(ds, 32, 64, 0)
    states = [load_selected(f.root)[0] for f in folders]

    def logits(state):
        net = build_classifier(demo_resnet(2), 2, 0.0)
        net.load_state_dict(state, strict=True)
        return predict_logits(net, images, torch.device("cpu"), channels_last=False)

    probs = torch.stack([logits(s).softmax(1) for s in states]).mean(0)
    by = {r["method"]: r for r in records}
    assert by["finetune-ensemble"]["splits"] == split_counts(probs.argmax(1), ds.labels, split_rows, ds.domains)
    soup = logits(average_state_dicts(states)).argmax(1)
    assert by["finetune-soup"]["splits"] == split_counts(soup, ds.labels, split_rows, ds.domains)
    assert by["finetune-greedy-soup"]["hparams"]["chosen"][0] == 0  # the best member always starts the soup
    # a second evaluation adds nothing
    before = path.read_bytes()
    assert evaluate_across_runs(ds, out, [f.root for f in folders], config=CFG, device="cpu") == path
    assert path.read_bytes() == before
    assert write_report([out], out / "report")["table"].is_file()


def test_ensembles_and_soups_of_nan_logits_are_diverged_records(grid, ds, tmp_path):
    """A member whose selected model gives NaN logits: the ensemble and the soup have no accuracy (diverged records,
    no splits); the greedy soup never keeps it (its trial has no accuracy) and is the best member alone."""
    out, folders, _ = grid
    for f in folders:
        shutil.copytree(f.root, tmp_path / f.run_id)
    members = [load_selected(tmp_path / f.run_id) for f in folders]
    second = soup_order([meta["iid"] for _, meta in members])[1]
    state, meta = members[second]
    save_selected(tmp_path / folders[second].run_id, {**state, "fc.1.bias": torch.full_like(state["fc.1.bias"],
                                                                                           float("nan"))}, meta)
    path = evaluate_across_runs(ds, tmp_path, [tmp_path / f.run_id for f in folders], config=CFG, device="cpu")
    by = {r["method"]: r for r in read_records([path])}
    for method in ("finetune-ensemble", "finetune-soup"):
        assert (by[method]["status"], by[method]["splits"], by[method]["final"]) == ("diverged", {}, True)
    greedy = by["finetune-greedy-soup"]
    assert greedy["status"] == "ok" and greedy["hparams"]["chosen"] == [0]
    best = load_selected(folders[soup_order([meta["iid"] for _, meta in members])[0]].root)[0]
    logits = predict_logits(_net(best), EvalImages(ds, 32, 64, 0), torch.device("cpu"), channels_last=False)
    assert greedy["splits"] == split_counts(logits.argmax(1), ds.labels, domain_split_rows(ds.domain_ids, 3, RUN.seed),
                                            ds.domains)


def _net(state):
    net = build_classifier(demo_resnet(2), 2, 0.0)
    net.load_state_dict(state, strict=True)
    return net


def test_unfinished_runs_take_no_part_in_ensembles_across_runs(grid, ds, tmp_path):
    """A run with a selected.pt but no final record yet (still training, or its job failed) is left out: the
    ensemble's record is final, so one made from a half-trained member would never be redone."""
    out, folders, _ = grid
    for f in folders:
        shutil.copytree(f.root, tmp_path / f.run_id)
    unfinished = RunFolder(tmp_path / folders[1].run_id)
    lines = unfinished.records.read_text().splitlines(keepends=True)
    unfinished.records.write_text("".join(line for line in lines if '"final": true' not in line))
    assert unfinished.final_status() is None and unfinished.selected.exists()
    path = evaluate_across_runs(ds, tmp_path, [tmp_path / f.run_id for f in folders], config=CFG, device="cpu")
    records = read_records([path])
    assert records and all(r["members"] == [folders[0].run_id] for r in records)


def test_launch_skips_finished_runs_and_run_folders_of_the_previous_release(grid, ds, tmp_path):
    """The previous release marked a finished run with a "done" file after its final record; today the final
    record alone says it is done, so such a folder is skipped and left as it is."""
    out, folders, _ = grid
    for f in folders:
        shutil.copytree(f.root, tmp_path / f.run_id)
        (tmp_path / f.run_id / "done").write_text("ok\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    runs = [RUN, replace(RUN, lr=0.005, weight_decay=0.0)]
    result = launch_sweep(ds, tmp_path, runs, backbone="demo-resnet", weights="DEFAULT", config=CFG,
                          options=LaunchOptions(device="cpu", progress=False))
    assert result.launched == 0 and result.skipped == 2  # launched now: none
    assert [r.status for r in result.runs] == [RunStatus.DONE, RunStatus.DONE]
    assert not (tmp_path / "planned.json").exists()  # nothing to do: the folder is left as it is
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert all(RunFolder(tmp_path / f.run_id).final_status() == "ok" for f in folders)


# --------------------------------------------------------------------------- launchers


def test_submitit_local_sweep_is_idempotent(ds, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="the slurm launcher's engine (pip install submitit)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = replace(CFG, steps=2)
    runs = [FineTuneRun("photo", 0, lr, 0.0) for lr in (1e-3, 5e-4)]
    options = LaunchOptions(launcher="submitit-local", device="cpu", progress=False)
    kw = dict(backbone="demo-resnet", weights="none", config=config)
    first = launch_sweep(ds, tmp_path, runs, options=options, **kw)
    assert first.launched == 2 and first.skipped == 0 and len(first.jobs) == 2
    assert [r.status for r in first.runs] == [RunStatus.TRAINED, RunStatus.TRAINED]
    assert (tmp_path / "submitit").is_dir() and SweepFolder(tmp_path).submitit == tmp_path / "submitit"
    folders = folders_of(ds, tmp_path, runs, config, weights="none")
    for f in folders:
        assert f.final_status() == "ok" and not f.checkpoint.exists()
        records = read_records([f.records])
        assert [r["step"] for r in records] == [0, 1] and records[-1]["final"]
        assert records[0]["dataset"] == "Shapes" and records[0]["method"] == "scratch"
    second = launch_sweep(ds, tmp_path, runs, options=options, **kw)
    assert second.launched == 0 and second.skipped == 2 and second.jobs == []
    with refused("launcher"):
        launch_sweep(ds, tmp_path, runs, options=replace(options, launcher="kubernetes"), **kw)


def test_slurm_launcher_without_slurm_is_one_line_before_anything_is_written(ds, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="the slurm launcher's engine (pip install submitit)")
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    with pytest.raises(LinftError, match="srun.*not found.*launcher 'local'"):
        launch_sweep(ds, tmp_path / "out", [RUN], backbone="demo-resnet", weights="none", config=CFG,
                     options=LaunchOptions(launcher="slurm", device="cpu", progress=False))
    assert not (tmp_path / "out").exists()


def test_a_failed_job_is_a_failed_run_with_its_reason(ds, tmp_path, monkeypatch):
    """A job that raises (here: a held-out domain the dataset lacks, refused inside the job) is RunStatus.FAILED with
    the last line of its error; the runs beside it still count."""
    pytest.importorskip("submitit", reason="the slurm launcher's engine (pip install submitit)")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = [FineTuneRun("photo", 0, 1e-3, 0.0), FineTuneRun("nowhere", 0, 1e-3, 0.0)]
    result = launch_sweep(ds, tmp_path, runs, backbone="demo-resnet", weights="none", config=replace(CFG, steps=2),
                          options=LaunchOptions(launcher="submitit-local", device="cpu", progress=False))
    assert [r.status for r in result.runs] == [RunStatus.TRAINED, RunStatus.FAILED]
    assert result.failed == [result.runs[1]] and "nowhere" in result.runs[1].detail
    assert [r.final for r in result.runs] == ["ok", None] and result.usable == 1

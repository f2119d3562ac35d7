"""Full fine-tuning (linft.finetune), its ensembles and soups, sweeps and `linft finetune`, on tiny data (CPU).

Three 12-image style domains of 32 px shapes (2 classes), the demo backbone
briefly trained on them and saved as the "pretrained" weights file, runs of 2
to 9 steps with 4 images per training domain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import linft.finetune as ft
from linft.averaging import average_state_dicts
from linft.backbones import load_backbone, residual_block_names
from linft.cli.main import main
from linft.data import load_image_folder, split_indices
from linft.errors import LinftError
from linft.features import normalize_uint8
from linft.finetune import (FineTuneConfig, FineTuneRun, add_stochastic_depth, build_classifier, build_run_model,
                            evaluate_across_runs, load_selected, set_train_mode, step_batch, train_run)
from linft.pretrain import demo_resnet
from linft.protocol import domain_split_rows, select_by_iid
from linft.records import REQUIRED_FIELDS, read_records, run_id

from conftest import SHAPE_CLASSES as CLASSES, SHAPE_STYLES as STYLES, assert_one_line_error

# evaluations at steps 0, 4 and 8; lr ÷10 at step 4 (round(4.5))
CFG = FineTuneConfig(steps=9, batch_size=4, eval_every=4, image_size=32, eval_batch_size=64, workers=0,
                     trajectory=True)
EVALS, LAST = [0, 4, 8], 8
# seed 2: the fresh head starts at an i.i.d. accuracy of 0.25 and the best step is a later one
RUN = FineTuneRun("photo", seed=2, lr=0.001, weight_decay=1e-4, dropout=0.5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def data_root(shapes_root) -> Path:
    return shapes_root


@pytest.fixture(scope="module")
def ds(data_root):
    return load_image_folder(data_root)


@pytest.fixture(scope="module")
def pretrained(ds, tmp_path_factory) -> Path:
    """A demo-resnet state_dict file trained 30 full-batch steps on the tiny data, with its BatchNorm statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = demo_resnet(num_classes=2)
        x, y = normalize_uint8(ft.EvalImages(ds, 32, 64, 0).images), torch.as_tensor(ds.labels)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(30):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():  # running statistics = the statistics of the whole set
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
            model(x)
    path = tmp_path_factory.mktemp("weights") / "demo.pt"
    torch.save(model.state_dict(), path)
    return path


def train(ds, out, pretrained, run=RUN, config=CFG, **kw):
    """train_run, capturing the model state_dict of every checkpoint written: ``(result, {step: state})``."""
    states = {}
    save = ft._save_atomic

    def capture(obj, path):
        save(obj, path)
        if "optimizer" in obj:
            states[obj["step"]] = {k: v.clone() for k, v in obj["model"].items()}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "_save_atomic", capture)
        result = train_run(ds, out, run, backbone="demo-resnet", weights=str(pretrained), config=config, device="cpu",
                           progress=False, **kw)
    return result, states


def records_of(run_dir) -> list[dict]:
    return read_records([Path(run_dir) / "records.jsonl"])


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(ds, pretrained, tmp_path_factory):
    """One uninterrupted run with trajectory ensembles: ``(result, records, {step: state})``."""
    result, states = train(ds, tmp_path_factory.mktemp("reference"), pretrained)
    return result, records_of(result.run_dir), states


# --------------------------------------------------------------------------- the protocol's pieces


def test_classifier_head_is_dropout_then_linear(pretrained):
    bb = load_backbone("demo-resnet", str(pretrained))
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    rng = torch.get_rng_state()
    model = build_classifier(bb.model, 3, 0.9, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the head's init leaves the global RNG alone
    drop, linear = model.fc
    assert isinstance(drop, nn.Dropout) and drop.p == 0.9
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (512, 3)
    after = model.state_dict()
    assert set(after) == {k for k in before if not k.startswith("fc.")} | {"fc.1.weight", "fc.1.bias"}
    for k, v in before.items():
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), k
    again = build_classifier(load_backbone("demo-resnet", str(pretrained)).model, 3, 0.9, seed=5)
    assert torch.equal(again.fc[1].weight, linear.weight)
    # inverted dropout on the penultimate representation: zero or Φ/(1-λ) in training, identity in eval
    phi = torch.rand(64, 512) + 0.1
    model.fc.train()
    torch.manual_seed(0)
    dropped = drop(phi)
    kept = dropped != 0
    assert 0.02 < kept.float().mean() < 0.2
    torch.testing.assert_close(dropped[kept], phi[kept] / 0.1)
    model.fc.eval()
    assert torch.equal(drop(phi), phi)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(LinftError, match="outside"):
            build_classifier(demo_resnet(), 3, bad)


def test_frozen_batchnorm_keeps_running_statistics(pretrained):
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1])
    for freeze in (True, False):
        model, _ = build_run_model("demo-resnet", str(pretrained), 2, RUN, torch.device("cpu"))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        set_train_mode(model, True, freeze_bn=freeze)
        assert model.training and model.fc.training  # dropout stays active
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        after = model.state_dict()
        stats = [k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        changed = [k for k in stats if not torch.equal(after[k], before[k])]
        if freeze:
            assert changed == []
            assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        else:
            assert len(changed) == len(stats)  # the control: an unfrozen step does move them
        assert not torch.equal(after["conv1.weight"], before["conv1.weight"])
        assert not torch.equal(after["bn1.weight"], before["bn1.weight"])  # affine parameters are trained


def test_stochastic_depth_keeps_pretrained_weights_and_drops_branches(pretrained):
    state = torch.load(pretrained, weights_only=True)
    plain = load_backbone("demo-resnet", str(pretrained)).model
    model = load_backbone("demo-resnet", str(pretrained)).model
    keys = list(model.state_dict())
    handles = add_stochastic_depth(model, 0.5)
    assert len(handles) == len(residual_block_names(model)) == 7
    assert list(model.state_dict()) == keys
    model.load_state_dict(state, strict=True)
    # what the run model is made of: the pretrained weights, loaded strictly (the official code's bug: random)
    run_model, _ = build_run_model("demo-resnet", str(pretrained), 2, replace(RUN, stochastic_depth=0.2),
                                   torch.device("cpu"))
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(run_model.state_dict()[k], v), k
    with pytest.raises(LinftError, match="outside"):
        add_stochastic_depth(plain, 1.0)

    x = torch.randn(16, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # identity in eval mode
    # training mode with frozen BN: each sample's branch is either zeroed or scaled by 1/(1-p)
    end = model.layer3[1].bn3
    seen = {}
    raw_handle = end.register_forward_hook(lambda m, i, o: seen.__setitem__("raw", o.clone()), prepend=True)
    end.register_forward_hook(lambda m, i, o: seen.__setitem__("dropped", o.clone()))
    set_train_mode(model, True, freeze_bn=True)
    torch.manual_seed(0)
    with torch.no_grad():
        model(x)
    raw_handle.remove()
    zeroed = (seen["dropped"] == 0).flatten(1).all(1)
    assert 0 < zeroed.sum() < 16
    torch.testing.assert_close(seen["dropped"][~zeroed], seen["raw"][~zeroed] / 0.5)
    # rate 0 is the identity, also in training mode
    zero = load_backbone("demo-resnet", str(pretrained)).model
    add_stochastic_depth(zero, 0.0)
    set_train_mode(zero, True)
    set_train_mode(plain, True)
    with torch.no_grad():
        assert torch.equal(zero(x), plain(x))


@pytest.fixture(scope="module")
def grid(ds, pretrained, tmp_path_factory):
    """Two runs of one label (10x head lr), logging the optimizer's lrs and the batches of every step."""
    out = tmp_path_factory.mktemp("grid")
    config = replace(CFG, steps=4, eval_every=100, trajectory=False)  # evaluations at 0 and 3, lr ÷10 at 2
    runs = [replace(RUN, lr=0.01, last_layer_lr_mult=10.0), replace(RUN, lr=0.005, weight_decay=0.0,
                                                                    last_layer_lr_mult=10.0)]
    logs = []
    for run in runs:
        lrs, batches = [], []
        sgd_step, draw = torch.optim.SGD.step, ft.step_batch

        def logged_step(self, *a, **k):
            lrs.append([(g["lr"], [tuple(p.shape) for p in g["params"]]) for g in self.param_groups])
            return sgd_step(self, *a, **k)

        def logged_batch(*a, **k):
            batches.append(draw(*a, **k))
            return batches[-1]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.optim.SGD, "step", logged_step)
            mp.setattr(ft, "step_batch", logged_batch)
            result, _ = train(ds, out, pretrained, run=run, config=config)
        logs.append((run, result, lrs, batches))
    return out, config, logs


def test_learning_rate_schedule_and_head_multiplier(grid, pretrained):
    _, _, logs = grid
    head_shapes = [(2, 512), (2,)]
    for run, result, lrs, _ in logs:
        assert result.status == "trained" and len(lrs) == 4
        for step, groups in enumerate(lrs):
            scale = 1.0 if step < 2 else 0.1  # ÷10 at half
            body = [lr for lr, shapes in groups if shapes != head_shapes]
            head = [lr for lr, shapes in groups if shapes == head_shapes]
            assert len(body) == len(head) == 1
            assert body[0] == pytest.approx(run.lr * scale)
            assert head[0] == pytest.approx(run.lr * 10 * scale)
        n_body = sum(len(shapes) for _, shapes in lrs[0]) - 2
        model, _ = build_run_model("demo-resnet", str(pretrained), 2, run, torch.device("cpu"))
        assert n_body == len(list(model.parameters())) - 2  # every other parameter is in the body group


def test_batches_come_from_training_in_splits_and_ignore_lr(grid, ds):
    _, config, logs = grid
    rows = domain_split_rows(ds.domain_ids, 3, RUN.seed)
    e = ds.domains.index(RUN.test_domain)
    train_domains = [d for d in range(3) if d != e]
    (_, _, _, batches_a), (_, _, _, batches_b) = logs
    assert len(batches_a) == config.steps
    assert batches_a == batches_b  # lr and weight decay differ, batches and augmentations do not
    for batch in batches_a:
        picked = np.array([r for r, _ in batch])
        assert len(picked) == config.batch_size * 2
        for j, d in enumerate(train_domains):  # batch_size rows of each training domain's "in" split, in order
            assert set(picked[j * config.batch_size:(j + 1) * config.batch_size]) <= set(rows[(d, "in")])
    pools = [rows[(d, "in")] for d in train_domains]
    assert step_batch(pools, 4, 0, e, 3) == step_batch(pools, 4, 0, e, 3)
    assert step_batch(pools, 4, 0, e, 3) != step_batch(pools, 4, 0, e, 2)
    assert step_batch(pools, 4, 0, e, 3) != step_batch(pools, 4, 1, e, 3)
    assert step_batch(pools, 4, 0, e, 3) != step_batch(pools, 4, 0, (e + 1) % 3, 3)
    big = step_batch(pools, 200, 0, e, 0)  # with replacement: a draw larger than the pool works
    assert len(big) == 400 and len({r for r, _ in big}) <= sum(map(len, pools))


# --------------------------------------------------------------------------- records


def test_records_one_per_evaluation_with_every_split(reference, ds, tmp_path):
    result, records, _ = reference
    main = [r for r in records if r["run_id"] == result.run_id]
    assert [r["step"] for r in main] == EVALS
    assert [r["final"] for r in main] == [False, False, True]
    sizes = {}
    for d, name in enumerate(ds.domains):
        in_idx, out_idx = split_indices(int((ds.domain_ids == d).sum()), RUN.seed, d)
        sizes[f"{name}_in"], sizes[f"{name}_out"] = len(in_idx), len(out_idx)
    assert sizes["photo_in"] == 10 and sizes["photo_out"] == 2
    for r in records:
        assert all(k in r for k in REQUIRED_FIELDS + ("method", "dataset", "hparams", "grid", "loss", "status",
                                                      "final", "attempt"))
        assert {k: v[1] for k, v in r["splits"].items()} == sizes
        assert all(0 <= c <= t for c, t in r["splits"].values())
        assert r["test_domain"] == "photo" and r["train_domains"] == ["cartoon", "sketch"] and r["seed"] == 2
        assert r["grid"] == {"lr": RUN.lr, "weight_decay": RUN.weight_decay}
        assert r["hparams"]["dropout"] == 0.5 and r["status"] == "ok"
    assert main[0]["method"] == "finetune" and main[0]["label"] == "full FT, dropout 0.5"
    assert all(np.isfinite(r["loss"]) for r in main)
    assert len(records) == len({(r["run_id"], r["step"]) for r in records})
    from linft.report import write_report
    paths = write_report([result.run_dir], tmp_path / "report")
    assert paths["table"].is_file()
    assert "full FT, dropout 0.5, trajectory ensemble" in paths["table"].read_text()


def test_same_seed_same_records(reference, ds, pretrained, tmp_path):
    result, records, states = reference
    again, states_again = train(ds, tmp_path, pretrained)
    assert again.run_id == result.run_id and again.run_dir != result.run_dir
    assert records_of(again.run_dir) == records
    assert_states_equal(states_again[LAST], states[LAST])


def test_diverged_run_is_recorded_and_left_out_of_tables(ds, pretrained, tmp_path):
    from linft.report import domainbed_table, run_results

    run = FineTuneRun("photo", seed=0, lr=1e12, weight_decay=0.0)
    result = ft.train_run(ds, tmp_path, run, backbone="demo-resnet", weights=str(pretrained), config=CFG,
                          device="cpu", progress=False)
    assert result.status == "diverged"
    records = records_of(result.run_dir)
    assert records[-1]["status"] == "diverged" and records[-1]["final"] and records[-1]["step"] in EVALS
    assert (result.run_dir / ft.DONE_FILE).read_text() == "diverged\n"
    results = run_results(records)
    assert len(results) == 3 and {r.status for r in results} == {"diverged"}  # the run and its trajectory
    assert domainbed_table(results) == {}  # never averaged in
    again = ft.train_run(ds, tmp_path, run, backbone="demo-resnet", weights=str(pretrained), config=CFG,
                         device="cpu", progress=False)
    assert again.status == "diverged" and records_of(result.run_dir) == records  # kept as it was, nothing written


def test_selected_model_is_the_best_iid_step(reference):
    result, records, states = reference
    main = [r for r in records if r["run_id"] == result.run_id]
    best = select_by_iid(main)["step"]
    state, meta = load_selected(result.run_dir)
    raw = torch.load(result.run_dir / "selected.pt", map_location="cpu", weights_only=True)
    assert meta == raw["metadata"] and meta["step"] == best and meta["run_id"] == result.run_id
    assert meta["class_names"] == list(CLASSES) and meta["num_classes"] == 2
    assert_states_equal(state, states[best])
    assert sorted(p.name for p in result.run_dir.iterdir()) == ["done", "records.jsonl", "run.json", "selected.pt"]


def test_trajectory_ensemble_and_average(reference, ds, pretrained):
    result, records, states = reference
    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == {"finetune", "finetune-trajectory-ensemble", "finetune-trajectory-average"}
    assert [r["step"] for r in by["finetune"]] == EVALS
    for method in ("finetune-trajectory-ensemble", "finetune-trajectory-average"):  # the step-0 model is left out
        assert [r["step"] for r in by[method]] == EVALS[1:] and [r["final"] for r in by[method]] == [False, True]
    assert by["finetune-trajectory-ensemble"][0]["label"] == "full FT, dropout 0.5, trajectory ensemble"
    # an ensemble (or average) of one model is that model
    assert by["finetune-trajectory-ensemble"][0]["splits"] == by["finetune"][1]["splits"]
    assert by["finetune-trajectory-average"][0]["splits"] == by["finetune"][1]["splits"]
    # the last average is the average of the checkpoints at every evaluation after step 0, on every split
    net = build_classifier(demo_resnet(2), 2, 0.5)
    net.load_state_dict(average_state_dicts([states[s] for s in EVALS[1:]]), strict=True)
    images = ft.EvalImages(ds, 32, 64, 0)
    logits = ft.predict_logits(net, images, torch.device("cpu"), channels_last=True)
    split_rows = domain_split_rows(ds.domain_ids, 3, RUN.seed)
    assert ft.split_counts(logits.argmax(1), ds.labels, split_rows, ds.domains) == \
        by["finetune-trajectory-average"][-1]["splits"]


def test_ensembles_and_soups_across_runs(grid, ds):
    out, config, logs = grid
    run_dirs = [result.run_dir for _, result, _, _ in logs]
    path = evaluate_across_runs(ds, out, run_dirs, config=config, device="cpu")
    records = read_records([path])
    label = "full FT, 10x head lr, dropout 0.5"
    assert sorted(r["method"] for r in records) == ["finetune-ensemble", "finetune-greedy-soup", "finetune-soup"]
    for r in records:
        assert r["label"].startswith(label + ", ") and r["test_domain"] == "photo"
        assert r["final"] and len(r["members"]) == 2 and r["seed"] == 2 and r["hparams"]["members"] == 2
        assert set(r["splits"]) == {f"{d}_{p}" for d in ds.domains for p in ("in", "out")}
    # the ensemble is the mean of the two selected models' probabilities; the soup their weight average
    split_rows = domain_split_rows(ds.domain_ids, 3, RUN.seed)
    images = ft.EvalImages(ds, 32, 64, 0)
    states = [load_selected(d)[0] for d in run_dirs]

    def logits(state):
        net = build_classifier(demo_resnet(2), 2, 0.0)
        net.load_state_dict(state, strict=True)
        return ft.predict_logits(net, images, torch.device("cpu"), channels_last=False)

    probs = torch.stack([logits(s).softmax(1) for s in states]).mean(0)
    by = {r["method"]: r for r in records}
    assert by["finetune-ensemble"]["splits"] == ft.split_counts(probs.argmax(1), ds.labels, split_rows, ds.domains)
    soup = logits(average_state_dicts(states)).argmax(1)
    assert by["finetune-soup"]["splits"] == ft.split_counts(soup, ds.labels, split_rows, ds.domains)
    assert by["finetune-greedy-soup"]["hparams"]["chosen"][0] == 0
    # a second evaluation adds nothing
    before = path.read_bytes()
    evaluate_across_runs(ds, out, run_dirs, config=config, device="cpu")
    assert path.read_bytes() == before
    from linft.report import write_report
    assert write_report([out], out / "report")["table"].is_file()


# --------------------------------------------------------------------------- resuming


class _Interrupt:
    """Raise KeyboardInterrupt right after the checkpoint, or the main record, of ``step`` is written."""

    def __init__(self, what, step):
        self.what, self.step = what, step

    def __enter__(self):
        self.mp = pytest.MonkeyPatch()
        if self.what == "checkpoint":
            save = ft._save_atomic

            def save_then_stop(obj, path):
                save(obj, path)
                if "optimizer" in obj and obj["step"] == self.step:
                    raise KeyboardInterrupt

            self.mp.setattr(ft, "_save_atomic", save_then_stop)
        else:  # a record written, selected.pt and the checkpoint not yet
            step = self.step

            class StoppingWriter(ft.RecordWriter):
                def write(self, record):
                    super().write(record)
                    if record["step"] == step and record["method"] == "finetune":
                        raise KeyboardInterrupt

            self.mp.setattr(ft, "RecordWriter", StoppingWriter)
        return self

    def __exit__(self, *exc):
        self.mp.undo()


def assert_same_as_reference(result, states, reference):
    ref_result, ref_records, ref_states = reference
    assert result.status == "resumed" and result.run_id == ref_result.run_id
    records = records_of(result.run_dir)
    assert records == ref_records  # no duplicated or missing steps, same numbers
    assert_states_equal(states[LAST], ref_states[LAST])  # final weights
    assert_states_equal(load_selected(result.run_dir)[0], load_selected(ref_result.run_dir)[0])
    assert load_selected(result.run_dir)[1]["step"] == load_selected(ref_result.run_dir)[1]["step"]
    assert not (result.run_dir / "checkpoint.pt").exists() and (result.run_dir / "done").exists()


@pytest.mark.parametrize("what", ["checkpoint", "record"])
def test_interrupted_run_resumes_exactly(reference, ds, pretrained, tmp_path, what):
    ref_result, ref_records, _ = reference
    best = load_selected(ref_result.run_dir)[1]["step"]
    assert best > 0  # so that the "record" case stops where selected.pt is about to be replaced
    with _Interrupt(what, 4 if what == "checkpoint" else best), pytest.raises(KeyboardInterrupt):
        train(ds, tmp_path, pretrained)
    result, states = train(ds, tmp_path, pretrained)
    assert min(states) > 0  # it did not start again at step 0
    assert_same_as_reference(result, states, reference)
    # a finished run is skipped and nothing is written
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in result.run_dir.iterdir()}
    again = train_run(ds, tmp_path, RUN, backbone="demo-resnet", weights=str(pretrained), config=CFG,
                      device="cpu", progress=False)
    assert again.status == "done" and again.steps_trained == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in result.run_dir.iterdir()} == files


def test_resume_with_ensembles_needs_a_checkpoint_that_has_them(ds, pretrained, tmp_path):
    without = replace(CFG, trajectory=False)  # same run id: ensembles are not part of what a run is
    with _Interrupt("checkpoint", 0), pytest.raises(KeyboardInterrupt):
        train(ds, tmp_path, pretrained, config=without)
    with pytest.raises(LinftError, match="without --ensembles"):
        train(ds, tmp_path, pretrained)
    result, _ = train(ds, tmp_path, pretrained, config=without)
    assert result.status == "resumed"


KILLED_RUN = """
import json, sys, time, torch
torch.set_num_threads(1)
import linft.finetune as ft
from linft.data import load_image_folder
root, out, weights, run, config = sys.argv[1:]
draw = ft.step_batch
def slow_batch(*a, **k):  # slow steps, so that the kill lands between evaluations
    time.sleep(0.4)
    return draw(*a, **k)
ft.step_batch = slow_batch
config = json.loads(config)
config["lr_milestones"] = tuple(config["lr_milestones"])
ft.train_run(load_image_folder(root), out, ft.FineTuneRun(**json.loads(run)), backbone="demo-resnet",
             weights=weights, config=ft.FineTuneConfig(**config), device="cpu", progress=False)
"""


def test_sigkilled_run_resumes_exactly(reference, ds, data_root, pretrained, tmp_path):
    ref_result = reference[0]
    run_dir = tmp_path / ref_result.run_id
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(data_root), str(tmp_path), str(pretrained),
                             json.dumps(asdict(RUN)), json.dumps(asdict(CFG))], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            records = run_dir / "records.jsonl"
            if (run_dir / "checkpoint.pt").exists() and records.exists() and \
                    len(records.read_text().splitlines()) >= 1:  # step 0 evaluated and checkpointed
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "done").exists()
    result, states = train(ds, tmp_path, pretrained)
    assert_same_as_reference(result, states, reference)


# --------------------------------------------------------------------------- sweeps


def test_submitit_local_sweep_is_idempotent(data_root, tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="the slurm launcher's engine (pip install submitit)")
    from linft.sweep import launch_sweep

    ds = load_image_folder(data_root, "Shapes")  # the jobs must keep the dataset's name

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = replace(CFG, steps=2, eval_every=100, trajectory=False)
    runs = [FineTuneRun("photo", 0, lr, 0.0) for lr in (1e-3, 5e-4)]
    kw = dict(backbone="demo-resnet", weights="none", config=config, launcher="submitit-local", device="cpu",
              progress=False)
    first = launch_sweep(ds, tmp_path, runs, **kw)
    assert first["submitted"] == 2 and first["skipped"] == 0 and first["statuses"] == ["trained", "trained"]
    done = sorted(p.parent for p in tmp_path.glob("*/done"))
    assert len(done) == 2
    for d in done:
        records = records_of(d)
        assert [r["step"] for r in records] == [0, 1] and records[-1]["final"]
        assert records[0]["dataset"] == "Shapes" and records[0]["method"] == "scratch"
    second = launch_sweep(ds, tmp_path, runs, **kw)
    assert second["submitted"] == 0 and second["skipped"] == 2 and second["jobs"] == []
    with pytest.raises(LinftError, match="unknown launcher"):
        launch_sweep(ds, tmp_path, runs, **{**kw, "launcher": "kubernetes"})


# --------------------------------------------------------------------------- the command


def tiny_args(data_root, out, *extra):
    return [str(a) for a in ("finetune", data_root, "--backbone", "demo-resnet", "--weights", "none", "--steps", 3,
                             "--eval-every", 2, "--batch-size", 2, "--image-size", 32, "--workers", 0,
                             "--device", "cpu", "--seeds", 1, "--lr", 1e-3, "--weight-decay", 0,
                             "--test-domains", "photo", "--quiet", "--out", out, *extra)]


def test_cli_finetune_end_to_end(data_root, tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(main, tiny_args(data_root, out))
    assert result.exit_code == 0, result.output
    assert "from scratch, dropout 0" in result.output and "photo" in result.output  # the table
    records = read_records([out])
    assert [r["step"] for r in records] == [0, 2] and {r["method"] for r in records} == {"scratch"}
    assert records[0]["label"] == "from scratch, dropout 0"
    again = CliRunner().invoke(main, tiny_args(data_root, out))
    assert again.exit_code == 0 and "0 runs launched (1 already done)" in again.output
    assert read_records([out]) == records


def test_cli_linearized(data_root, pretrained, tmp_path):
    out = tmp_path / "lin"
    args = tiny_args(data_root, out, "--linearized")
    args[args.index("--weights") + 1] = str(pretrained)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    records = read_records([out])
    assert [r["step"] for r in records] == [0, 2]
    assert {r["method"] for r in records} == {"linearized-finetune"}
    assert records[0]["label"] == "linearized FT, dropout 0"
    state, meta = load_selected(out / records[0]["run_id"])
    assert meta["linearized"] and "fc.1.weight" in state  # an ordinary network's state_dict


@pytest.mark.parametrize("case,extra,fragments", [
    ("missing", [], ["does not exist"]),
    ("backbone", ["--backbone", "resnet9000"], ["resnet9000"]),
    ("domain", ["--test-domains", "oil painting"], ["'oil painting'", "not in the dataset"]),
    ("dropout", ["--dropout", "1.0"], ["dropout rate 1.0", "outside [0, 1)"]),
])
def test_cli_bad_input(data_root, tmp_path, case, extra, fragments):
    root = tmp_path / "nowhere" if case == "missing" else data_root
    args = tiny_args(root, tmp_path / "out")
    if case == "domain":
        args = args[:args.index("--test-domains")] + args[args.index("--test-domains") + 2:]
    result = CliRunner().invoke(main, args + extra)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("content,fragment", [
    ("garbage", "cannot read checkpoint"),
    ("other run", "belongs to another run"),
    ("tensor", "not a linft fine-tuning checkpoint"),
])
def test_cli_incompatible_checkpoint(data_root, ds, tmp_path, content, fragment):
    out = tmp_path / "runs"
    config = FineTuneConfig(steps=3, batch_size=2, eval_every=2, image_size=32)
    run = ft.sweep_runs(ds.domains, test_domains=["photo"], lrs=[1e-3], weight_decays=[0.0], seeds=1)[0]
    sha = load_backbone("demo-resnet", "none").weights_sha256
    run_dir = out / run_id(**ft.run_identity(run, "demo-resnet", sha, ds.file_list_sha256, config))
    run_dir.mkdir(parents=True)
    ckpt = run_dir / "checkpoint.pt"
    if content == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "other run":
        torch.save({"run_id": "0123456789abcdef", "step": 0, "model": {}, "optimizer": {}}, ckpt)
    else:
        torch.save(torch.zeros(3), ckpt)
    record = {"run_id": run_dir.name, "label": "x", "test_domain": "photo", "train_domains": ["cartoon", "sketch"],
              "seed": 0, "step": 0, "splits": {}}
    (run_dir / "records.jsonl").write_text(json.dumps(record) + "\n")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = CliRunner().invoke(main, tiny_args(data_root, out))
    assert_one_line_error(result, fragment, "checkpoint.pt")
    after = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert after.pop("run.json") and after == before  # nothing damaged, nothing marked done

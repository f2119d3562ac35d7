"""Fine-tuning runs (linft.train.finetune.run): the protocol's pieces, records, the selected model, trajectory
ensembles, resuming, the variants and `linft finetune`, on tiny data (CPU).

Three 12-image style domains of 32 px shapes (2 classes), the demo backbone
briefly trained on them and saved as the "pretrained" weights file, runs of 2
to 9 steps with 4 images per training domain. Runs are observed through
their hooks (:class:`~linft.train.finetune.hooks.RunHooks`). Sweeps, launchers and
the ensembles and soups across runs are in ``test_sweep.py``.
"""

from __future__ import annotations

import json
import os
import shutil
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

import linft.train.finetune.model as finetune_model
import linft.train.finetune.run as finetune_run
from linft.analysis.aggregate import domainbed_table, run_results
from linft.analysis.report import write_report
from linft.cli.main import main
from linft.data.folders import load_image_folder
from linft.data.images import EvalImages, normalize_uint8
from linft.data.splits import domain_split_rows, split_indices
from linft.errors import LinftError
from linft.models.averaging import average_state_dicts
from linft.models.blocks import add_stochastic_depth, residual_block_names, residual_branch_ends
from linft.models.demo_resnet import demo_resnet
from linft.models.heads import build_classifier
from linft.models.registry import load_backbone
from linft.protocol.records import REQUIRED_FIELDS, read_records
from linft.protocol.selection import select_by_iid, split_counts
from linft.train.finetune.run import load_selected, run_identity, sweep_runs, train_run
from linft.train.finetune.hooks import RunHooks
from linft.train.finetune.model import (FineTuneConfig, FineTuneRun, build_run_model, predict_logits, set_train_mode,
                                        step_batch)
from linft.train.finetune.run_folder import RunFolder

from conftest import SHAPE_CLASSES as CLASSES, assert_one_line_error
from helpers import refused, assert_counts_agree, near_ties

# evaluations at steps 0, 4 and 8; lr ÷10 at step 4 (round(4.5)). Step 4 is an evaluation that is neither the
# first nor the last one, so it has a checkpoint and a step-0 checkpoint before it: the interruption tests rely
# on this, and it holds by construction of CFG (asserted in `test_config_evaluates_at_0_4_8`).
CFG = FineTuneConfig(steps=9, batch_size=4, eval_every=4, image_size=32, eval_batch_size=64, workers=0,
                     trajectory=True)
EVALS, LAST = [0, 4, 8], 8
RUN = FineTuneRun("photo", seed=2, lr=0.001, weight_decay=1e-4, dropout=0.5)

# Two code paths (another convolution kernel for another weight layout, a softmax before the argmax) move float32
# logits of these tiny networks by ~1e-6; an image whose top-2 logit margin is below helpers.NEAR_TIE (1e-3) may
# change its predicted class between them, so split counts of two code paths may differ by the near ties of the split
# (helpers.near_ties, helpers.assert_counts_agree).


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
        x, y = normalize_uint8(EvalImages(ds, 32, 64, 0).images), torch.as_tensor(ds.labels)
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


class Observer:
    """The hooks of a run, recording what it did: the model's state_dict at every evaluation, the steps trained,
    the checkpoints on disk. ``stop_at=("eval" | "checkpoint", step)`` raises KeyboardInterrupt from that hook at
    that step: right after the run's record of ``step`` is written (before its checkpoint), or right after its
    checkpoint is on disk."""

    def __init__(self, stop_at: tuple[str, int] | None = None):
        self.stop_at = stop_at
        self.states: dict[int, dict] = {}
        self.steps: list[int] = []
        self.checkpoints: list[int] = []

    def hooks(self) -> RunHooks:
        return RunHooks(on_eval=self.on_eval, on_checkpoint=self.on_checkpoint, on_step=self.steps.append)

    def on_eval(self, event) -> None:
        self.states[event.step] = {k: v.detach().clone() for k, v in event.model.state_dict().items()}
        if self.stop_at == ("eval", event.step):
            raise KeyboardInterrupt

    def on_checkpoint(self, step: int, path: Path) -> None:
        assert path.is_file()
        self.checkpoints.append(step)
        if self.stop_at == ("checkpoint", step):
            raise KeyboardInterrupt


def train(ds, out, pretrained, run=RUN, config=CFG, observer: Observer | None = None):
    """train_run of the demo backbone from ``pretrained`` on the CPU: ``(outcome, observer)``."""
    observer = observer or Observer()
    outcome = train_run(ds, out, run, backbone="demo-resnet", weights=str(pretrained), config=config, device="cpu",
                        progress=False, hooks=observer.hooks())
    return outcome, observer


def records_of(run_dir) -> list[dict]:
    return read_records([Path(run_dir) / "records.jsonl"])


def files_of(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(ds, pretrained, tmp_path_factory):
    """One uninterrupted run with trajectory ensembles: ``(outcome, records, {step: model state})``."""
    outcome, observer = train(ds, tmp_path_factory.mktemp("reference"), pretrained)
    assert outcome.status == "trained" and observer.steps == list(range(CFG.steps))
    assert sorted(observer.states) == EVALS and observer.checkpoints == EVALS[:-1]  # no checkpoint at the end
    return outcome, records_of(outcome.run_dir), observer.states


def test_config_evaluates_at_0_4_8():
    from linft.protocol.schedule import eval_steps

    assert list(eval_steps(CFG.steps, CFG.eval_every)) == EVALS and CFG.milestone_steps() == (4,)


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
    assert 0.02 < kept.float().mean() < 0.2  # 32768 draws kept with probability 0.1: std 0.0017
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
    with refused("stochastic_depth"):
        add_stochastic_depth(plain, 1.0)

    x = torch.randn(16, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))  # identity in eval mode (the same forward: the hooks do nothing)
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


def test_official_stochastic_depth_drops_whole_branches_for_the_batch_without_rescaling(pretrained):
    """The official code's mode: one draw per branch for the whole batch (torch's global generator, in branch
    order), the branch kept as it is or zeroed; eval mode untouched. Compared with hooks that apply the same draws."""
    x = torch.randn(8, 3, 32, 32)
    model = load_backbone("demo-resnet", str(pretrained)).model
    add_stochastic_depth(model, 0.5, "official")
    manual = load_backbone("demo-resnet", str(pretrained)).model
    ends = residual_branch_ends(manual)
    torch.manual_seed(3)
    keep = [bool(torch.rand(()) >= 0.5) for _ in ends]
    assert 0 < sum(keep) < len(keep)  # seed 3 keeps some branches and drops others (checked here, not assumed)
    for end, k in zip(ends, keep):
        end.register_forward_hook(lambda m, i, o, k=k: o if k else o * 0.0)
    set_train_mode(model, True, freeze_bn=True)
    set_train_mode(manual, True, freeze_bn=True)
    torch.manual_seed(3)
    with torch.no_grad():
        got = model(x)
        expected = manual(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same operations in the same order
    model.eval()
    plain = load_backbone("demo-resnet", str(pretrained)).model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    with refused("stochastic_depth_mode"):
        add_stochastic_depth(plain, 0.1, "batch")
    official = sweep_runs(["a", "b"], stochastic_depth=0.1, stochastic_depth_mode="official", seeds=1, lrs=(0.1,),
                          weight_decays=(0.0,))[0]
    assert official.identity()["stochastic_depth_mode"] == "official"
    assert "stochastic_depth_mode" not in replace(official, stochastic_depth_mode="row").identity()  # ids kept


@pytest.fixture(scope="module")
def grid(ds, pretrained, tmp_path_factory):
    """Two runs of one label (10x head lr), logging the optimizer's lrs and the batches of every step.

    The lrs are read at every ``torch.optim.SGD.step``, the batches at every call of the public
    :func:`linft.train.finetune.model.step_batch` (the definition of a step's rows): both only observed, not
    changed. No hook of a run carries them.
    """
    out = tmp_path_factory.mktemp("grid")
    config = replace(CFG, steps=4, eval_every=100, trajectory=False)  # evaluations at 0 and 3, lr ÷10 at 2
    runs = [replace(RUN, lr=0.01, last_layer_lr_mult=10.0), replace(RUN, lr=0.005, weight_decay=0.0,
                                                                    last_layer_lr_mult=10.0)]
    logs = []
    for run in runs:
        lrs, batches = [], []
        sgd_step, draw = torch.optim.SGD.step, finetune_model.step_batch

        def logged_step(self, *a, **k):
            lrs.append([(g["lr"], [tuple(p.shape) for p in g["params"]]) for g in self.param_groups])
            return sgd_step(self, *a, **k)

        def logged_batch(*a, **k):
            batches.append(draw(*a, **k))
            return batches[-1]

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.optim.SGD, "step", logged_step)
            mp.setattr(finetune_model, "step_batch", logged_batch)
            result, observer = train(ds, out, pretrained, run=run, config=config)
        assert observer.steps == list(range(config.steps))
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
    main_records = [r for r in records if r["run_id"] == result.run_id]
    assert [r["step"] for r in main_records] == EVALS
    assert [r["final"] for r in main_records] == [False, False, True]
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
    assert main_records[0]["method"] == "finetune" and main_records[0]["label"] == "full FT, dropout 0.5"
    assert all(np.isfinite(r["loss"]) for r in main_records)
    assert len(records) == len({(r["run_id"], r["step"]) for r in records})
    assert RunFolder(result.run_dir).final_status() == "ok"
    paths = write_report([result.run_dir], tmp_path / "report")
    assert paths["table"].is_file()
    assert "full FT, dropout 0.5, trajectory ensemble" in paths["table"].read_text()


def test_same_seed_same_records(reference, ds, pretrained, tmp_path):
    result, records, states = reference
    again, observer = train(ds, tmp_path, pretrained)
    assert again.run_id == result.run_id and again.run_dir != result.run_dir
    assert records_of(again.run_dir) == records
    assert observer.states.keys() == states.keys()
    for step in states:  # the same code path run twice: bit for bit
        assert_states_equal(observer.states[step], states[step])


def test_diverged_run_is_recorded_and_left_out_of_tables(ds, pretrained, tmp_path):
    run = FineTuneRun("photo", seed=0, lr=1e12, weight_decay=0.0)
    result, _ = train(ds, tmp_path, pretrained, run=run)
    assert result.status == "diverged"
    records = records_of(result.run_dir)
    assert records[-1]["status"] == "diverged" and records[-1]["final"] and records[-1]["step"] in EVALS
    folder = RunFolder(result.run_dir)
    assert folder.is_done() and folder.final_status() == "diverged" and not folder.checkpoint.exists()
    results = run_results(records)
    assert len(results) == 3 and {r.status for r in results} == {"diverged"}  # the run and its trajectory
    assert domainbed_table(results) == {}  # never averaged in
    files = files_of(result.run_dir)
    again, observer = train(ds, tmp_path, pretrained, run=run)
    assert again.status == "diverged" and again.steps_trained == 0 and observer.steps == []
    assert files_of(result.run_dir) == files  # kept as it was, nothing written


def test_selected_model_is_the_best_iid_step(reference):
    result, records, states = reference
    main_records = [r for r in records if r["run_id"] == result.run_id]
    best = select_by_iid(main_records)["step"]
    state, meta = load_selected(result.run_dir)
    raw = torch.load(result.run_dir / "selected.pt", map_location="cpu", weights_only=True)
    assert meta == raw["metadata"] and meta["step"] == best and meta["run_id"] == result.run_id
    assert meta["class_names"] == list(CLASSES) and meta["num_classes"] == 2
    assert_states_equal(state, states[best])
    # done: the final record is on disk, the checkpoint is gone, and there is no marker file
    assert sorted(p.name for p in result.run_dir.iterdir()) == ["records.jsonl", "run.json", "selected.pt"]


def test_trajectory_ensemble_and_average(reference, ds):
    result, records, states = reference
    by = {}
    for r in records:
        by.setdefault(r["method"], []).append(r)
    assert set(by) == {"finetune", "finetune-trajectory-ensemble", "finetune-trajectory-average"}
    assert [r["step"] for r in by["finetune"]] == EVALS
    for method in ("finetune-trajectory-ensemble", "finetune-trajectory-average"):  # the step-0 model is left out
        assert [r["step"] for r in by[method]] == EVALS[1:] and [r["final"] for r in by[method]] == [False, True]
    assert by["finetune-trajectory-ensemble"][0]["label"] == "full FT, dropout 0.5, trajectory ensemble"
    images = EvalImages(ds, 32, 64, 0)
    split_rows = domain_split_rows(ds.domain_ids, 3, RUN.seed)

    def evaluate(state):
        """Logits of a fresh network holding ``state``: what the run does to evaluate its trajectory average."""
        net = build_classifier(demo_resnet(2), 2, 0.5)
        net.load_state_dict(state, strict=True)
        return predict_logits(net, images, torch.device("cpu"), channels_last=True)

    # an ensemble (or average) of one model is that model. The run's own record comes from the training network
    # (channels_last weights), the ensemble's from a softmax of its logits and the average's from a fresh network
    # (contiguous weights): other code paths, so they agree up to the near ties
    logits_4 = evaluate(states[4])
    ties = near_ties(logits_4, split_rows, ds.domains)
    assert by["finetune-trajectory-average"][0]["splits"] == \
        split_counts(logits_4.argmax(1), ds.labels, split_rows, ds.domains)  # the same code path as the library
    assert_counts_agree(by["finetune-trajectory-ensemble"][0]["splits"], by["finetune"][1]["splits"], ties)
    assert_counts_agree(by["finetune-trajectory-average"][0]["splits"], by["finetune"][1]["splits"], ties)
    # the last average is the average of the models at every evaluation after step 0, on every split. The run's
    # RunningAverage and average_state_dicts both sum the two state_dicts in float64 and divide by 2 (bit-equal
    # weights), evaluated by the same network and predict_logits: the same code path, so the counts are equal
    logits_avg = evaluate(average_state_dicts([states[s] for s in EVALS[1:]]))
    assert split_counts(logits_avg.argmax(1), ds.labels, split_rows, ds.domains) == \
        by["finetune-trajectory-average"][-1]["splits"]


# --------------------------------------------------------------------------- resuming


def assert_same_as_reference(result, observer: Observer, reference):
    """A resumed run ended exactly as the uninterrupted reference run (the same code path: bit for bit)."""
    ref_result, ref_records, ref_states = reference
    assert result.status == "resumed" and result.run_id == ref_result.run_id
    assert result.steps_trained == len(observer.steps)
    records = records_of(result.run_dir)
    assert records == ref_records  # no duplicated or missing steps, same numbers
    assert len(records) == len({(r["run_id"], r["step"]) for r in records})
    for step, state in observer.states.items():  # the models of the evaluations it redid, the last one included
        assert_states_equal(state, ref_states[step])
    assert LAST in observer.states
    assert_states_equal(load_selected(result.run_dir)[0], load_selected(ref_result.run_dir)[0])
    assert load_selected(result.run_dir)[1] == load_selected(ref_result.run_dir)[1]  # same step, iid, run id
    folder = RunFolder(result.run_dir)
    assert folder.final_status() == "ok" and not folder.checkpoint.exists()


@pytest.mark.parametrize("what", ["checkpoint", "record"])
def test_interrupted_run_resumes_exactly(reference, ds, pretrained, tmp_path, what):
    """Stopped right after the checkpoint of step 4 is on disk ("checkpoint"), or right after the run's record of
    step 4 is written and before its checkpoint ("record"): 4 is an evaluation step after 0 and before the last
    one (CFG), so both cases happen by construction."""
    ref_result, ref_records, ref_states = reference
    folder = RunFolder(tmp_path / ref_result.run_id)
    stopped = Observer(stop_at=("checkpoint" if what == "checkpoint" else "eval", 4))
    with pytest.raises(KeyboardInterrupt):
        train(ds, tmp_path, pretrained, observer=stopped)
    assert stopped.steps == list(range(5)) and sorted(stopped.states) == [0, 4]
    for step, state in stopped.states.items():
        assert_states_equal(state, ref_states[step])
    on_disk = [(r["run_id"], r["step"]) for r in records_of(folder.root)]
    assert (folder.run_id, 4) in on_disk and len(on_disk) == len(set(on_disk))  # step 4's record is written
    assert not folder.is_done()
    checkpoint = torch.load(folder.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["step"] == (4 if what == "checkpoint" else 0)  # "record": stopped before step 4's checkpoint

    result, observer = train(ds, tmp_path, pretrained)
    # no step before the checkpoint's is trained again; "record" redoes step 4 without writing its records twice
    first = 5 if what == "checkpoint" else 1
    assert observer.steps == list(range(first, CFG.steps))
    assert sorted(observer.states) == ([LAST] if what == "checkpoint" else [4, LAST])
    assert_same_as_reference(result, observer, reference)
    # a finished run is skipped and nothing is written
    files = files_of(result.run_dir)
    again, idle = train(ds, tmp_path, pretrained)
    assert again.status == "done" and again.steps_trained == 0 and idle.steps == [] and idle.states == {}
    assert files_of(result.run_dir) == files


def test_run_folder_of_the_previous_release_is_done(reference, ds, pretrained, tmp_path):
    """The previous release wrote a "done" marker after the run's final record; such a folder is done (because of
    its final record) and is left exactly as it is."""
    ref_result = reference[0]
    legacy = RunFolder(tmp_path / ref_result.run_id)
    legacy.root.mkdir()
    for name in ("run.json", "records.jsonl", "selected.pt"):
        shutil.copy2(ref_result.run_dir / name, legacy.root / name)
    (legacy.root / "done").write_text("ok\n")
    assert legacy.is_done() and legacy.final_status() == "ok"
    files = files_of(legacy.root)
    again, observer = train(ds, tmp_path, pretrained)
    assert again.status == "done" and again.run_dir == legacy.root and again.steps_trained == 0
    assert observer.steps == [] and observer.states == {}
    assert files_of(legacy.root) == files
    # the marker alone does not make a run done: without its final record it is not
    lines = legacy.records.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not (json.loads(line)["run_id"] == legacy.run_id and json.loads(line)["final"])]
    assert len(kept) == len(lines) - 1
    legacy.records.write_text("".join(kept))
    assert not legacy.is_done() and legacy.final_status() is None


def test_resume_with_ensembles_needs_a_checkpoint_that_has_them(ds, pretrained, tmp_path):
    without = replace(CFG, trajectory=False)  # same run id: ensembles are not part of what a run is
    with pytest.raises(KeyboardInterrupt):
        train(ds, tmp_path, pretrained, config=without, observer=Observer(stop_at=("checkpoint", 0)))
    with refused("ensembles"):
        train(ds, tmp_path, pretrained)
    result, observer = train(ds, tmp_path, pretrained, config=without)
    assert result.status == "resumed" and observer.steps == list(range(1, CFG.steps))


KILLED_RUN = """
import json, sys, time, torch
torch.set_num_threads(1)
from linft.data.folders import load_image_folder
from linft.train.finetune.run import train_run
from linft.train.finetune.hooks import RunHooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun
root, out, weights, run, config = sys.argv[1:]
config = json.loads(config)
config["lr_milestones"] = tuple(config["lr_milestones"])
# slow steps 1 and 2, then step 3 waits for the kill: it lands after the step-0 checkpoint and before step 4
hooks = RunHooks(on_step=lambda step: time.sleep(0.4 if step < 3 else 3600))
train_run(load_image_folder(root), out, FineTuneRun(**json.loads(run)), backbone="demo-resnet", weights=weights,
          config=FineTuneConfig(**config), device="cpu", progress=False, hooks=hooks)
"""


def test_sigkilled_run_resumes_exactly(reference, ds, data_root, pretrained, tmp_path):
    folder = RunFolder(tmp_path / reference[0].run_id)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(data_root), str(tmp_path), str(pretrained),
                             json.dumps(asdict(RUN)), json.dumps(asdict(CFG))], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not folder.checkpoint.exists():
            time.sleep(0.05)  # the checkpoint is written atomically, after the step-0 records
        assert proc.poll() is None, "the run ended before it could be killed"
        assert folder.checkpoint.exists(), "no checkpoint of step 0 in time"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not folder.is_done() and [r["step"] for r in records_of(folder.root)] == [0]
    result, observer = train(ds, tmp_path, pretrained)
    assert observer.steps == list(range(1, CFG.steps))  # from the step-0 checkpoint
    assert_same_as_reference(result, observer, reference)


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
    assert RunFolder(out / records[0]["run_id"]).final_status() == "ok"
    again = CliRunner().invoke(main, tiny_args(data_root, out))
    assert again.exit_code == 0 and "0 runs trained, 1 already done" in again.output
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
    run = sweep_runs(ds.domains, test_domains=["photo"], lrs=[1e-3], weight_decays=[0.0], seeds=1)[0]
    sha = load_backbone("demo-resnet", "none").weights_sha256
    folder = RunFolder.of(out, run_identity(run, "demo-resnet", sha, ds.file_list_sha256, config))
    folder.root.mkdir(parents=True)
    if content == "garbage":
        folder.checkpoint.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "other run":
        torch.save({"run_id": "0123456789abcdef", "step": 0, "model": {}, "optimizer": {}}, folder.checkpoint)
    else:
        torch.save(torch.zeros(3), folder.checkpoint)
    record = {"run_id": folder.run_id, "label": "x", "test_domain": "photo", "train_domains": ["cartoon", "sketch"],
              "seed": 0, "step": 0, "splits": {f"{d}_{part}": [1, 2] for d in ds.domains for part in ("in", "out")}}
    folder.records.write_text(json.dumps(record) + "\n")
    before = {p.name: p.read_bytes() for p in folder.root.iterdir()}
    result = CliRunner().invoke(main, tiny_args(data_root, out))
    assert_one_line_error(result, fragment, "checkpoint.pt")
    after = {p.name: p.read_bytes() for p in folder.root.iterdir()}
    assert after.pop("run.json") and after == before  # nothing damaged
    assert not folder.is_done()  # nothing marked done


def test_a_run_another_process_trains_is_refused_and_a_dead_ones_is_taken_over(reference, ds, pretrained, tmp_path):
    """Two launches of one run (a second command, a Slurm job submitted twice) never train it together."""
    ref_result = reference[0]
    folder = RunFolder(tmp_path / ref_result.run_id)
    folder.root.mkdir()
    lock = folder.root / ".linft.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "node-17", "started": "then", "command": "linft finetune"}))
    with pytest.raises(LinftError, match=r"being written by another linft process \(pid 1 on node-17"):
        train(ds, tmp_path, pretrained)
    assert not folder.records.exists() and lock.exists()
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": __import__("socket").gethostname(), "started": "then",
                                "command": "killed"}))
    result, _ = train(ds, tmp_path, pretrained)
    assert result.status == "trained" and not lock.exists()
    assert records_of(result.run_dir) == reference[1]


def test_split_seed_enters_the_run_identity_only_when_set():
    from linft.data.splits import split_seed
    assert "split_seed" not in FineTuneConfig().protocol()  # earlier run ids are kept
    assert FineTuneConfig(split_seed=0).protocol()["split_seed"] == 0
    assert (split_seed(2, FineTuneConfig(split_seed=0).protocol()) == 0
            and split_seed(2, FineTuneConfig().protocol()) == 2)
    with refused("split_seed"):
        FineTuneConfig(split_seed=-1).check()


def test_a_checkpoint_left_beside_a_final_record_is_removed(reference, ds, pretrained, tmp_path):
    """Killed after the final record and before the checkpoint's removal: the next launch sees the run done and
    removes the stale checkpoint (it would otherwise stay forever)."""
    ref_result = reference[0]
    folder = RunFolder(tmp_path / ref_result.run_id)
    shutil.copytree(ref_result.run_dir, folder.root)
    torch.save({"run_id": ref_result.run_id, "step": 4}, folder.checkpoint)
    again, idle = train(ds, tmp_path, pretrained)
    assert again.status == "done" and idle.steps == [] and not folder.checkpoint.exists()


def test_nan_logits_with_a_finite_loss_mark_the_run_diverged(ds, pretrained, tmp_path, monkeypatch):
    """Logits with a NaN at an evaluation (the loss finite) are not scored: the run and its trajectory are diverged
    at that step, as for a non-finite loss, and no model is selected."""
    real, calls = finetune_run.predict_logits, []

    def nan_from_step_4(net, *args, **kw):
        logits = real(net, *args, **kw)
        calls.append(1)
        if len(calls) > 1:  # step 0 is clean; from step 4 on, one image's logit is NaN
            logits[3, 0] = float("nan")
        return logits

    monkeypatch.setattr(finetune_run, "predict_logits", nan_from_step_4)
    result, observer = train(ds, tmp_path, pretrained)
    assert result.status == "diverged"
    records = records_of(result.run_dir)
    last = {r["run_id"]: r for r in records}
    assert len(last) == 3 and all((r["status"], r["splits"], r["final"], r["step"]) == ("diverged", {}, True, 4)
                                  for r in last.values())
    assert [r["step"] for r in records if r["run_id"] == result.run_id] == [0, 4]
    assert RunFolder(result.run_dir).final_status() == "diverged" and sorted(observer.states) == [0]
    assert load_selected(result.run_dir)[1]["step"] == 0  # the last model with an accuracy

"""linft.interpolation.run and `linft interpolate`: exact endpoints, the appendix formula, records, errors.

Bit-for-bit equality only where the same code path runs twice (the weight path at α = 0 and 1 loads the end
state_dicts themselves and runs the same forward pass as the endpoint model); two different code paths (the
representation formula or the jvp's primal against a forward pass) agree to a stated tolerance, and split counts of
two code paths agree up to the images whose top-2 logit margin is a near tie.
"""

from __future__ import annotations

import json
from dataclasses import replace as dc_replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import linft.models.registry as registry
from linft.interpolation.endpoints import load_endpoints
from linft.interpolation.run import InterpolateConfig, interpolate, point_header, prepare_interpolation
from linft.interpolation.paths import (first_order_outputs, iter_weight_path, parse_alphas,
                                                pooled_features_and_logits, representation_logits)
from linft.analysis.report import write_report
from linft.cli.main import main
from linft.data.folders import load_image_folder
from linft.data.images import EvalImages
from linft.data.shapes import write_shapes_dataset
from linft.data.splits import domain_split_rows
from linft.errors import LinftError
from linft.models.averaging import interpolate_state_dicts
from linft.models.heads import LinearHead, build_classifier, classifier_head, fit_probe_head, with_head
from linft.models.registry import load_backbone
from linft.protocol.records import read_records
from linft.protocol.selection import split_counts
from linft.train.finetune.run import train_run
from linft.train.finetune.model import FineTuneConfig, FineTuneRun, predict_logits

from conftest import assert_one_line_error
from helpers import refused, assert_counts_agree, near_ties

pytestmark = pytest.mark.filterwarnings("ignore:the run started from random weights")

STYLES = ("photo", "sketch", "cartoon")
CPU = torch.device("cpu")

# Tolerances between two code paths, on logits of magnitude <= ~10:
# - the representation formula against the network's own head: the same pooled features and head weights in a matrix
#   product of another shape (every image at once vs batches of 16), so float32 sums of 512 products in another
#   order: ~1e-6 in practice, bounded by about 512 * eps * sum|w * phi| ~ 1e-4;
# - the jvp's primal against a forward pass: the whole network again, through torch.func's forward-mode rules
#   (another kernel or decomposition may run per layer), float32 rounding compounded over ~50 layers.
REPRESENTATION_TOL = dict(rtol=1e-4, atol=1e-3)
PRIMAL_TOL = dict(rtol=1e-3, atol=1e-3)
# Those paths move logits by far less than helpers.NEAR_TIE (1e-3): only an image whose top-2 margin is below it may
# change its predicted class between two code paths (helpers.near_ties, helpers.assert_counts_agree).


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def shapes(shapes_root):
    return load_image_folder(shapes_root)


def _fresh_net(num_classes=2):
    return build_classifier(load_backbone("demo-resnet", "none").model, num_classes, 0.0).eval()


@pytest.fixture(scope="module")
def perturbed_run(shapes, tmp_path_factory):
    """A selected.pt far from the pretrained weights (every float entry perturbed), in a run folder."""
    state = _fresh_net().state_dict()
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * v.abs().mean() * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
             for k, v in state.items()}
    meta = {"backbone": "demo-resnet", "weights": "none", "num_classes": 2, "class_names": list(shapes.classes),
            "domain_names": list(shapes.domains), "image_size": 32, "test_domain": "sketch",
            "train_domains": ["cartoon", "photo"], "seed": 0, "label": "perturbed", "method": "finetune",
            "dataset": "shapes", "source": f"{shapes.file_list_sha256[:16]}:x", "run_id": "perturbed0000001",
            "step": 0, "iid": 0.5, "linearized": False, "hparams": {"dropout": 0.0}}
    run_dir = tmp_path_factory.mktemp("runs") / "perturbed"
    run_dir.mkdir()
    torch.save({"state_dict": state, "metadata": meta}, run_dir / "selected.pt")
    return run_dir


@pytest.fixture(scope="module")
def trained_run(shapes, tmp_path_factory):
    """A real (3-step) run of linft.train.finetune.run.train_run."""
    config = FineTuneConfig(steps=3, eval_every=2, image_size=32, batch_size=2, workers=0, precision="float32",
                            channels_last=False)
    result = train_run(shapes, tmp_path_factory.mktemp("ft"), FineTuneRun("photo", 0, 1e-2, 0.0, dropout=0.5),
                       backbone="demo-resnet", weights="none", config=config, device="cpu", progress=False)
    return result.run_dir


@pytest.fixture(scope="module")
def sweep(shapes, perturbed_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("interp")
    result = interpolate(shapes, perturbed_run, alphas="0:1:3", linearity=True, out_dir=out, device="cpu",
                         batch_size=16, workers=0, progress=False)
    return result, out


@pytest.fixture(scope="module")
def endpoint_logits(shapes, perturbed_run):
    """The two endpoint models of ``interpolate`` on ``perturbed_run``, computed here by plain forward passes.

    θ_p carries the probe head fitted on the pooled features of the training domains' "in" splits (the run's seed
    and held-out domain); θ_f is the run's selected model. Returns their logits on every image, the split rows,
    and the near ties of each end per split.
    """
    ends = load_endpoints(perturbed_run, shapes)
    images = EvalImages(shapes, 32, 16, 0)
    split_rows = domain_split_rows(shapes.domain_ids, len(shapes.domains), 0)
    held_out = shapes.domains.index("sketch")
    fit = np.sort(np.concatenate([split_rows[(d, "in")] for d in range(len(shapes.domains)) if d != held_out]))
    phi_p, _ = pooled_features_and_logits(ends.network, ends.block_names, images)
    head_p = fit_probe_head(phi_p[:, -1][fit], shapes.labels[fit], 2)
    net = _fresh_net()
    logits = {}
    for end, state in (("pretrained", with_head(ends.pretrained_state, head_p)), ("fine-tuned", ends.finetuned_state)):
        net.load_state_dict(state, strict=True)
        logits[end] = predict_logits(net, images, CPU, "float32", False)
    ties = {end: near_ties(v, split_rows, shapes.domains) for end, v in logits.items()}
    return logits, split_rows, ties


# -- α ----------------------------------------------------------------------------------------------------------------

def test_parse_alphas():
    eleven = parse_alphas("0:1:11")
    assert len(eleven) == 11 and eleven[0] == 0.0 and eleven[-1] == 1.0 and 0.3 in eleven and 0.7 in eleven
    assert parse_alphas("1, 0,0.5,0.5") == [0.0, 0.5, 1.0]
    assert parse_alphas("0.25:0.25:1") == [0.25]
    for bad in ("0:1.5:3", "-0.1,0.5", "1.01", "nan", "abc", "0:1", "0:1:0", ""):
        with pytest.raises(LinftError):
            parse_alphas(bad)


# -- the appendix formula ---------------------------------------------------------------------------------------------

def test_representation_interpolation_is_the_bilinear_formula():
    g = torch.Generator().manual_seed(0)
    phi_p, phi_f = torch.rand(9, 5, generator=g), torch.rand(9, 5, generator=g)
    hp = LinearHead(torch.randn(3, 5, generator=g), torch.randn(3, generator=g))
    hf = LinearHead(torch.randn(3, 5, generator=g), torch.randn(3, generator=g))
    for a in (0.0, 0.3, 0.5, 1.0):
        d = lambda t: t.double()  # noqa: E731
        W = (1 - a) * d(hp.weight) + a * d(hf.weight)
        phi = (1 - a) * d(phi_p) + a * d(phi_f)
        expected = phi @ W.T + (1 - a) * d(hp.bias) + a * d(hf.bias)
        got = representation_logits(a, phi_p, phi_f, hp, hf)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # bilinear in α, not an output ensemble
    mid = representation_logits(0.5, phi_p, phi_f, hp, hf)
    assert not torch.allclose(mid, 0.5 * (hp(phi_p) + hf(phi_f)), atol=1e-4)
    # at the ends the mixing multiplies by exactly 1 and 0, and the same F.linear runs on the same shapes as the
    # head itself: the same code path, bit for bit
    assert torch.equal(representation_logits(0.0, phi_p, phi_f, hp, hf), hp(phi_p))
    assert torch.equal(representation_logits(1.0, phi_p, phi_f, hp, hf), hf(phi_f))
    with pytest.raises(LinftError):
        representation_logits(1.5, phi_p, phi_f, hp, hf)


def test_probe_head_is_deterministic_and_fits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = (x[:, 0] > 0).long()
    h1, h2 = fit_probe_head(x, y, 2), fit_probe_head(x, y, 2)
    assert torch.equal(h1.weight, h2.weight) and torch.equal(h1.bias, h2.bias)
    assert (h1(x).argmax(1) == y).float().mean() >= 0.95


# -- exact endpoints on every path ------------------------------------------------------------------------------------

def test_endpoints_are_exact_on_both_paths_and_linearized(shapes, perturbed_run):
    ends = load_endpoints(perturbed_run, shapes)
    images = EvalImages(shapes, 32, 16, 0)
    net = ends.network
    phi_p, _ = pooled_features_and_logits(net, ends.block_names, images)
    head_p = fit_probe_head(phi_p[:, -1], shapes.labels, 2)
    pre = with_head(ends.pretrained_state, head_p)
    net.load_state_dict(ends.finetuned_state)
    phi_f, logits_f = pooled_features_and_logits(net, ends.block_names, images)

    # the two endpoint models, built independently
    ref = _fresh_net()
    ref.load_state_dict(pre)
    f_pre = predict_logits(ref, images, CPU, "float32", False)
    ref.load_state_dict(ends.finetuned_state)
    f_ft = predict_logits(ref, images, CPU, "float32", False)
    assert not torch.allclose(f_pre, f_ft)
    assert torch.equal(logits_f, f_ft)  # the same forward pass (the block hooks only read): bit for bit

    # the representation path: the appendix formula on pooled features against the network's own head (another
    # code path, see REPRESENTATION_TOL)
    head_f = classifier_head(net)
    torch.testing.assert_close(representation_logits(0.0, phi_p[:, -1], phi_f[:, -1], head_p, head_f), f_pre,
                               **REPRESENTATION_TOL)
    torch.testing.assert_close(representation_logits(1.0, phi_p[:, -1], phi_f[:, -1], head_p, head_f), f_ft,
                               **REPRESENTATION_TOL)
    # the weight path at α = 0 and 1 loads the end state_dicts themselves and runs the endpoint's forward pass:
    # the same code path, bit for bit
    for alpha, state in ((0.0, pre), (1.0, ends.finetuned_state)):
        mixed = interpolate_state_dicts(pre, ends.finetuned_state, alpha)
        assert mixed.keys() == state.keys() and all(torch.equal(mixed[k], state[k]) for k in state)
    weights = dict(iter_weight_path(net, pre, ends.finetuned_state, [0.0, 0.5, 1.0], images))
    assert torch.equal(weights[0.0], f_pre) and torch.equal(weights[1.0], f_ft)
    assert not torch.allclose(weights[0.5], f_pre) and not torch.allclose(weights[0.5], f_ft)

    # the linearized path: its primal f(θ0) is the pretrained end through the jvp (another code path, PRIMAL_TOL),
    # and at α = 0 the path is that primal exactly (f0 + 0·J(θf − θ0), with a finite jvp)
    f0, jv = first_order_outputs(net, pre, ends.finetuned_state, images)
    torch.testing.assert_close(f0, f_pre, **PRIMAL_TOL)
    assert torch.isfinite(jv).all() and not torch.equal(jv, torch.zeros_like(jv))
    assert torch.equal(f0 + 0.0 * jv, f0)


# -- the whole sweep, its records and its plot ------------------------------------------------------------------------

def test_sweep_records_once_per_alpha_and_path(sweep, shapes, endpoint_logits):
    result, out = sweep
    logits, split_rows, ties = endpoint_logits
    paths = {"weights", "representation", "linearized", "block:layer4.0", "block:layer4.1", "block:layer4.2"}
    assert set(result.curves) == paths and result.alphas == [0.0, 0.5, 1.0]
    assert result.passes == {"forward": 2 + 3, "jvp": 1}
    records = read_records([out / "records.jsonl"])
    assert len(records) == result.records_written == 3 * len(paths)
    assert len({r["run_id"] for r in records}) == len(records)
    for r in records:
        assert r["step"] == 0 and r["final"] and r["status"] == "ok" and r["seed"] == 0
        assert r["test_domain"] == "sketch" and r["train_domains"] == ["cartoon", "photo"]
        assert r["grid"] == {"alpha": r["hparams"]["alpha"]} and r["method"].startswith("interpolation-")
        assert sum(t for _, t in r["splits"].values()) == len(shapes)
    curves, lin = result.curves, result.linearity
    # the weight path's ends are the endpoint models: the same forward pass of the same state_dicts
    for i, end in ((0, "pretrained"), (2, "fine-tuned")):
        counts = split_counts(logits[end].argmax(1), shapes.labels, split_rows, shapes.domains)
        assert curves["weights"][i]["splits"] == counts
    # the representation path at both ends, and the jvp's primal f(θ0) (the linearized path at α = 0): other code
    # paths, equal up to the near ties of the end
    for i, end in ((0, "pretrained"), (2, "fine-tuned")):
        assert_counts_agree(curves["representation"][i]["splits"], curves["weights"][i]["splits"], ties[end])
    assert_counts_agree(curves["linearized"][0]["splits"], curves["weights"][0]["splits"], ties["pretrained"])
    assert_counts_agree(lin["f(θ0)"]["splits"], curves["weights"][0]["splits"], ties["pretrained"])
    # f(θf) is the fine-tuned forward pass of the representation path, the same code path as the weight path at
    # α = 1; f_lin(θf) is the tensor f0 + 1·jv of the linearized path at α = 1
    assert lin["f(θf)"]["splits"] == curves["weights"][2]["splits"]
    assert lin["f_lin(θf)"]["splits"] == curves["linearized"][2]["splits"]
    assert 0 < lin["gap"] < float("inf")
    assert result.plot.is_file() and result.plot.stat().st_size > 0
    assert json.loads(result.summary.read_text())["alphas"] == [0.0, 0.5, 1.0]


def test_rerun_with_the_same_arguments_computes_nothing(shapes, perturbed_run, tmp_path):
    kw = dict(alphas="0:1:3", linearity=True, out_dir=tmp_path, device="cpu", batch_size=16, workers=0,
              progress=False)
    forwards, lines = [], []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, i: forwards.append(type(m)))
    try:
        first = interpolate(shapes, perturbed_run, **kw)
        assert forwards  # the hook sees the forward passes of a call that computes (control)
        forwards.clear()
        assert first.records_written == 3 * 6 and first.passes == {"forward": 2 + 3, "jvp": 1}
        files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()}
        assert {p.name for p in files} >= {"records.jsonl", first.summary.name, first.plot.name}
        again = interpolate(shapes, perturbed_run, say=lines.append, **kw)
    finally:
        handle.remove()
    assert forwards == []  # no forward pass and no jvp: nothing is computed
    assert again.records_written == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()} == files
    assert any("nothing to compute" in line for line in lines)
    assert again.alphas == first.alphas and again.curves == first.curves and again.linearity == first.linearity
    assert again.labels == first.labels and again.records == first.records and again.summary == first.summary


def test_a_rerun_after_other_arguments_returns_its_own_curves(shapes, perturbed_run, tmp_path):
    """Another call in between rewrites the summary file: a skipped re-run must still return its own α and paths."""
    kw = dict(out_dir=tmp_path, device="cpu", batch_size=16, workers=0, progress=False)
    first = interpolate(shapes, perturbed_run, alphas="0,0.5,1", blocks=False, **kw)
    other = interpolate(shapes, perturbed_run, alphas="0,0.25", **kw)  # other α, and the block paths
    assert set(other.curves) > set(first.curves)
    again = interpolate(shapes, perturbed_run, alphas="0,0.5,1", blocks=False, **kw)
    assert again.alphas == [0.0, 0.5, 1.0] and set(again.curves) == set(first.curves)
    assert again.curves == first.curves  # the same records, read back
    assert again.records_written == 0


def test_rerun_is_idempotent_and_adds_only_new_alphas(sweep, shapes, perturbed_run):
    result, out = sweep
    path = out / "records.jsonl"
    before = path.read_text()
    again = interpolate(shapes, perturbed_run, alphas="0,0.5,1", out_dir=out, device="cpu", batch_size=16,
                        workers=0, progress=False, blocks=False)
    assert again.records_written == 0 and path.read_text() == before
    assert again.curves["weights"] == result.curves["weights"]
    more = interpolate(shapes, perturbed_run, alphas="0,0.25", out_dir=out, device="cpu", batch_size=16,
                       workers=0, progress=False, blocks=False, plot=False)
    assert more.records_written == 2  # α = 0.25 on the weight and representation paths
    assert len(read_records([path])) == len(read_records([out])) == 18 + 2


def test_real_finetuning_run_and_report(shapes, trained_run, tmp_path):
    result = interpolate(shapes, trained_run, alphas="0,1", out_dir=tmp_path / "i", device="cpu", batch_size=16,
                         workers=0, progress=False, blocks=False)
    meta = torch.load(trained_run / "selected.pt", weights_only=True)["metadata"]
    assert result.test_domain == "photo" and result.finetuned_id == meta["run_id"]
    records = read_records([tmp_path / "i"])
    assert {r["label"] for r in records} == {f"weight interpolation [{meta['label']}]",
                                             f"representation interpolation [{meta['label']}]"}
    assert all(r["source"] == meta["source"] and r["dataset"] == meta["dataset"] for r in records)
    paths = write_report([tmp_path / "i"], tmp_path / "report")
    assert paths["interpolation_png"].is_file()


# -- bad input: one line, exit 2, no traceback ------------------------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(main, ["interpolate", *map(str, args)])


def test_alpha_outside_unit_interval(shapes, perturbed_run, tmp_path):
    with refused("alphas"):
        interpolate(shapes, perturbed_run, alphas="0,1.5", out_dir=tmp_path, device="cpu", progress=False)
    assert_one_line_error(_cli(shapes.root, "--finetuned", perturbed_run, "--alphas", "-0.5,1", "--out", tmp_path,
                                "--quiet"), "outside [0, 1]")
    assert not (tmp_path / "records.jsonl").exists()


def test_mismatched_class_set(perturbed_run, tmp_path):
    other = tmp_path / "other"
    write_shapes_dataset(other, classes=("circle", "triangle"), styles=STYLES, per_class=2, size=32, seed=0,
                         workers=1)
    with pytest.raises(LinftError, match="classes"):
        load_endpoints(perturbed_run, load_image_folder(other))
    assert_one_line_error(_cli(other, "--finetuned", perturbed_run, "--out", tmp_path / "o", "--quiet",
                                "--device", "cpu"), "classes", "triangle")


def test_mismatched_architecture(shapes, perturbed_run, tmp_path):
    obj = torch.load(perturbed_run / "selected.pt", weights_only=True)
    state = {k: v for k, v in obj["state_dict"].items() if not k.startswith("layer4.2.")}
    torch.save({"state_dict": state, "metadata": obj["metadata"]}, tmp_path / "cut.pt")
    assert_one_line_error(_cli(shapes.root, "--finetuned", tmp_path / "cut.pt", "--out", tmp_path / "o", "--quiet",
                                "--device", "cpu"), "same architecture")
    # pretrained weights of another architecture
    torch.save(load_backbone("resnet18", "none").model.state_dict(), tmp_path / "r18.pt")
    assert_one_line_error(_cli(shapes.root, "--finetuned", perturbed_run, "--pretrained", tmp_path / "r18.pt",
                                "--out", tmp_path / "o", "--quiet", "--device", "cpu"),
                          "r18.pt", "does not fit a demo-resnet", "pass weights saved from a demo-resnet")


def test_pretrained_model_without_phi_blocks(shapes, perturbed_run, monkeypatch, tmp_path):
    from torch import nn

    class Flat(nn.Module):  # a classifier without residual blocks
        def __init__(self, num_classes=1000):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(self.body(x))

    monkeypatch.setitem(registry._EXTRA_BACKBONES, "flat-net", (Flat, "none"))  # registered for this test only
    assert_one_line_error(_cli(shapes.root, "--finetuned", perturbed_run, "--backbone", "flat-net",
                                "--out", tmp_path, "--quiet", "--device", "cpu"), "residual blocks")


def test_cli_table_json_and_help(shapes, perturbed_run, endpoint_logits, tmp_path):
    result = _cli(shapes.root, "--finetuned", perturbed_run / "selected.pt", "--alphas", "0,1", "--no-blocks",
                  "--out", tmp_path, "--quiet", "--device", "cpu", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "| α |" in result.output and "weights iid" in result.output and "records:" in result.output
    as_json = _cli(shapes.root, "--finetuned", perturbed_run, "--alphas", "0,1", "--no-blocks", "--out", tmp_path,
                   "--quiet", "--device", "cpu", "--workers", "0", "--json")
    data = json.loads(as_json.output)
    assert data["records_written"] == 0 and set(data["curves"]) == {"weights", "representation"}
    help_text = _cli("--help").output
    assert "Example" in help_text and "--finetuned" in help_text and "share of the fine-tuned" in help_text
    # the weight and representation paths at α = 0: two code paths, equal up to the pretrained end's near ties
    assert_counts_agree(data["curves"]["weights"][0]["splits"], data["curves"]["representation"][0]["splits"],
                        endpoint_logits[2]["pretrained"])


def test_a_reduced_precision_is_part_of_the_record_ids(shapes, perturbed_run):
    """Records computed in bfloat16 on CUDA are other records than float32 ones (a float32 re-run must not be
    skipped as done), while float32 keeps the ids of earlier releases (no precision in them)."""
    config = InterpolateConfig(alphas="0,1", precision="bfloat16")
    setup = prepare_interpolation(shapes, perturbed_run, config, None, False)
    on_cpu = point_header(setup, "weights", 1.0, "w")  # the CPU computes in float32 whatever the setting
    on_cuda = point_header(dc_replace(setup, dev=torch.device("cuda")), "weights", 1.0, "w")  # only its type is read
    fp32 = point_header(dc_replace(setup, dev=torch.device("cuda"), config=InterpolateConfig(alphas="0,1",
                                                                                        precision="float32")),
                   "weights", 1.0, "w")
    assert on_cpu.hparams["precision"] == fp32.hparams["precision"] == "float32"
    assert on_cuda.hparams["precision"] == "bfloat16"
    assert on_cpu.run_id == fp32.run_id != on_cuda.run_id


def test_nan_logits_give_points_without_accuracy(shapes, perturbed_run, tmp_path):
    """A fine-tuned head with a NaN bias: every point whose logits are not finite has no accuracy (None in the
    curves and the summary, a diverged record without splits), never a number; the others are scored as usual, the
    files stay valid JSON, a rerun reads the same curves back, and the report draws only the scored points."""
    state, meta = torch.load(perturbed_run / "selected.pt", weights_only=True).values()
    state = {**state, "fc.1.bias": torch.tensor([0.0, float("nan")])}
    (tmp_path / "run").mkdir()
    torch.save({"state_dict": state, "metadata": meta}, tmp_path / "run" / "selected.pt")
    kw = dict(alphas="0,0.5,1", linearity=True, out_dir=tmp_path / "i", device="cpu", batch_size=16, workers=0,
              progress=False)
    result = interpolate(shapes, tmp_path / "run", **kw)
    strict = {"parse_constant": lambda c: pytest.fail(f"{c} written as a number")}
    records = [json.loads(line, **strict) for line in (tmp_path / "i" / "records.jsonl").read_text().splitlines()]
    assert records == read_records([tmp_path / "i"])
    by_id = {r["run_id"]: r for r in records}
    for key in ("weights", "representation", "linearized"):
        assert [p["iid"] for p in result.curves[key]][-1] is None  # α = 1: the NaN head
    missing = 0
    for key, points in result.curves.items():
        for point in points:
            if point["iid"] is None:
                assert point["ood"] is None and point["splits"] is None
                missing += 1
            else:
                assert 0 <= point["iid"] <= 1 and 0 <= point["ood"] <= 1
    assert missing == sum(r["status"] == "diverged" and r["splits"] == {} for r in by_id.values()) >= 3
    assert any(p["iid"] is not None for points in result.curves.values() for p in points)  # the φ-block probes
    assert json.loads(result.summary.read_text(), **strict)["curves"] == result.curves
    again = interpolate(shapes, tmp_path / "run", **kw)
    assert again.records_written == 0 and again.curves == result.curves
    assert write_report([tmp_path / "i"], tmp_path / "report")["interpolation_png"].is_file()

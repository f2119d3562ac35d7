"""Figure 1 mode of interpolation (linft.interpolation.checkpoints, `linft interpolate --iid`): two
checkpoints of a tiny CLIP (open_clip's real code paths) — an open_clip state_dict and a model-soups checkpoint —
a zero-shot head through open_clip's tokenizer and text tower, and an o.o.d. set with a subset of the classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision import transforms
from torchvision.models.vision_transformer import VisionTransformer

from linft.interpolation import checkpoints as checkpoint_interpolation
from linft.interpolation.checkpoints import CheckpointInterpolateConfig, interpolate_checkpoints
from linft.cli.main import main
from linft.data.folders import load_class_folder
from linft.data.images import EvalImages, normalize_uint8
from linft.errors import LinftError
from linft.models.blocks import PooledBlockFeatures, phi_block_names
from linft.models.clip import zero_shot_head
from linft.models.heads import LinearHead, fit_probe_head
from linft.models.registry import load_backbone

from conftest import TINY_CLIP, TINY_VIT, assert_one_line_error
from helpers import NEAR_TIE, class_folder, refused

open_clip = pytest.importorskip("open_clip")

ARCH = TINY_CLIP + "-quickgelu"  # OpenAI's CLIP and model-soups' checkpoints use QuickGELU
CLASSES = ("goldfish", "great_white_shark", "tench")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """An i.i.d. set of 3 classes, an o.o.d. set of 2 of them; a pretrained CLIP file and a model-soups checkpoint
    (its image tower perturbed, its head the zero-shot head plus noise)."""
    tmp = tmp_path_factory.mktemp("figure1")
    iid = class_folder(tmp / "val", CLASSES, 4, 0)
    ood = class_folder(tmp / "sketch", CLASSES[1:], 3, 1)
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP[5:], force_quick_gelu=True).eval()
    pretrained = tmp / "clip.pt"
    torch.save(clip.state_dict(), pretrained)
    zs = zero_shot_head(ARCH, str(pretrained), [c.replace("_", " ") for c in CLASSES])
    g = torch.Generator().manual_seed(1)
    state = {f"model.{k}": v + 0.3 * v.abs().mean() * torch.randn(v.shape, generator=g) if k.startswith("visual.")
             else v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    state["classification_head.weight"] = zs.weight + torch.randn(zs.weight.shape, generator=g)
    state["classification_head.bias"] = torch.zeros(3)
    finetuned = tmp / "model_0.pt"
    torch.save(state, finetuned)
    return tmp, iid, ood, pretrained, finetuned, zs


def _logits(bb, folder, head=None):
    ds = load_class_folder(folder)
    transform, _, size = bb.input_transform(bb.image_size)
    x = normalize_uint8(EvalImages(ds, size, 64, 0, transform=transform).images)
    with torch.no_grad():
        if head is None:
            return bb.model(x), ds
        feats = []
        bb.model.fc.register_forward_hook(lambda m, i, o: feats.append(i[0]))
        bb.model(x)
        return head(feats[0]), ds


def _accuracy_bounds(logits, ds, columns):
    """Accuracy of logits restricted to ``columns``, and how many images are near ties there."""
    restricted = logits[:, columns]
    top2 = restricted.topk(2, dim=1).values
    ties = int(((top2[:, 0] - top2[:, 1]) < NEAR_TIE).sum())
    return float(np.mean(restricted.argmax(1).numpy() == ds.labels)), ties / len(ds)


def test_figure1_ends_subset_classes_and_zero_shot_head(setting):
    tmp, iid, ood, pretrained, finetuned, zs = setting
    config = CheckpointInterpolateConfig(backbone=ARCH, pretrained=str(pretrained), finetuned=str(finetuned),
                                         alphas="0,0.5,1", linearity=True, device="cpu", batch_size=16, workers=0)
    result = interpolate_checkpoints(iid, [ood], config, out_dir=tmp / "out", progress=False)
    assert result.iid_set == "val" and result.ood_sets == ["sketch"] and result.set_sizes == {"val": 12, "sketch": 6}
    assert set(result.curves) == {"weights", "representation", "linearized"}
    # the ends, computed here by plain forward passes: α = 1 the model-soups model, α = 0 the pretrained tower with
    # the zero-shot head; the o.o.d. set's logits restricted to its 2 classes (columns 1, 2 of the head)
    fine = load_backbone(ARCH, str(finetuned))
    pre = load_backbone(ARCH, str(pretrained))
    for folder, name, columns in ((iid, "val", [0, 1, 2]), (ood, "sketch", [1, 2])):
        for alpha_index, (bb, head) in ((-1, (fine, None)), (0, (pre, zs))):
            logits, ds = _logits(bb, folder, head)
            expected, ties = _accuracy_bounds(logits, ds, columns)
            for path in ("weights", "representation", "linearized"):
                got = result.curves[path][alpha_index]["sets"][name]
                assert abs(got - expected) <= ties + 1e-9, (path, name, alpha_index, got, expected)
    for point in result.curves["weights"]:
        assert point["iid"] == point["sets"]["val"] and point["ood"] == point["sets"]["sketch"]  # one o.o.d. set
    assert result.plot.is_file() and json.loads(result.summary.read_text())["curves"] == result.curves
    assert result.linearity_gap["val"] > 0


def test_cli_figure1_mode_and_errors(setting):
    tmp, iid, ood, pretrained, finetuned, _ = setting
    runner = CliRunner()
    base = ["interpolate", "--backbone", ARCH, "--pretrained", str(pretrained), "--finetuned", str(finetuned),
            "--iid", str(iid), "--ood", str(ood), "--alphas", "0,1", "--device", "cpu", "--workers", "0", "--quiet"]
    res = runner.invoke(main, base + ["--out", str(tmp / "cli")])
    assert res.exit_code == 0, res.output
    assert "i.i.d. = val, o.o.d. = mean of sketch" in res.output and (tmp / "cli" / "figure1.png").is_file()
    # an o.o.d. set with a class the head does not know
    class_folder(tmp / "other", ["tench", "zebra"], 1, 2)
    assert_one_line_error(runner.invoke(main, base[:-9] + ["--iid", str(iid), "--ood", str(tmp / "other"), "--quiet"]),
                          "classes the head does not know (zebra)")
    # the name without -quickgelu: both ends are built as named (the tiny model has no OpenAI weights to call for
    # QuickGELU), neither is renamed
    other = base.copy()
    other[other.index(ARCH)] = TINY_CLIP
    res = runner.invoke(main, other + ["--out", str(tmp / "gelu")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp / "gelu" / "figure1.json").read_text())["backbone"] == TINY_CLIP
    # zero-shot needs CLIP; probe needs data
    assert_one_line_error(runner.invoke(main, base + ["--pretrained-head", "probe"]), "--probe-data")
    vit = tmp / "vit.pt"
    torch.save(VisionTransformer(**TINY_VIT, num_classes=3).state_dict(), vit)
    with pytest.raises(LinftError, match="zero-shot head needs a CLIP backbone"):
        interpolate_checkpoints(iid, [], CheckpointInterpolateConfig(backbone="vit-tiny", pretrained="none",
                                                                     finetuned=str(vit), device="cpu", workers=0),
                                out_dir=tmp / "x", progress=False)


@pytest.mark.parametrize("kind", ["probe", "file"])
def test_probe_and_file_heads_of_the_pretrained_end(setting, kind, tmp_path):
    """Two Vision Transformer checkpoints (no CLIP): the pretrained end's head is a probe fitted on --probe-data or a
    file; at α = 0 every path is that head on the pretrained features (computed here independently)."""
    _, iid, ood, *_ = setting
    torch.manual_seed(3)
    vit = VisionTransformer(**TINY_VIT, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)
    finetuned = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), finetuned)
    pre = load_backbone("vit-tiny", "none")
    transform, _, size = pre.input_transform(32)
    ds = load_class_folder(iid)
    with torch.no_grad():
        phi = PooledBlockFeatures(pre.model, phi_block_names(pre.model, 1))(
            normalize_uint8(EvalImages(ds, size, 64, 0, transform=transform).images))[:, -1]
    if kind == "probe":
        head, extra = fit_probe_head(phi, ds.labels, 3), {"pretrained_head": "probe", "probe_data": str(iid)}
    else:
        head = LinearHead(torch.randn(3, 32), torch.randn(3))
        torch.save({"weight": head.weight, "bias": head.bias}, tmp_path / "head.pt")
        extra = {"pretrained_head": str(tmp_path / "head.pt")}
    config = CheckpointInterpolateConfig(backbone="vit-tiny", pretrained="none", finetuned=str(finetuned),
                                         alphas="0,1", device="cpu", workers=0, **extra)
    result = interpolate_checkpoints(iid, [ood], config, out_dir=tmp_path / "out", progress=False)
    expected, ties = _accuracy_bounds(head(phi), ds, [0, 1, 2])
    for path in ("weights", "representation"):
        assert abs(result.curves[path][0]["iid"] - expected) <= ties + 1e-9, path


def test_two_sets_of_one_name_are_refused_before_any_computation(setting, tmp_path):
    """`--iid ~/x/val --ood ~/y/val`: both sets would be named 'val' and one would overwrite the other."""
    _, iid, *_ = setting
    other = class_folder(tmp_path / "y" / "val", CLASSES, 1, 5)
    config = CheckpointInterpolateConfig(backbone=TINY_CLIP, pretrained="none", finetuned=str(tmp_path / "absent.pt"),
                                         device="cpu", workers=0)  # never read: the names are checked first
    with pytest.raises(LinftError, match=None) as info:
        interpolate_checkpoints(iid, [other], config, out_dir=tmp_path / "out", progress=False)
    text = str(info.value)
    assert f"{iid} and {other} have one name 'val'" in text and "distinct names" in text and "\n" not in text
    assert not (tmp_path / "out").exists()


def test_probe_head_is_fitted_on_the_images_as_the_fine_tuned_end_takes_them(setting, tmp_path, monkeypatch):
    """The pretrained end brings its own transform (here one that blanks every image) and the fine-tuned end,
    a file, takes DomainBed's: the probe is fitted on the images as evaluation feeds them (the fine-tuned end's),
    so at α = 0 every path is the probe fitted here on those features. A probe fitted on blank images would
    see one feature vector for all classes and could not separate them."""
    _, iid, ood, *_ = setting
    torch.manual_seed(3)
    finetuned = tmp_path / "vit.pt"
    torch.save(VisionTransformer(**TINY_VIT, num_classes=3).state_dict(), finetuned)
    blank = transforms.Compose([transforms.Resize((32, 32)), transforms.PILToTensor(),
                                transforms.Lambda(lambda t: t * 0)])

    def load(name, weights):
        bb = load_backbone(name, weights)
        if weights == "none":  # the pretrained end, with weights that declare their own transform
            bb.transform = blank
        return bb

    monkeypatch.setattr(checkpoint_interpolation, "load_backbone", load)
    pre = load_backbone("vit-tiny", "none")
    transform, _, size = load_backbone("vit-tiny", str(finetuned)).input_transform(32)  # DomainBed's at 32 px
    ds = load_class_folder(iid)
    with torch.no_grad():
        phi = PooledBlockFeatures(pre.model, phi_block_names(pre.model, 1))(
            normalize_uint8(EvalImages(ds, size, 64, 0, transform=transform).images))[:, -1]
    head = fit_probe_head(phi, ds.labels, 3)
    config = CheckpointInterpolateConfig(backbone="vit-tiny", pretrained="none", finetuned=str(finetuned),
                                         alphas="0,1", device="cpu", workers=0, pretrained_head="probe",
                                         probe_data=str(iid))
    result = interpolate_checkpoints(iid, [ood], config, out_dir=tmp_path / "out", progress=False)
    expected, ties = _accuracy_bounds(head(phi), ds, [0, 1, 2])
    assert expected - ties > 0.5  # 12 images in 32 dimensions: the probe separates its own training set
    for path in ("weights", "representation"):
        assert abs(result.curves[path][0]["iid"] - expected) <= ties + 1e-9, path


def _vit_file(path, nan_bias: bool = False):
    torch.manual_seed(3)
    vit = VisionTransformer(**TINY_VIT, num_classes=3)
    nn.init.normal_(vit.heads.head.weight)
    if nan_bias:
        with torch.no_grad():
            vit.heads.head.bias[1] = float("nan")
    torch.save(vit.state_dict(), path)
    return path


@pytest.mark.parametrize("entry, value", [("weight", float("nan")), ("bias", float("inf")), ("weight", -float("inf"))])
def test_a_head_file_with_non_finite_weights_is_refused(setting, entry, value, tmp_path):
    """Refused when loaded, in one line naming the file and the parameter, before anything is written."""
    _, iid, ood, *_ = setting
    head = {"weight": torch.randn(3, 32), "bias": torch.randn(3)}
    head[entry][1, ...] = value
    torch.save(head, tmp_path / "head.pt")
    config = CheckpointInterpolateConfig(backbone="vit-tiny", pretrained="none",
                                         finetuned=str(_vit_file(tmp_path / "vit.pt")), alphas="0,1", device="cpu",
                                         workers=0, pretrained_head=str(tmp_path / "head.pt"))
    with refused("pretrained_head") as err:
        interpolate_checkpoints(iid, [ood], config, out_dir=tmp_path / "out", progress=False)
    assert str(tmp_path / "head.pt") in str(err.value) and entry in str(err.value)
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["interpolate", "--backbone", "vit-tiny", "--pretrained", "none", "--finetuned",
                                    str(tmp_path / "vit.pt"), "--iid", str(iid), "--ood", str(ood), "--alphas", "0,1",
                                    "--device", "cpu", "--workers", "0", "--quiet", "--pretrained-head",
                                    str(tmp_path / "head.pt"), "--out", str(tmp_path / "cli")])
    assert_one_line_error(res, "--pretrained-head", str(tmp_path / "head.pt"))
    assert not (tmp_path / "cli").exists()


def test_nan_logits_give_figure1_points_without_accuracy(setting, tmp_path):
    """A fine-tuned checkpoint whose head has a NaN: a point whose logits are not finite on a set has no accuracy
    there (None, never a number), nor an o.o.d. mean; figure1.json stays valid JSON and the plot skips the point."""
    _, iid, ood, *_ = setting
    torch.save({"weight": torch.randn(3, 32), "bias": torch.randn(3)}, tmp_path / "head.pt")
    config = CheckpointInterpolateConfig(backbone="vit-tiny", pretrained="none",
                                         finetuned=str(_vit_file(tmp_path / "vit.pt", nan_bias=True)),
                                         alphas="0,0.5,1", device="cpu", workers=0, linearity=True,
                                         pretrained_head=str(tmp_path / "head.pt"))
    result = interpolate_checkpoints(iid, [ood], config, out_dir=tmp_path / "out", progress=False)
    for path, points in result.curves.items():
        assert points[-1]["iid"] is None and points[-1]["ood"] is None, path  # α = 1: the NaN head
        for p in points:
            assert p["iid"] == p["sets"]["val"] and p["ood"] == p["sets"]["sketch"]
            assert all(v is None or 0 <= v <= 1 for v in p["sets"].values())
    saved = json.loads(result.summary.read_text(), parse_constant=lambda c: pytest.fail(f"{c} written as a number"))
    assert saved["curves"] == result.curves
    assert result.plot.is_file()

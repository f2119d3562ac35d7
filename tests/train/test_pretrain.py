"""The demo backbone: the shipped checkpoint, the pretraining source, and `pretrain` end to end (tiny, CPU)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.models.resnet import Bottleneck

from linft.backbones import PooledBlockFeatures, load_backbone, phi_block_names, residual_block_names
from linft.cli.main import main
from linft.demo_data import DEMO_STYLES, write_demo_data, write_shapes_dataset
from linft.errors import LinftError
from linft.pretrain import (SHIPPED_CHECKPOINT, SOURCE_MANIFEST, SOURCE_SHAPES, SOURCE_STYLES, DemoResNet,
                            checkpoint_metadata, demo_resnet, pretrain, write_pretraining_source)

TINY = dict(epochs=1, batch_size=8, image_size=32, workers=0, device="cpu", progress=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """2 style domains x 2 shape classes x 4 images, 32 px."""
    root = tmp_path_factory.mktemp("tiny") / "shapes"
    return write_shapes_dataset(root, classes=("circle", "square"), styles=("photo", "sketch"), per_class=4,
                                size=32, seed=0, seed_tag=1, workers=1)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------- the architecture


def test_demo_resnet_has_resnet50_structure_with_three_last_stage_blocks():
    model = demo_resnet(10)
    assert isinstance(model, DemoResNet)
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        assert hasattr(model, name), name
    blocks = dict(model.named_modules())
    assert all(isinstance(blocks[n], Bottleneck) for n in residual_block_names(model))
    assert [len(getattr(model, f"layer{i}")) for i in (1, 2, 3, 4)] == [1, 1, 2, 3]
    assert phi_block_names(model) == ["layer4.0", "layer4.1", "layer4.2"]
    assert model.fc.in_features == 512 and model.fc.out_features == 10
    assert [getattr(model, f"layer{i}")[0].stride for i in (1, 2, 3, 4)] == [1, 2, 2, 2]


# --------------------------------------------------------------------------- the shipped checkpoint


def test_shipped_checkpoint_loads_strictly_as_the_default_weights():
    assert SHIPPED_CHECKPOINT.is_file()
    assert SHIPPED_CHECKPOINT.stat().st_size < 8 * 2**20  # "a few MB at most"
    bb = load_backbone("demo-resnet")  # weights=None -> the shipped file
    assert isinstance(bb.model, DemoResNet)
    assert bb.weights == str(SHIPPED_CHECKPOINT.resolve())
    assert bb.weights != "none"
    raw = _state(SHIPPED_CHECKPOINT)
    assert set(raw) == set(bb.model.state_dict())
    assert all(t.dtype in (torch.float32, torch.int64) for t in raw.values())
    assert torch.equal(bb.model.state_dict()["layer4.2.conv3.weight"], raw["layer4.2.conv3.weight"])
    # trained, not the seeded random initialisation
    assert bb.weights_sha256 != load_backbone("demo-resnet", "none").weights_sha256

    blocks = phi_block_names(bb.model)
    assert blocks == ["layer4.0", "layer4.1", "layer4.2"]
    extractor = PooledBlockFeatures(bb.model, blocks)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = extractor(x)
        logits = bb.model(x)
        from_last_block = bb.model.fc(feats[:, -1])
    extractor.remove()
    assert feats.shape == (2, 3, 512)
    torch.testing.assert_close(from_last_block, logits)  # last φ block = what the classifier reads


def test_shipped_checkpoint_carries_its_provenance():
    meta = checkpoint_metadata()
    assert meta["arch"] == "demo-resnet"
    assert meta["num_classes"] == len(SOURCE_SHAPES) == len(meta["class_names"])
    assert meta["class_names"] == sorted(SOURCE_SHAPES)
    assert meta["domain_names"] == sorted(SOURCE_STYLES)
    assert meta["num_images"] >= 42_000  # at least 10x the demo's 4,200 images
    assert meta["command"].startswith("linft pretrain-source ")
    assert " && linft pretrain " in meta["command"]
    assert f"--seed {meta['seed']}" in meta["pretrain_command"]
    assert f"--epochs {meta['epochs']}" in meta["pretrain_command"]
    assert meta["heldout_accuracy"] is not None and meta["heldout_accuracy"] > 0.5
    fc = _state(SHIPPED_CHECKPOINT)["fc.weight"]
    assert fc.shape == (meta["num_classes"], 512)


def test_load_is_strict_for_demo_resnet_files(tmp_path):
    state = dict(_state(SHIPPED_CHECKPOINT))
    del state["layer4.2.bn3.running_mean"]
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": state}, bad)
    with pytest.raises(LinftError, match="missing layer4.2.bn3.running_mean"):
        load_backbone("demo-resnet", bad)


# --------------------------------------------------------------------------- the pretraining source


def test_pretraining_source_is_broader_and_disjoint_from_the_demo(tmp_path):
    src = write_pretraining_source(tmp_path / "src", seed=0, per_class=1, size=16, workers=1)
    assert sorted(p.name for p in src.iterdir() if p.is_dir()) == sorted(SOURCE_STYLES)
    assert sorted(p.name for p in (src / "neon").iterdir()) == sorted(SOURCE_SHAPES)
    assert len(list(src.rglob("*.png"))) == len(SOURCE_STYLES) * len(SOURCE_SHAPES)
    assert (src / SOURCE_MANIFEST).is_file()
    demo = write_demo_data(tmp_path / "demo", seed=0, per_class=1, size=16)
    assert {"photo"} == set(SOURCE_STYLES) & set(DEMO_STYLES)  # the demo's other styles are never seen in pretraining
    for style, shape in (("photo", "circle"), ("photo", "star")):  # same (seed, style, class, index)
        a = np.asarray(Image.open(src / style / shape / "00000.png"))
        b = np.asarray(Image.open(demo / style / shape / "00000.png"))
        assert not np.array_equal(a, b)
    with pytest.raises(LinftError, match="not empty"):
        write_pretraining_source(src, per_class=1, size=16, workers=1)


# --------------------------------------------------------------------------- pretrain


def test_pretrain_end_to_end_tiny(tiny_folder, tmp_path):
    lines = []
    out = pretrain(tiny_folder, tmp_path / "ck" / "tiny.pt", seed=3, say=lines.append, **TINY)
    assert out == tmp_path / "ck" / "tiny.pt" and out.is_file()
    assert not (tmp_path / "ck" / "tiny.pt.partial").exists()
    bb = load_backbone("demo-resnet", out)
    assert isinstance(bb.model, DemoResNet) and bb.model.fc.out_features == 2
    assert phi_block_names(bb.model) == ["layer4.0", "layer4.1", "layer4.2"]
    meta = checkpoint_metadata(out)
    assert meta["arch"] == "demo-resnet" and meta["num_classes"] == 2
    assert meta["class_names"] == ["circle", "square"] and meta["domain_names"] == ["photo", "sketch"]
    assert meta["seed"] == 3 and meta["epochs"] == 1 and meta["image_size"] == 32
    assert meta["command"].startswith(f"linft pretrain {tiny_folder} --out {out} --epochs 1 --batch-size 8")
    assert "--seed 3" in meta["command"] and "--device cpu" in meta["command"]
    assert meta["source_command"] is None  # not written by write_pretraining_source
    assert 0.0 <= meta["train_accuracy"] <= 1.0
    assert meta["heldout_accuracy"] is None and meta["num_heldout"] == 0  # 2% of 16 images is none
    assert meta["torch_version"] == str(torch.__version__)
    assert any(line.startswith("epoch 1/1: loss ") for line in lines)
    # nothing is left switched on for other code
    assert torch.set_flush_denormal(False) in (True, False)


def test_pretrain_is_deterministic_and_seeded(tiny_folder, tmp_path):
    a = _state(pretrain(tiny_folder, tmp_path / "a.pt", seed=0, **TINY))
    b = _state(pretrain(tiny_folder, tmp_path / "b.pt", seed=0, **TINY))
    streamed = _state(pretrain(tiny_folder, tmp_path / "s.pt", seed=0, preload=False, **TINY))
    c = _state(pretrain(tiny_folder, tmp_path / "c.pt", seed=1, **TINY))
    assert set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], streamed[k]) for k in a)  # decoding once or every epoch: same batches
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # training changed the weights
    init = demo_resnet(2).state_dict()
    assert not torch.equal(a["layer4.0.conv1.weight"], init["layer4.0.conv1.weight"])


def test_pretrain_holds_out_a_part_and_copies_the_source_command(tmp_path):
    src = write_pretraining_source(tmp_path / "src", seed=5, per_class=1, size=16, workers=1)
    out = pretrain(src, tmp_path / "p.pt", holdout_fraction=0.25, **{**TINY, "image_size": 16})
    meta = checkpoint_metadata(out)
    n = len(SOURCE_STYLES) * len(SOURCE_SHAPES)
    assert meta["num_heldout"] == n // 4 and meta["num_train"] == n - n // 4
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0
    assert meta["source_command"] == f"linft pretrain-source {src} --seed 5 --per-class 1 --size 16"
    assert meta["command"] == meta["source_command"] + " && " + meta["pretrain_command"]
    assert meta["num_classes"] == 16


def test_pretrain_bad_input(tiny_folder, tmp_path):
    with pytest.raises(LinftError, match="does not exist"):
        pretrain(tmp_path / "missing", tmp_path / "x.pt", **TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LinftError, match="no domain sub-folders"):
        pretrain(empty, tmp_path / "x.pt", **TINY)
    with pytest.raises(LinftError, match="unknown --arch"):
        pretrain(tiny_folder, tmp_path / "x.pt", arch="vgg16", **TINY)
    with pytest.raises(LinftError, match="--lr"):
        pretrain(tiny_folder, tmp_path / "x.pt", lr=-1.0, **TINY)
    with pytest.raises(LinftError, match="--epochs"):
        pretrain(tiny_folder, tmp_path / "x.pt", **{**TINY, "epochs": 0})
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    with pytest.raises(LinftError, match="--force"):
        pretrain(tiny_folder, existing, **TINY)
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "x.pt").exists()


def test_cli_pretrain_source_and_pretrain(tmp_path):
    runner = CliRunner()
    for args in (["pretrain", "--help"], ["pretrain-source", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Example" in result.output
    src = tmp_path / "src"
    result = runner.invoke(main, ["pretrain-source", str(src), "--per-class", "1", "--size", "16", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"{len(SOURCE_STYLES)} domains" in result.output
    assert len(list(src.rglob("*.png"))) == len(SOURCE_STYLES) * len(SOURCE_SHAPES)
    out = tmp_path / "cli.pt"
    args = ["pretrain", str(src), "--out", str(out), "--epochs", "1", "--batch-size", "16", "--image-size", "16",
            "--workers", "0", "--device", "cpu", "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"saved {out}" in result.output
    assert checkpoint_metadata(out)["num_classes"] == 16
    result = runner.invoke(main, args)  # refuses to replace it
    assert result.exit_code != 0 and "Traceback" not in result.output and "--force" in result.output
    result = runner.invoke(main, ["pretrain", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.pt")])
    assert result.exit_code != 0 and "does not exist" in result.output

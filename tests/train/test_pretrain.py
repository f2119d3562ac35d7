"""linft.train.pretrain: training a backbone from scratch, end to end (tiny, CPU), seeded and deterministic."""

from pathlib import Path

import pytest
import torch

from linft.data.shapes import SOURCE_SHAPES, SOURCE_STYLES, write_pretraining_source, write_shapes_dataset
from linft.errors import LinftError
from linft.models import checkpoint_metadata, load_backbone, phi_block_names
from linft.models.demo_resnet import DemoResNet, demo_resnet
from linft.runtime import denormals_flushed
from linft.train.pretrain import PretrainConfig, pretrain
from helpers import refused

TINY = dict(epochs=1, batch_size=8, image_size=32, workers=0, device="cpu")

#: A float32 denormal (the smallest normal float32 is about 1.2e-38).
DENORMAL = 1e-40


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """2 style domains x 2 shape classes x 4 images, 32 px."""
    root = tmp_path_factory.mktemp("tiny") / "shapes"
    return write_shapes_dataset(root, classes=("circle", "square"), styles=("photo", "sketch"), per_class=4,
                                size=32, seed=0, seed_tag=1, workers=1)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _denormal_survives() -> bool:
    """Whether a float32 denormal times 1 stays non-zero on this thread (False while denormals are flushed).

    A one-element product runs on the calling thread, the one whose flush setting ``set_flush_denormal`` changes.
    """
    return (torch.tensor(DENORMAL, dtype=torch.float32) * 1).item() != 0.0


def test_denormals_flushed_flushes_inside_and_restores_outside():
    assert _denormal_survives()  # the default: denormals are kept
    supported = torch.set_flush_denormal(True)  # True where the CPU can flush (x86 with SSE3: every x86-64)
    torch.set_flush_denormal(False)
    assert _denormal_survives()
    with denormals_flushed():
        inside = _denormal_survives()
    assert inside is (not supported)  # flushed to 0 wherever flushing is supported
    assert _denormal_survives()  # and kept again after the block
    with pytest.raises(RuntimeError, match="boom"):
        with denormals_flushed():
            raise RuntimeError("boom")
    assert _denormal_survives()  # restored after an exception too


def test_pretrain_end_to_end_tiny(tiny_folder, tmp_path):
    lines = []
    out = pretrain(tiny_folder, tmp_path / "ck" / "tiny.pt", seed=3, say=lines.append, progress=False, **TINY)
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
    # nothing is left switched on for other code: denormals are kept again after the training
    assert _denormal_survives()


def test_pretrain_config_object_and_keyword_settings_agree(tiny_folder, tmp_path):
    """``pretrain(d, o, config)`` and ``pretrain(d, o, **settings)`` are the same call (same code path twice)."""
    a = _state(pretrain(tiny_folder, tmp_path / "a.pt", PretrainConfig(seed=2, **TINY), progress=False))
    b = _state(pretrain(tiny_folder, tmp_path / "b.pt", seed=2, progress=False, **TINY))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_is_deterministic_and_seeded(tiny_folder, tmp_path):
    a = _state(pretrain(tiny_folder, tmp_path / "a.pt", seed=0, progress=False, **TINY))
    b = _state(pretrain(tiny_folder, tmp_path / "b.pt", seed=0, progress=False, **TINY))
    streamed = _state(pretrain(tiny_folder, tmp_path / "s.pt", seed=0, preload=False, progress=False, **TINY))
    c = _state(pretrain(tiny_folder, tmp_path / "c.pt", seed=1, progress=False, **TINY))
    assert set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # decoding once or every epoch gives the same uint8 batches, and from there the same code path
    assert all(torch.equal(a[k], streamed[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # training changed the weights
    init = demo_resnet(2).state_dict()
    assert not torch.equal(a["layer4.0.conv1.weight"], init["layer4.0.conv1.weight"])


def test_pretrain_holds_out_a_part_and_copies_the_source_command(tmp_path):
    src = write_pretraining_source(tmp_path / "src", seed=5, per_class=1, size=16, workers=1)
    out = pretrain(src, tmp_path / "p.pt", holdout_fraction=0.25, progress=False, **{**TINY, "image_size": 16})
    meta = checkpoint_metadata(out)
    n = len(SOURCE_STYLES) * len(SOURCE_SHAPES)
    assert meta["num_heldout"] == n // 4 and meta["num_train"] == n - n // 4
    assert 0.0 <= meta["heldout_accuracy"] <= 1.0
    assert meta["source_command"] == f"linft pretrain-source {src} --seed 5 --per-class 1 --size 16"
    assert meta["command"] == meta["source_command"] + " && " + meta["pretrain_command"]
    assert meta["num_classes"] == 16


def test_pretrain_bad_input(tiny_folder, tmp_path):
    with pytest.raises(LinftError, match="does not exist"):
        pretrain(tmp_path / "missing", tmp_path / "x.pt", progress=False, **TINY)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LinftError, match="no domain sub-folders"):
        pretrain(empty, tmp_path / "x.pt", progress=False, **TINY)
    with pytest.raises(LinftError, match="unknown arch 'vgg16'"):
        pretrain(tiny_folder, tmp_path / "x.pt", arch="vgg16", progress=False, **TINY)
    with refused("lr"):
        pretrain(tiny_folder, tmp_path / "x.pt", lr=-1.0, progress=False, **TINY)
    with refused("epochs"):
        pretrain(tiny_folder, tmp_path / "x.pt", progress=False, **{**TINY, "epochs": 0})
    existing = tmp_path / "exists.pt"
    existing.write_bytes(b"keep me")
    with refused("force"):
        pretrain(tiny_folder, existing, progress=False, **TINY)
    assert existing.read_bytes() == b"keep me"
    assert not (tmp_path / "x.pt").exists()

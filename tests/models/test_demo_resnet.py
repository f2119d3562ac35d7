"""linft.models.demo_resnet: the demo backbone's architecture and the checkpoint shipped in the package."""

import pytest
import torch
from torchvision.models.resnet import Bottleneck

from linft.data.shapes import SOURCE_SHAPES, SOURCE_STYLES
from linft.errors import LinftError
from linft.models import (PooledBlockFeatures, checkpoint_metadata, load_backbone, phi_block_names,
                          residual_block_names)
from linft.models.demo_resnet import SHIPPED_CHECKPOINT, DemoResNet, demo_resnet


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
    bb = load_backbone("demo-resnet")  # weights=DEFAULT -> the shipped file
    assert isinstance(bb.model, DemoResNet)
    assert bb.weights == str(SHIPPED_CHECKPOINT.resolve())
    assert load_backbone("demo-resnet", "DEFAULT").weights == bb.weights
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
    # last φ block = what the classifier reads. Two code paths (the hook's pooling and a strided slice into fc,
    # versus the model's avgpool and flatten): equal up to float32 rounding, assert_close's float32 tolerance.
    torch.testing.assert_close(from_last_block, logits)


def test_shipped_checkpoint_carries_its_provenance():
    meta = checkpoint_metadata(SHIPPED_CHECKPOINT)
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
    with pytest.raises(LinftError, match=r"does not fit a demo-resnet: it lacks 'layer4\.2\.bn3\.running_mean'"):
        load_backbone("demo-resnet", bad)

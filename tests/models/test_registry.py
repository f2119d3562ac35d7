"""linft.models.registry: backbones by name, weights loaded strictly from an enum name, a file or none."""

import os
import urllib.error

import pytest
import torch
import torchvision

from linft.errors import LinftError
from linft.models.checkpoints import state_dict_sha256
from linft.models.registry import backbone_names, load_backbone


def test_family_names():
    names = backbone_names()
    for n in ("resnet18", "resnet50", "resnet152", "wide_resnet50_2", "resnext50_32x4d"):
        assert n in names
    assert "fcn_resnet50" not in names and "quantized_resnet50" not in names
    assert names[-1] == "demo-resnet"  # registered by linft.models.demo_resnet, after torchvision's family


def test_weights_none_is_deterministic():
    a, b = load_backbone("resnet18", "none"), load_backbone("resnet18", "NONE")
    assert a.weights == "none" and a.weights_sha256 == b.weights_sha256
    assert not a.model.training


@pytest.mark.parametrize("name", ["resnet18", "demo-resnet"])
def test_weights_python_none_is_refused_for_every_backbone(name):
    # None meant random weights for torchvision backbones and the shipped file for demo-resnet: now one error for both
    with pytest.raises(LinftError, match='weights="DEFAULT".*weights="none"'):
        load_backbone(name, None)


def test_state_dict_hash_sees_every_byte():
    sd = {"w": torch.zeros(3), "n": torch.tensor(0)}
    h = state_dict_sha256(sd)
    sd2 = {"w": torch.tensor([0.0, 0.0, 1e-30]), "n": torch.tensor(0)}
    assert h != state_dict_sha256(sd2)
    assert h == state_dict_sha256(dict(reversed(list(sd.items()))))


def test_local_state_dict_any_head_size(tmp_path):
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    bb = load_backbone("resnet18", path)
    assert bb.weights == str(path.resolve())
    assert bb.weights_sha256 == state_dict_sha256(model.state_dict())
    # linft's checkpoint format: a dict with state_dict and metadata
    torch.save({"state_dict": model.state_dict(), "metadata": {"seed": 1}}, tmp_path / "ck.pt")
    assert load_backbone("resnet18", tmp_path / "ck.pt").weights_sha256 == bb.weights_sha256


def test_local_state_dict_of_another_architecture(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(LinftError, match=r"does not fit a resnet18: it has extra 'layer1\.2\.") as err:
        load_backbone("resnet18", path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    sd = torchvision.models.resnet18().state_dict()
    sd["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(sd, path)
    with pytest.raises(LinftError, match=r"'conv1\.weight' has shape \(64, 3, 7, 7\) in a resnet18 but \(8, 3, 7, 7\)"):
        load_backbone("resnet18", path)


def test_bad_weights_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(LinftError, match="cannot read weights file"):
        load_backbone("resnet18", junk)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(LinftError, match="holds no state_dict"):
        load_backbone("resnet18", tmp_path / "list.pt")
    with pytest.raises(LinftError, match=r"neither a weight name of resnet18 \(IMAGENET1K_V1, DEFAULT\)"):
        load_backbone("resnet18", tmp_path / "missing.pt")


def test_unknown_backbone():
    with pytest.raises(LinftError, match="unknown backbone 'vgg16'; choose one of: .*resnet50"):
        load_backbone("vgg16", "none")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_enum_weights_unavailable_names_file_and_folder(torch_home, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(LinftError) as err:
        load_backbone("resnet50", "IMAGENET1K_V2")
    msg = str(err.value)
    assert "resnet50-11ad3fa6.pth" in msg and str(torch_home) in msg and "\n" not in msg


def test_enum_weights_load_through_torchvision_cache(torch_home):
    torch_home.mkdir(parents=True)
    torch.manual_seed(2)
    sd = torchvision.models.resnet18().state_dict()
    filename = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    torch.save(sd, torch_home / filename)
    bb = load_backbone("resnet18", "DEFAULT")
    assert bb.weights == "IMAGENET1K_V1" and bb.weights_label == "ResNet #1"
    assert bb.weights_sha256 == state_dict_sha256(sd)
    assert load_backbone("resnet18", "imagenet1k_v1").weights_sha256 == bb.weights_sha256


@pytest.mark.parametrize("garbage", [b"\x00" * 100, b"PK\x03\x04" + b"junk" * 50, b"not a checkpoint at all", b""])
def test_corrupt_enum_weights_file(torch_home, garbage):
    torch_home.mkdir(parents=True)
    filename = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    (torch_home / filename).write_bytes(garbage)
    with pytest.raises(LinftError, match="delete it and put a good copy"):
        load_backbone("resnet18", "IMAGENET1K_V1")


@pytest.mark.parametrize("fc", [torch.tensor(1.0), torch.zeros(3, 4, 5)])
def test_a_classifier_weight_of_the_wrong_rank_is_one_line(tmp_path, fc):
    sd = torchvision.models.resnet18().state_dict()
    sd["fc.weight"] = fc
    torch.save(sd, tmp_path / "w.pt")
    with pytest.raises(LinftError, match=r"'fc\.weight' has shape \(1000, 512\) in a resnet18 but ") as err:
        load_backbone("resnet18", tmp_path / "w.pt")
    assert f"but {tuple(fc.shape)} in weights {tmp_path / 'w.pt'}" in str(err.value)

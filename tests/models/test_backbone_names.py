"""Registering a backbone never replaces one (torchvision's ``register_model`` rule): a taken name is refused and
the registry is left as it was."""

import subprocess
import sys

import pytest

from linft.models.registry import BackboneFamily, backbone_names, build_backbone, register_backbone, register_family
from linft.models.vit import register_vit_config

from helpers import refused


def _never(*args, **kwargs):
    raise AssertionError("a refused registration must not replace the backbone")


@pytest.mark.parametrize("name", ["resnet50", "demo-resnet", "vit_b_16", "vit-tiny"])
def test_a_taken_name_is_refused_and_the_backbone_kept(name):
    before = backbone_names()
    with refused("name"):
        register_backbone(name, _never)
    assert backbone_names() == before


def test_a_vit_config_under_a_taken_name_is_refused():
    with refused("name"):
        register_vit_config("vit-tiny", image_size=64, patch_size=8, num_layers=1, num_heads=1, hidden_dim=8,
                            mlp_dim=8)
    assert build_backbone("vit-tiny", 3).encoder.pos_embedding.shape[1] == (32 // 8) ** 2 + 1  # still the tests'


def test_a_family_that_claims_a_taken_name_is_refused():
    family = BackboneFamily(owns=lambda n: n == "resnet18", names=lambda: ["resnet18"], build=_never, load=_never)
    before = backbone_names()
    with refused("name"):
        register_family(family)
    assert backbone_names() == before


def test_a_new_name_is_registered_then_taken():
    """In a fresh process, so the name does not stay registered in the test session."""
    code = ("from linft.errors import LinftError\n"
            "from linft.models.registry import backbone_names, register_backbone\n"
            "register_backbone('new-net', lambda num_classes: None)\n"
            "assert 'new-net' in backbone_names()\n"
            "try:\n    register_backbone('new-net', None)\nexcept LinftError as e:\n    print(e.param)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "name"

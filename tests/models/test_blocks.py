"""linft.models.blocks: the φ blocks found structurally and their pooled outputs."""

import pytest
import torch
import torchvision
from torch import nn

from linft.errors import LinftError
from linft.models.blocks import PooledBlockFeatures, phi_block_names
from helpers import refused


def _hooked_pooled_blocks(model, names, x):
    """Independent computation: forward hooks on the blocks, pooled with mean over H, W."""
    got = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o.mean((2, 3))))
               for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return torch.stack([got[n] for n in names], 1)


@pytest.mark.parametrize("name,expected", [
    ("resnet18", ["layer4.0", "layer4.1"]),
    ("resnet50", ["layer4.0", "layer4.1", "layer4.2"]),
    ("resnet101", ["layer4.0", "layer4.1", "layer4.2"]),
])
def test_phi_blocks_are_the_last_stage(name, expected):
    model = torchvision.models.get_model(name)
    assert phi_block_names(model) == expected
    assert phi_block_names(model, 1) == expected[-1:]
    for bad in (len(expected) + 1, 0):
        with refused("num_blocks") as err:
            phi_block_names(model, bad)
        assert f"has {len(expected)} residual blocks" in str(err.value)


def test_phi_blocks_refuse_a_non_resnet():
    with pytest.raises(LinftError, match="no residual blocks"):
        phi_block_names(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_pooled_last_block_equals_the_models_own_avgpool():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    names = phi_block_names(model)
    x = torch.randn(4, 3, 64, 64)
    feats = PooledBlockFeatures(model, names).eval()(x)
    assert feats.shape == (4, 2, 512)
    model.fc = nn.Identity()
    with torch.no_grad():
        penultimate = model(x)
    # Two code paths, not one run twice: the hook pools with adaptive_avg_pool2d(output, 1), the model with its
    # own avgpool module (output (1, 1): another kernel, another summation order), each after its own forward
    # pass through the 17 float32 convolutions of a ResNet-18 (CPU kernels and their blocking depend on the ISA
    # and the thread count).
    # Rounding differences of ~1e-7 relative per layer compound to ~1e-6 on features of order 1: 1e-5 relative
    # (1e-6 absolute for features near 0 after the ReLU) bounds that, while any real error (a wrong block, a
    # missing ReLU, another pooling) is of the features' own size.
    torch.testing.assert_close(feats[:, -1], penultimate, rtol=1e-5, atol=1e-6)
    # An independent computation (hooks pooling with mean over H, W): the same tolerance for the same reason.
    torch.testing.assert_close(feats, _hooked_pooled_blocks(model, names, x), rtol=1e-5, atol=1e-6)

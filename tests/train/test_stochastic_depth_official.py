"""``stochastic_depth_mode="official"`` against an independent reference (issue 20, section 7).

The reference is written here by hand: a tiny torchvision-style ResNet (demo-resnet: Bottleneck blocks, some with
a downsample) run block by block, a dropped block computing ``relu(downsample(x) or x)`` without its branch (the
official code's StoDepth blocks), then plain SGD with momentum and weight decay written out, which leaves a
parameter without gradient untouched (its momentum buffer too), as torch's SGD does for ``grad is None``.
linft's side is :func:`add_stochastic_depth` plus the fine-tuning step :func:`train_step`, BatchNorm not frozen.
The drop pattern is the one linft draws (one CPU draw per block per batch, in forward order, after the step seeds
the generator); the test checks it drops some blocks, keeps others, and drops a downsample block.

Tolerance: both sides run the same float32 operations on the same inputs; only the SGD update is written
differently (torch's kernels against the formula: 1e-7 after one step, which three steps at lr 0.05 with
BatchNorm in training mode grow to about 1.3e-5 of a tensor's largest value). So every tensor must agree within
1e-4 of its largest absolute value (+1e-6), and BatchNorm counters exactly. The multiply-by-0 of earlier
releases missed by far more: dropped branches moved by weight decay and momentum, their statistics updated.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from linft.models.blocks import add_stochastic_depth, residual_block_names
from linft.models.demo_resnet import demo_resnet
from linft.models.registry import load_backbone
from linft.data.splits import seed_hash
from linft.train.finetune.model import FineTuneConfig, FineTuneRun, model_input, run_optimizer, set_train_mode, \
    train_step

RATE, STEPS, TEST_DOMAIN = 0.5, 3, 1
RUN = FineTuneRun("b", seed=0, lr=0.05, weight_decay=0.05, stochastic_depth=RATE, stochastic_depth_mode="official")
CONFIG = FineTuneConfig(steps=100, augment="none", channels_last=False, precision="float32")
MOMENTUM = 0.9
TOLERANCE = 1e-4  # of each tensor's largest absolute value (see the module's docstring)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _blocks(model):
    modules = dict(model.named_modules())
    return [modules[n] for n in residual_block_names(model)]


def _pattern(n_blocks: int) -> list[list[bool]]:
    """keep[step][block]: the draws linft makes in each step (the generator seeded as train_step seeds it)."""
    keep = []
    for step in range(STEPS):
        torch.manual_seed(seed_hash("linft-finetune", "masks", RUN.seed, TEST_DOMAIN, step))
        keep.append([not bool(torch.rand(()) < RATE) for _ in range(n_blocks)])
    return keep


def _reference_forward(model, x, keep):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    for block, kept in zip(blocks, keep):
        x = block(x) if kept else F.relu(x if block.downsample is None else block.downsample(x))
    return model.fc(torch.flatten(model.avgpool(x), 1))


def _reference_training(model, x, y, pattern, freeze_bn):
    buffers = {}
    model.train()
    for m in model.modules():
        if freeze_bn and isinstance(m, nn.BatchNorm2d):
            m.eval()
    for step in range(STEPS):
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(_reference_forward(model, x, pattern[step]), y).backward()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.grad is None:  # skipped this step: no weight decay, no momentum
                    continue
                d = p.grad + RUN.weight_decay * p
                buffers[name] = d.clone() if name not in buffers else MOMENTUM * buffers[name] + d
                p -= RUN.lr * buffers[name]
    return model


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_official_mode_skips_dropped_branches_like_the_reference(freeze_bn):
    torch.manual_seed(0)
    start = demo_resnet(num_classes=3)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    blocks = _blocks(start)
    pattern = _pattern(len(blocks))
    dropped = {(s, i) for s in range(STEPS) for i in range(len(blocks)) if not pattern[s][i]}
    assert 0 < len(dropped) < STEPS * len(blocks)  # some of each (checked, not assumed)
    assert any(blocks[i].downsample is not None for _, i in dropped)  # a block with a downsample is dropped too
    reference = _reference_training(copy.deepcopy(start), model_input(images, torch.device("cpu"), False), labels,
                                    pattern, freeze_bn)

    model = copy.deepcopy(start)
    add_stochastic_depth(model, RATE, "official")
    set_train_mode(model, True, freeze_bn=freeze_bn)
    optimizer = run_optimizer(model, RUN, MOMENTUM)
    for step in range(STEPS):
        train_step(model, optimizer, images, labels, step, RUN, TEST_DOMAIN, CONFIG)
    got, expected = model.state_dict(), reference.state_dict()
    for key, value in expected.items():  # parameters and BatchNorm statistics (a dropped block's are not updated)
        if not value.is_floating_point():  # num_batches_tracked: counts only the steps the block ran
            assert torch.equal(got[key], value), key
            continue
        scale = float(value.abs().max())
        torch.testing.assert_close(got[key], value, rtol=0, atol=TOLERANCE * scale + 1e-6, msg=key)
    # the last step's dropped branches got no gradient at all (None), the kept ones did
    for i, block in enumerate(_blocks(model)):
        grads = [p.grad is None for p in block.conv1.parameters()]
        assert grads == [not pattern[-1][i]], (i, pattern[-1][i])
        if block.downsample is not None:  # the shortcut runs either way
            assert all(p.grad is not None for p in block.downsample.parameters())
    # a branch dropped at every step never moved, BatchNorm statistics included
    never = [i for i in range(len(blocks)) if all(not pattern[s][i] for s in range(STEPS))]
    for i in never:
        name = residual_block_names(model)[i]
        for key, value in start.state_dict().items():
            if key.startswith(f"{name}.") and ".downsample." not in key:
                assert torch.equal(got[key], value), key


def test_official_mode_in_eval_mode_and_its_handles():
    torch.manual_seed(0)
    plain = demo_resnet(num_classes=3).eval()
    model = copy.deepcopy(plain)
    handles = add_stochastic_depth(model, RATE, "official")
    assert len(handles) == len(residual_block_names(model))
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(x))
        model.train()
        torch.manual_seed(1)
        dropped = model(x)
        twin = copy.deepcopy(model)  # a deep copy keeps the mode, on its own blocks
        torch.manual_seed(1)
        assert torch.equal(twin(x), dropped)
        for h in handles:
            h.remove()
        plain.train()
        assert torch.equal(model(x), plain(x))  # removed: the plain forward again


def test_official_mode_gives_a_dropped_transformer_branch_no_gradient():
    """A Vision Transformer's attention and MLP branches (one draw each per batch, in forward order): a dropped one
    is replaced by zeros outside the graph, so its parameters get no gradient (None), a kept one gets one."""
    model = load_backbone("vit-tiny", "none").model.train()
    layers = list(model.encoder.layers)
    branches = [part for layer in layers for part in ((layer.ln_1, layer.self_attention), (layer.ln_2, layer.mlp))]
    add_stochastic_depth(model, RATE, "official")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    dropped = [bool(torch.rand(()) < RATE) for _ in branches]
    assert 0 < sum(dropped) < len(dropped)  # some of each (checked, not assumed)
    torch.manual_seed(5)
    model(x).sum().backward()
    for modules, drop in zip(branches, dropped):
        for p in (p for m in modules for p in m.parameters()):
            assert (p.grad is None) == drop

"""Transformer backbones (linft.models.vit, linft.models.clip) on tiny configurations of the real classes.

``vit-tiny`` is torchvision's ``VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2,
hidden_dim=32, mlp_dim=64)``; ``clip:linft-tiny-clip`` is open_clip's CLIP from a tiny config (its real
image and text towers, its real tokenizer). Both are registered by conftest.py.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from linft.data.images import describe_transform
from linft.errors import LinftError
from linft.models.blocks import PooledBlockFeatures, add_stochastic_depth, phi_block_names, residual_branch_ends
from linft.models.clip import finetuned_clip_name, prompt_names, zero_shot_head
from linft.models.linearize import LinearizedModel, escape_parameter_name
from linft.models.registry import build_backbone, load_backbone
from linft.models.vit import weights_transform
from helpers import refused

from conftest import TINY_CLIP, TINY_VIT

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def head_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the model's classifier ``fc`` reads, caught by a hook during the model's own forward."""
    seen = []
    handle = model.fc.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["vit-tiny", TINY_CLIP])
def test_last_phi_is_exactly_what_the_head_reads(name):
    model = load_backbone(name, "none").model
    blocks = phi_block_names(model)
    assert len(blocks) == 3 and phi_block_names(model, 4)[1:] == blocks  # default K = 3 of 4 blocks
    with refused("num_blocks"):
        phi_block_names(model, 5)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        phi = PooledBlockFeatures(model, blocks)(x)
    # the hook pools the last block's output with the very operations the model's forward runs after it
    # (final norm, class token, projection and unit norm for CLIP), on the same tensor: equal bit for bit
    assert phi.shape == (5, 3, model.fc.in_features)
    assert torch.equal(phi[:, -1], head_input(model, x))
    assert not torch.allclose(phi[:, 0], phi[:, -1])
    assert load_backbone(name, "none").weights_sha256 == load_backbone(name, "none").weights_sha256  # seeded


def test_vit_phi_is_the_residual_stream_through_the_final_norm():
    """An independent computation: torchvision's own VisionTransformer run block by block."""
    torch.manual_seed(0)
    vit = VisionTransformer(**TINY_VIT).eval()
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts it at zero
    model = load_backbone("vit-tiny", "none").model
    model.load_state_dict({("fc." + k[11:] if k.startswith("heads.head.") else k): v
                           for k, v in vit.state_dict().items()}, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t = vit._process_input(x)
        t = torch.cat([vit.class_token.expand(2, -1, -1), t], 1) + vit.encoder.pos_embedding
        states = []
        for block in vit.encoder.layers:
            t = block(t)
            states.append(vit.encoder.ln(t)[:, 0])
        phi = PooledBlockFeatures(model, phi_block_names(model, 4))(x)
        logits, ours = vit(x), model(x)
    # other code paths (attention run block by block, features of order 1): float32 rounding, compounded
    torch.testing.assert_close(phi, torch.stack(states, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, logits, rtol=1e-5, atol=1e-5)


def test_vit_weights_bring_their_own_transform():
    swag = torchvision.models.ViT_L_16_Weights.IMAGENET1K_SWAG_E2E_V1
    assert describe_transform(weights_transform(swag)).startswith(
        "Resize(512) [PIL bicubic], CenterCrop(512), ToTensor")
    v1 = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    assert describe_transform(weights_transform(v1)).startswith("Resize(256) [PIL bilinear], CenterCrop(224), ToTensor")


def test_torchvision_state_dict_file_loads_with_its_size(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(**{**TINY_VIT, "image_size": 48}, num_classes=7).eval()
    path = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), path)
    bb = load_backbone("vit-tiny", str(path))
    assert bb.image_size == 48 and bb.transform is None and bb.model.fc.out_features == 7
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), vit(x), rtol=1e-5, atol=1e-6)
    assert bb.input_transform(48)[2] == 48
    with refused("image_size") as err:
        bb.input_transform(32)
    assert "48 px" in str(err.value)


def test_stochastic_depth_drops_attention_and_mlp_branches():
    """Per example and per branch (attention and MLP of every block): the branch output is either zero or itself
    divided by 1 - p (torchvision's "row" mode), some of each (checked, not assumed); eval mode is the identity."""
    model = load_backbone("vit-tiny", "none").model
    ends = residual_branch_ends(model)
    assert len(ends) == 2 * 4
    seen = {}
    for i, end in enumerate(ends):  # the raw output before the drop, then what the next layer gets
        end.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(("raw", i), out.clone()))
    handles = add_stochastic_depth(model, 0.5)
    for i, end in enumerate(ends):
        end.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(("dropped", i), out.clone()))
    assert len(handles) == 2 * 4
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        plain = head_input(model.eval(), x)
        model.train()
        torch.manual_seed(0)
        head_input(model, x)
    zeroed_total = 0
    for i in range(len(ends)):
        raw, dropped = seen[("raw", i)], seen[("dropped", i)]
        zeroed = (dropped == 0).flatten(1).all(1)
        kept = ~zeroed
        torch.testing.assert_close(dropped[kept], raw[kept] / 0.5)
        zeroed_total += int(zeroed.sum())
    assert 0 < zeroed_total < 6 * len(ends)
    model.eval()
    with torch.no_grad():
        assert torch.equal(head_input(model, x), plain)  # eval mode: the hooks do nothing


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")  # torch scripts its jvp decompositions
def test_first_order_model_through_attention_matches_finite_differences():
    """J(θ0)δ from the jvp through multi-head attention vs the central difference (f(θ0+εδ) − f(θ0−εδ)) / 2ε."""
    torch.manual_seed(0)
    model = load_backbone("vit-tiny", "none").model.double().eval()
    nn.init.normal_(model.fc.weight, std=0.1)
    lin = LinearizedModel(model)
    delta = {n: 1e-2 * torch.randn_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        for n in lin.parameter_names:
            lin.delta[escape_parameter_name(n)].copy_(delta[n])
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    eps = 1e-4

    def shifted(sign):
        m = load_backbone("vit-tiny", "none").model.double().eval()
        m.load_state_dict(model.state_dict())
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.add_(sign * eps * delta[n])
            return m(x)

    with torch.no_grad():
        f0 = model(x)
        jv = lin(x) - f0
    torch.testing.assert_close(jv, (shifted(1) - shifted(-1)) / (2 * eps), rtol=1e-5, atol=1e-8)
    assert jv.abs().max() > 1e-3


def test_zero_shot_head_through_open_clips_tokenizer_and_text_tower(tmp_path):
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP[5:]).eval()
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    names, templates = ["tench", "goldfish", "great white shark"], ["a photo of a {}.", "a drawing of a {}."]
    head = zero_shot_head(TINY_CLIP, str(path), names, templates)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP[5:])
    rows = []
    with torch.no_grad():
        for name in names:  # the formula, one class at a time
            e = clip.encode_text(tokenizer([t.format(name) for t in templates]))
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(e / e.norm() * clip.logit_scale.exp())
    torch.testing.assert_close(head.weight, torch.stack(rows), rtol=1e-5, atol=1e-6)
    assert torch.equal(head.bias, torch.zeros(3))
    # the image tower of the same file, the head on its normalised embeddings: CLIP's zero-shot logits
    bb = load_backbone(TINY_CLIP, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = head_input(bb.model, x)
        img = clip.encode_image(x * bb.model.input_scale + bb.model.input_shift, normalize=True)
    torch.testing.assert_close(feats, img, rtol=1e-5, atol=1e-6)
    # the default templates are open_clip's own
    assert len(open_clip.OPENAI_IMAGENET_TEMPLATES) == 80


@pytest.mark.parametrize("prefix", ["model.", "image_encoder.model."])
def test_model_soups_and_wise_ft_state_dicts_load_as_they_are(tmp_path, prefix):
    """A state_dict of model-soups' ModelWrapper (``model.``: OpenAI's CLIP without its text transformer, and a
    classification_head) or of wise-ft's ImageClassifier (``image_encoder.model.``): the image tower and head load
    strictly, the text entries are set aside; the QuickGELU tower the name says."""
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP[5:], force_quick_gelu=True).eval()
    state = {f"{prefix}{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    state["classification_head.weight"], state["classification_head.bias"] = torch.randn(5, 16), torch.randn(5)
    path = tmp_path / "model_0.pt"
    torch.save(state, path)
    bb = load_backbone(TINY_CLIP + "-quickgelu", str(path))
    assert bb.name == TINY_CLIP + "-quickgelu" and bb.model.fc.out_features == 5
    assert torch.equal(bb.model.fc.weight, state["classification_head.weight"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = clip.encode_image(x * bb.model.input_scale + bb.model.input_shift)
        logits = nn.functional.linear(feats / feats.norm(dim=-1, keepdim=True), state["classification_head.weight"],
                                      state["classification_head.bias"])  # model-soups' ModelWrapper.forward
        torch.testing.assert_close(bb.model(x), logits, rtol=1e-5, atol=1e-6)
    state[f"{prefix}visual.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(LinftError, match="has extra 'visual.extra'"):
        load_backbone(TINY_CLIP + "-quickgelu", str(path))


def test_a_model_soups_file_never_changes_the_activation_of_a_model_without_openai_weights(tmp_path):
    """QuickGELU is chosen for a model-soups / wise-ft file only where OpenAI's weights of the named model use it
    (those codebases fine-tune OpenAI's CLIP); the tiny model has none: it is built as named, with GELU."""
    assert finetuned_clip_name("clip:ViT-B-32") == "clip:ViT-B-32-quickgelu"  # open_clip's 'openai' tag: QuickGELU
    assert finetuned_clip_name("clip:ViT-B-32-quickgelu") == "clip:ViT-B-32-quickgelu"
    assert finetuned_clip_name("clip:ViT-H-14") == "clip:ViT-H-14"  # no OpenAI weights
    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP[5:]).eval()  # GELU, as the name says
    state = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    state["classification_head.weight"], state["classification_head.bias"] = torch.randn(5, 16), torch.randn(5)
    torch.save(state, tmp_path / "model_0.pt")
    bb = load_backbone(TINY_CLIP, str(tmp_path / "model_0.pt"))
    assert bb.name == TINY_CLIP
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = clip.encode_image(x * bb.model.input_scale + bb.model.input_shift, normalize=True)
        torch.testing.assert_close(bb.model(x), nn.functional.linear(feats, state["classification_head.weight"],
                                                                     state["classification_head.bias"]),
                                   rtol=1e-5, atol=1e-6)


def test_clip_preprocessing_is_open_clips(tmp_path):
    bb = load_backbone(TINY_CLIP, "none")
    text = describe_transform(*bb.input_transform(224)[:2])
    assert text == ("Resize(32) [PIL bicubic], CenterCrop(32), ToTensor, "
                    "Normalize(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])")
    # ImageNet-normalised input, re-normalised to CLIP's statistics inside the network
    pixels = torch.rand(1, 3, 4, 4)
    imagenet = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    clip_norm = (pixels - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(imagenet * bb.model.input_scale + bb.model.input_shift, clip_norm)


@pytest.mark.parametrize("name, weights, fragment", [
    ("vit_z_99", "none", "unknown backbone 'vit_z_99'"),
    ("clip:NoSuchModel", "none", "open_clip has no model 'NoSuchModel'"),
    ("vit_b_16", "IMAGENET1K_NOPE", "neither a weight name of vit_b_16 (IMAGENET1K_V1"),
])
def test_one_line_errors(name, weights, fragment):
    with pytest.raises(LinftError, match=None) as info:
        load_backbone(name, weights)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_weights_not_available_offline_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url",  # what WeightsEnum.get_state_dict calls
                        lambda *a, **k: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(LinftError, match=r"put vit_l_16_swag-4f3808c9.pth \(https://.*\) in .*torch.*checkpoints"):
        load_backbone("vit_l_16", "IMAGENET1K_SWAG_E2E_V1")
    monkeypatch.setattr(pytest.importorskip("huggingface_hub.constants"), "HF_HUB_OFFLINE", True)  # no network tries
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(LinftError, match=r"clip:ViT-B-32/openai are not available .*open_clip_pytorch_model.bin.*"
                                         r"timm/vit_base_patch32_clip_224.openai"):
        load_backbone("clip:ViT-B-32", "openai")


def test_checkpoint_of_another_architecture_is_one_line(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    with pytest.raises(LinftError, match="does not fit a vit-tiny") as info:
        load_backbone("vit-tiny", str(path))
    assert "\n" not in str(info.value)
    torch.save(load_backbone("vit-tiny", "none").model.state_dict(), path)
    with pytest.raises(LinftError, match=f"does not fit a {TINY_CLIP}"):
        load_backbone(TINY_CLIP, str(path))


def test_zero_shot_prompts_use_open_clips_imagenet_names():
    names = prompt_names([f"n{i:08d}" for i in range(1000)])  # 1000 wnid folders: ImageNet's classes in its order
    assert names == list(open_clip.IMAGENET_CLASSNAMES) and names[0] == "tench"
    assert prompt_names(["great_white_shark", "tench"]) == ["great white shark", "tench"]


def test_zero_shot_prompts_refuse_imagenet_sized_folders_that_are_not_wnids():
    """ImageNetV2's folders 0..999 sort as strings (0, 1, 10, 100, ...): matched to ImageNet's names in order they
    would prompt class 10 with 'goldfish'; refused in one line saying to rename them."""
    with pytest.raises(LinftError, match=None) as info:
        prompt_names(sorted(str(i) for i in range(1000)))
    assert "1000 of the 1000 class folders are not ImageNet wnids (e.g. '0')" in str(info.value)
    assert "rename the folders" in str(info.value) and "\n" not in str(info.value)


def test_resnet_options_are_refused_in_one_line():
    with pytest.raises(LinftError, match="vit-tiny takes no zero_init_residual"):
        build_backbone("vit-tiny", 3, zero_init_residual=True)  # what `linft pretrain --arch` passes
    with pytest.raises(LinftError, match=f"{TINY_CLIP} takes no zero_init_residual"):
        build_backbone(TINY_CLIP, 3, zero_init_residual=True)


@pytest.mark.parametrize("weights", ["none", "file"])
def test_clip_towers_that_are_not_vits_are_refused_in_one_line(weights, tmp_path):
    """A CLIP with a ResNet image tower (clip:RN50's ModifiedResNet, here a tiny one) has no residual blocks of a
    ViT; it is refused when built or loaded, not by an AttributeError later."""
    rn = "clip:linft-tiny-clip-rn"
    if weights == "file":
        weights = str(tmp_path / "rn.pt")
        torch.save(open_clip.create_model(rn[5:]).state_dict(), weights)
    for load in (lambda: load_backbone(rn, weights), lambda: build_backbone(rn, 3)):
        with pytest.raises(LinftError, match=None) as info:
            load()
        text = str(info.value)
        assert f"the image tower of {rn} is a ModifiedResNet" in text and "ViT-based CLIP models" in text
        assert "\n" not in text


def _broken(state: dict, key: str, value: torch.Tensor) -> dict:
    return {**state, key: value}


@pytest.mark.parametrize("name,key,value,fragment", [
    ("vit-tiny", "heads.head.weight", torch.tensor(1.0), "fc.weight"),  # a 0-d head
    ("vit-tiny", "heads.head.weight", torch.zeros(5), "fc.weight"),  # a 1-d head
    ("vit-tiny", "encoder.pos_embedding", torch.zeros(1, 0, 32), "pos_embedding"),  # an empty position embedding
    ("vit-tiny", "encoder.pos_embedding", torch.zeros(0), "pos_embedding"),
    (TINY_CLIP, "fc.weight", torch.tensor(1.0), "fc.weight"),
    (TINY_CLIP, "visual.positional_embedding", torch.zeros(0, 32), "positional_embedding"),
])
def test_weight_files_of_impossible_shapes_are_one_line(tmp_path, name, key, value, fragment):
    state = load_backbone(name, "none").model.state_dict()
    if name == "vit-tiny":  # torchvision's keys, as a torchvision file holds them
        vit = VisionTransformer(**TINY_VIT, num_classes=3)
        state = vit.state_dict()
    path = tmp_path / "w.pt"
    torch.save(_broken(state, key, value), path)
    before = path.read_bytes()
    with pytest.raises(LinftError, match=fragment) as info:
        load_backbone(name, str(path))
    assert "\n" not in str(info.value) and "shape" in str(info.value)
    assert path.read_bytes() == before


def test_a_clip_file_loads_without_open_clips_random_init_warning(tmp_path, caplog):
    path = tmp_path / "clip.pt"
    torch.save(load_backbone(TINY_CLIP, "none").model.state_dict(), path)
    caplog.clear()
    with caplog.at_level("WARNING"):
        bb = load_backbone(TINY_CLIP, str(path))
    assert bb.weights == str(path.resolve())
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()], caplog.text

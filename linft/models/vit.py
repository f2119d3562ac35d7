"""torchvision's Vision Transformers as linft backbones: ``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``,
``vit_h_14``.

:class:`ClassTokenViT` is torchvision's ``VisionTransformer`` with its
classifier ``heads.head`` renamed ``fc`` (every other state_dict key is
torchvision's), so every linft stage finds the head where it finds a ResNet's.
Its φ blocks are encoder blocks: the residual stream after block k, through
the final LayerNorm, at the class token — the last one is exactly what ``fc``
reads. Weights: torchvision's enum members (``IMAGENET1K_V1``,
``IMAGENET1K_SWAG_E2E_V1`` at 512 px, ``IMAGENET1K_SWAG_LINEAR_V1``, ...),
each with the evaluation transform it declares; a local state_dict (keys of
torchvision or of linft) at the size its position embedding fixes, with
DomainBed's transform; or ``none``.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torchvision import transforms
from torchvision.models.vision_transformer import VisionTransformer

from linft.data.images import IMAGENET_MEAN, IMAGENET_STD, NORMALIZE
from linft.errors import LinftError
from linft.models.checkpoints import state_dict_sha256
from linft.models.registry import (Backbone, BackboneFamily, file_classes, load_weights, read_backbone_state,
                                   check_new_backbone_name, register_family, seeded, torchvision_state_dict,
                                   weights_file)

#: torchvision's Vision Transformers.
VIT_NAMES = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
#: Small configurations of the same class, registered by :func:`register_vit_config` (tests, demos).
_CONFIGS: dict[str, dict] = {}
#: φ blocks when none are asked for: the last three encoder blocks.
DEFAULT_PHI_BLOCKS = 3


class ClassTokenViT(nn.Module):
    """torchvision's ``VisionTransformer`` with ``fc`` as its classifier: ``fc(LayerNorm(encoder(x))[:, 0])``."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if vit.representation_size is not None:
            raise LinftError("Vision Transformers with a pre-logits layer are not supported; build one without "
                             "representation_size")
        self.image_size, self.patch_size, self.hidden_dim = vit.image_size, vit.patch_size, vit.hidden_dim
        self.class_token, self.conv_proj, self.encoder = vit.class_token, vit.conv_proj, vit.encoder
        self.fc = vit.heads.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = VisionTransformer._process_input(self, x)  # torchvision's own patchify, size checks included
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.fc(self.encoder(x)[:, 0])

    # the φ-block protocol of linft.models.blocks
    default_phi_blocks = DEFAULT_PHI_BLOCKS

    def phi_candidates(self) -> list[str]:
        """Every encoder block, in order."""
        return [f"encoder.layers.{n}" for n, _ in self.encoder.layers.named_children()]

    def pool_block_output(self, output: torch.Tensor) -> torch.Tensor:
        """The residual stream after a block -> the final LayerNorm at the class token (what ``fc`` reads)."""
        return self.encoder.ln(output)[:, 0]

    def residual_branch_ends(self) -> list[nn.Module]:
        """The modules whose outputs are added to the residual stream: attention (its dropout) and MLP, per block."""
        return [m for block in self.encoder.layers for m in (block.dropout, block.mlp)]


def register_vit_config(name: str, **config) -> None:
    """Make ``VisionTransformer(**config)`` (``image_size``, ``patch_size``, ``num_layers``, ...) a backbone
    ``name`` (a new name: :func:`~linft.models.registry.check_new_backbone_name`)."""
    check_new_backbone_name(name)
    _CONFIGS[name] = dict(config)


def from_torchvision_keys(state: dict) -> dict:
    """torchvision's state_dict keys -> linft's (``heads.head.*`` -> ``fc.*``); linft's pass unchanged."""
    if any(k.startswith("heads.pre_logits.") for k in state):
        raise LinftError("the state_dict has a pre-logits layer (heads.pre_logits); linft's Vision Transformers "
                         "have none")
    return {("fc." + k[len("heads.head."):] if k.startswith("heads.head.") else k): v for k, v in state.items()}


def _build(name: str, num_classes: int = 1000, image_size: int | None = None, **kwargs) -> ClassTokenViT:
    if kwargs:
        raise LinftError(f"{name} takes no {', '.join(kwargs)} (an option of ResNets); use a ResNet-family backbone")
    sized = {"image_size": image_size} if image_size else {}
    if name in _CONFIGS:
        return ClassTokenViT(VisionTransformer(num_classes=num_classes, **{**_CONFIGS[name], **sized}))
    return ClassTokenViT(torchvision.models.get_model(name, weights=None, num_classes=num_classes, **sized))


def weights_transform(member) -> transforms.Compose:
    """The evaluation transform a torchvision weight declares, up to the uint8 tensor (its normalisation checked)."""
    preset = member.transforms()
    if tuple(preset.mean) != IMAGENET_MEAN or tuple(preset.std) != IMAGENET_STD:
        raise LinftError(f"weights {member} normalise with mean {preset.mean}, std {preset.std}; linft's Vision "
                         "Transformers take ImageNet's normalisation")
    return transforms.Compose([transforms.Resize(preset.resize_size[0], preset.interpolation, antialias=True),
                               transforms.CenterCrop(preset.crop_size[0]), transforms.PILToTensor()])


def _file_image_size(state: dict, patch_size: int) -> int | None:
    """The image size a state_dict's position embedding fixes ((S/p)² patches and the class token); None without one
    (the strict load then says what the file lacks)."""
    pos = state.get("encoder.pos_embedding")
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or pos.shape[1] < 2:  # the strict load names its shape
        return None
    return math.isqrt(int(pos.shape[1]) - 1) * patch_size


def _patch_size(name: str) -> int:
    return _CONFIGS[name]["patch_size"] if name in _CONFIGS else int(name.rsplit("_", 1)[1])


def _load(name: str, weights: str) -> Backbone:
    members = {} if name in _CONFIGS else dict(torchvision.models.get_model_weights(name).__members__)
    upper = weights.upper()
    transform = None
    if weights.lower() == "none" or (upper == "DEFAULT" and not members):
        model, resolved = seeded(lambda: _build(name)), "none"
    elif upper in members:
        state, member = torchvision_state_dict(name, upper)
        model = _build(name, len(member.meta["categories"]), member.meta["min_size"][0])
        load_weights(model, from_torchvision_keys(state), name, f"{name}/{member.name}")
        resolved, transform = member.name, weights_transform(member)
    else:
        path = weights_file(name, weights, list(members))
        state = from_torchvision_keys(read_backbone_state(path))
        model = _build(name, file_classes(state), _file_image_size(state, _patch_size(name)))
        load_weights(model, state, name, str(path))
        resolved = str(path.resolve())
    return Backbone(model=model, name=name, weights=resolved, weights_sha256=state_dict_sha256(model.state_dict()),
                    transform=transform, normalize=NORMALIZE if transform is not None else None,
                    image_size=int(model.image_size))


register_family(BackboneFamily(owns=lambda name: name in VIT_NAMES or name in _CONFIGS,
                               names=lambda: list(VIT_NAMES) + sorted(_CONFIGS), build=_build, load=_load))

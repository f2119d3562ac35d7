"""Networks: the backbone registry, φ blocks and pooling, heads, checkpoints, weight averages, first-order models.

``registry`` builds backbones by name and loads their weights strictly;
architectures register themselves (importing this package registers
``demo-resnet``, torchvision's Vision Transformers from ``vit`` and OpenCLIP
image towers ``clip:NAME`` from ``clip``). ``blocks`` finds and pools the φ
blocks; ``heads`` holds the classifier heads; ``checkpoints`` the one
checkpoint loader and strict state_dict check; ``averaging`` the weight
averages; ``linearize`` the torch.func first-order model.
"""

from linft.models import clip, demo_resnet, vit  # noqa: F401  (register clip:, demo-resnet, Vision Transformers)
from linft.models.averaging import (RunningAverage, average_state_dicts, check_compatible, greedy_soup,
                                    interpolate_state_dicts)
from linft.models.blocks import (PooledBlockFeatures, add_stochastic_depth, phi_block_names, residual_block_names,
                                 residual_branch_ends)
from linft.models.clip import ClipImageTower, zero_shot_head
from linft.models.checkpoints import (check_state_dict, checkpoint_metadata, load_checkpoint, load_state_dict_strict,
                                      read_state_dict, state_dict_sha256)
from linft.models.demo_resnet import SHIPPED_CHECKPOINT, DemoResNet
from linft.models.heads import (LinearHead, build_classifier, check_dropout_rate, classifier_head, classifier_linear,
                                fit_probe_head, head_keys, with_head)
from linft.models.linearize import LinearizedModel, first_order_path, first_order_terms, relative_linearity_gap
from linft.models.registry import (Backbone, BackboneFamily, backbone_names, build_backbone, load_backbone,
                                   register_backbone, register_family)
from linft.models.vit import ClassTokenViT, register_vit_config

__all__ = [
    "RunningAverage", "average_state_dicts", "check_compatible", "greedy_soup", "interpolate_state_dicts",
    "PooledBlockFeatures", "add_stochastic_depth", "phi_block_names", "residual_block_names", "check_state_dict",
    "checkpoint_metadata", "load_checkpoint", "load_state_dict_strict", "read_state_dict", "state_dict_sha256",
    "SHIPPED_CHECKPOINT", "DemoResNet", "LinearHead", "build_classifier", "check_dropout_rate", "classifier_head",
    "classifier_linear", "fit_probe_head", "head_keys", "with_head", "LinearizedModel", "first_order_path",
    "first_order_terms", "relative_linearity_gap", "Backbone", "backbone_names", "build_backbone", "load_backbone",
    "register_backbone", "BackboneFamily", "register_family", "residual_branch_ends", "ClipImageTower",
    "zero_shot_head", "ClassTokenViT", "register_vit_config",
]

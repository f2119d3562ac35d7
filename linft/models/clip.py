"""OpenCLIP ViT image towers as linft backbones (``clip:ViT-B-32``; ResNet and timm towers are refused), and
CLIP's zero-shot head; needs ``linft[clip]``.

:class:`ClipImageTower` is open_clip's image tower with ``fc`` on its
L2-normalised embedding, ``fc(e / ‖e‖)``: what a CLIP zero-shot head and a
model-soups / wise-ft ``classification_head`` read (their ``normalize=True``).
Its φ blocks are the residual blocks of the tower: the stream after block k
through ``ln_post``, the class token and the projection, then normalised —
the last one is exactly what ``fc`` reads.

Images: open_clip's own resize and crop for the model (``open_clip.image_transform``);
the network takes ImageNet-normalised input like every linft backbone and
re-normalises it to CLIP's mean and std as its first operation (exact up to
float rounding), so every stage feeds it as it feeds a ResNet.

Weights: an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...) from open_clip's
cache (offline, the error names the file); a local file: linft's format
(``visual.*``, ``fc.*``; a fine-tuning head ``fc.1.*`` too), a model-soups / wise-ft
state_dict (``model.visual.*`` or ``image_encoder.model.visual.*``, and
``classification_head.*``; its text-tower entries are set aside; a pickled
wise-ft module must first be exported as ``classifier.state_dict()``, linft
never unpickles modules) or a full open_clip state_dict (``visual.*`` plus the
text tower); or ``none``. OpenAI's weights (the ``openai`` tag, model-soups and
wise-ft state_dicts, see :func:`finetuned_clip_name`) use QuickGELU: the
backbone is then named ``clip:<model>-quickgelu``, open_clip's name for it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

from linft.data.images import IMAGENET_MEAN, IMAGENET_STD
from linft.errors import LinftError
from linft.models.checkpoints import read_state_dict, state_dict_sha256
from linft.models.heads import LinearHead
from linft.models.registry import (Backbone, BackboneFamily, file_classes, load_weights, read_backbone_state,
                                   register_family, seeded, weights_file)

PREFIX = "clip:"
QUICKGELU = "-quickgelu"
DEFAULT_PHI_BLOCKS = 3
#: An ImageNet class folder name (WordNet id).
WNID = re.compile(r"n\d{8}")
#: ImageNet's number of classes: class folders of this many are ImageNet's, prompted with its class names.
IMAGENET_CLASSES = 1000
#: Where the CLIP model sits in a fine-tuned classifier's state_dict: model-soups' ``ModelWrapper`` (``model.``) and
#: wise-ft's ``ImageClassifier`` (``image_encoder.model.``); its head is ``classification_head.*`` in both.
FINETUNED_CLIP_PREFIXES = ("model.", "image_encoder.model.")
#: The entries of a full open_clip state_dict that are not the image tower.
CLIP_TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection",
                      "logit_scale", "logit_bias", "attn_mask")


def open_clip_module():
    """``open_clip``, or one LinftError saying how to install it."""
    try:
        import open_clip
    except ImportError:
        raise LinftError("clip: backbones need open_clip; install linft with its extra: pip install 'linft[clip]'") \
            from None
    return open_clip


class ClipImageTower(nn.Module):
    """open_clip's image tower with ``fc`` on its normalised embedding; input normalised with ImageNet's statistics."""

    default_phi_blocks = DEFAULT_PHI_BLOCKS

    def __init__(self, visual: nn.Module, num_classes: int, mean, std):
        super().__init__()
        self.visual = visual
        self.fc = nn.Linear(visual.output_dim, num_classes)
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        # (x·s_in + m_in − m) / s = x·(s_in/s) + (m_in − m)/s: ImageNet-normalised input -> CLIP-normalised
        self.register_buffer("input_scale", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / std, persistent=False)
        self.register_buffer("input_shift", (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) - mean) / std,
                             persistent=False)
        self.image_size = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list))
                              else visual.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_unit(self.visual(x * self.input_scale + self.input_shift)))

    def phi_candidates(self) -> list[str]:
        """Every residual block of the tower, in order."""
        return [f"visual.transformer.resblocks.{i}" for i in range(len(self.visual.transformer.resblocks))]

    def pool_block_output(self, output: torch.Tensor) -> torch.Tensor:
        """The stream after a block -> ``ln_post``, class token, projection, unit norm (what ``fc`` reads)."""
        pooled, _ = self.visual._pool(output)  # open_clip's own pooling, the code its forward runs
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return _unit(pooled)

    def residual_branch_ends(self) -> list[nn.Module]:
        """Attention and MLP outputs of every block (their layer scales, identities when unused)."""
        return [m for block in self.visual.transformer.resblocks for m in (block.ls_1, block.ls_2)]


def _unit(e: torch.Tensor) -> torch.Tensor:
    return e / e.norm(dim=-1, keepdim=True)  # as model-soups and wise-ft normalise features


def _model_name(name: str) -> str:
    return name[len(PREFIX):]


def _create(model_name: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """open_clip's whole CLIP model ``model_name`` (config name), with a tag's or a file's weights or none."""
    oc = open_clip_module()
    known = oc.list_models()
    if model_name not in known and model_name.endswith(QUICKGELU) and model_name[:-len(QUICKGELU)] in known:
        model_name, kwargs = model_name[:-len(QUICKGELU)], {**kwargs, "force_quick_gelu": True}
    if model_name not in known:
        raise LinftError(f"unknown backbone 'clip:{model_name}'; open_clip has no model '{model_name}' "
                         f"(e.g. {', '.join(m for m in known if m.startswith('ViT-B-32'))})")
    if pretrained is not None:
        return oc.create_model(model_name, pretrained=pretrained, **kwargs)
    quiet = _NotRandomlyInitialised()  # linft loads the weights itself (a file), or records "none"
    logging.getLogger().addFilter(quiet)
    try:
        return oc.create_model(model_name, pretrained=None, **kwargs)
    finally:
        logging.getLogger().removeFilter(quiet)


class _NotRandomlyInitialised(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... Model initialized randomly": said before linft loads a
    weights file into the model, it would mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _tower(clip_model: nn.Module, num_classes: int, name: str) -> ClipImageTower:
    """``clip_model``'s image tower as a linft backbone; a tower that is not open_clip's ``VisionTransformer``
    (``clip:RN50``'s ModifiedResNet, a timm tower) is refused: its φ blocks and pooling are not linft's."""
    oc = open_clip_module()
    if not isinstance(clip_model.visual, oc.transformer.VisionTransformer):
        raise LinftError(f"the image tower of {name} is a {type(clip_model.visual).__name__}; linft supports "
                         "ViT-based CLIP models only (open_clip's VisionTransformer tower: clip:ViT-B-32, "
                         "clip:ViT-B-16, clip:ViT-L-14, ...); pass one of those")
    cfg = oc.get_model_preprocess_cfg(clip_model)
    return ClipImageTower(clip_model.visual, num_classes, cfg["mean"], cfg["std"])


def _build(name: str, num_classes: int = 1000, **kwargs) -> ClipImageTower:
    if kwargs:
        raise LinftError(f"{name} takes no {', '.join(kwargs)} (an option of ResNets); use a ResNet-family backbone")
    return _tower(_create(_model_name(name)), num_classes, name)


def clip_transform(clip_model: nn.Module) -> tuple[transforms.Compose, transforms.Normalize]:
    """open_clip's evaluation preprocessing of ``clip_model`` (a CLIP or anything with its ``visual``) as linft
    runs it: its resize and crop up to the uint8
    tensor, and its normalisation (which :class:`ClipImageTower` applies inside)."""
    oc = open_clip_module()
    cfg = oc.get_model_preprocess_cfg(clip_model)
    full = oc.image_transform(cfg["size"], is_train=False, mean=cfg.get("mean"), std=cfg.get("std"),
                              resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"))
    steps = [t for t in full.transforms if isinstance(t, (transforms.Resize, transforms.CenterCrop))]
    normalize = next(t for t in full.transforms if isinstance(t, transforms.Normalize))
    return transforms.Compose(steps + [transforms.PILToTensor()]), normalize


def _tag_weights(model_name: str, tag: str):
    """The whole CLIP model with open_clip's weights ``tag`` (QuickGELU when the tag says so) and its backbone name."""
    oc = open_clip_module()
    cfg = oc.get_pretrained_cfg(model_name, tag)
    quick = bool(cfg.get("quick_gelu")) and not model_name.endswith(QUICKGELU)
    try:
        model = oc.create_model(model_name, pretrained=tag, force_quick_gelu=quick)
    except (RuntimeError, OSError):
        raise LinftError(f"weights clip:{model_name}/{tag} are not available (no download: {_where(cfg)}); run "
                         f"open_clip.create_model('{model_name}', pretrained='{tag}') once on a connected machine and "
                         "copy that cache here, or pass weights=PATH, a local copy of the file",
                         param="weights") from None
    return model, PREFIX + model_name + (QUICKGELU if quick else "")


def _where(cfg: dict) -> str:
    """Where open_clip reads a tag's file from: the Hugging Face cache, else its download folder."""
    if cfg.get("hf_hub"):
        from huggingface_hub import constants  # comes with open_clip (the clip extra)
        repo, filename = os.path.split(cfg["hf_hub"])
        return (f"open_clip reads {filename or 'open_clip_pytorch_model.bin'} of the Hugging Face repo {repo} from "
                f"{constants.HF_HUB_CACHE}")
    return f"open_clip reads {os.path.basename(cfg.get('url', ''))} from {Path('~/.cache/clip').expanduser()}"


def image_tower_state(state: dict) -> tuple[dict, bool]:
    """linft's keys of a weights file (``visual.*``, ``fc.*``) and whether it is a model-soups / wise-ft state_dict.

    A model-soups / wise-ft state_dict holds ``classification_head.*`` and the CLIP model under ``model.``
    (model-soups' ``ModelWrapper``) or ``image_encoder.model.`` (wise-ft's ``ImageClassifier``; a pickled wise-ft
    module must first be exported as ``classifier.state_dict()``: linft never unpickles modules). Text-tower
    entries are set aside by name; anything else is kept for the strict check to name."""
    prefix = next((p for p in FINETUNED_CLIP_PREFIXES if any(k.startswith(p + "visual.") for k in state)), None)
    if "classification_head.weight" in state and prefix is not None:
        out = {}
        for k, v in state.items():
            if k.startswith("classification_head."):
                out["fc." + k[len("classification_head."):]] = v
            elif not k.startswith(prefix):
                out[k] = v
            elif not k[len(prefix):].startswith(CLIP_TEXT_PREFIXES):
                out[k[len(prefix):]] = v
        return out, True
    return {k: v for k, v in state.items() if not k.startswith(CLIP_TEXT_PREFIXES)}, False


def finetuned_clip_name(name: str) -> str:
    """The backbone a model-soups / wise-ft state_dict loaded as ``name`` is built as.

    model-soups and wise-ft fine-tune OpenAI's CLIP (``clip.load``, QuickGELU). So for a model of which open_clip
    has OpenAI weights using QuickGELU (``clip:ViT-B-32``, ``clip:ViT-L-14``, ...) the plain name becomes
    ``clip:<model>-quickgelu``, as with the ``openai`` tag, and is recorded so; a ``-quickgelu`` name stays. Any
    other model (no OpenAI weights: not what those codebases fine-tune) is built as named, with the activation its
    name says. A file of these keys fine-tuned from other weights of an OpenAI model (an open_clip fork of wise-ft
    on LAION's ViT-B-32, GELU) cannot be told apart by its keys: save it in linft's keys (``visual.*``, ``fc.*``)
    to load it as named.
    """
    model_name = _model_name(name)
    openai = open_clip_module().get_pretrained_cfg(model_name, "openai")
    return name if model_name.endswith(QUICKGELU) or not openai.get("quick_gelu") else name + QUICKGELU


def _load(name: str, weights: str) -> Backbone:
    oc, model_name = open_clip_module(), _model_name(name)
    tags = list(oc.list_pretrained_tags_by_model(model_name))
    if weights.lower() == "none" or (weights.upper() == "DEFAULT" and not tags):
        model, resolved = seeded(lambda: _tower(_create(model_name), 1000, name)), "none"
    elif weights in tags or weights.upper() == "DEFAULT":
        resolved = weights if weights in tags else tags[0]
        clip_model, name = _tag_weights(model_name, resolved)
        model = seeded(lambda: _tower(clip_model, 1000, name))  # the head is a placeholder (fc), seeded
    else:
        path = weights_file(name, weights, tags)
        state, finetuned = image_tower_state(read_backbone_state(path))
        if finetuned:
            name = finetuned_clip_name(name)
            model_name = _model_name(name)
        model = seeded(lambda: _tower(_create(model_name), file_classes(state), name))
        if "fc.weight" not in state:  # a CLIP without a head: keep the placeholder head
            state = {**state, "fc.weight": model.fc.weight.detach(), "fc.bias": model.fc.bias.detach()}
        load_weights(model, state, name, str(path))
        resolved = str(path.resolve())
    transform, normalize = clip_transform(model)
    return Backbone(model=model, name=name, weights=resolved, weights_sha256=state_dict_sha256(model.state_dict()),
                    transform=transform, normalize=normalize, image_size=model.image_size)


def prompt_names(classes: list[str]) -> list[str]:
    """The names a zero-shot head prompts with for class folders ``classes``: open_clip's ``IMAGENET_CLASSNAMES``
    for ImageNet's 1000 (sorted wnid folders are ImageNet's class order), else the folder names (``_`` -> space).

    1000 folders that are not all wnids (ImageNetV2's ``0`` … ``999``, sorted as strings) are refused: the names
    would be matched to them in the wrong order."""
    if len(classes) == IMAGENET_CLASSES:
        others = [c for c in classes if not WNID.fullmatch(c)]
        if others:
            raise LinftError(f"{len(others)} of the 1000 class folders are not ImageNet wnids (e.g. '{others[0]}'); "
                             "the zero-shot head names ImageNet's classes in wnid order: rename the folders to their "
                             "wnids (n01440764, ...)")
        return list(open_clip_module().IMAGENET_CLASSNAMES)
    return [c.replace("_", " ") for c in classes]


def zero_shot_head(name: str, weights: str, class_names: list[str], templates=None,
                   device: str | torch.device = "cpu") -> LinearHead:
    """CLIP's zero-shot classifier for ``class_names`` through open_clip's tokenizer and text tower.

    ``weights``: the tag or full open_clip state_dict the text tower comes from; ``templates``: default
    open_clip's ``OPENAI_IMAGENET_TEMPLATES``. Rows are the normalised mean text embedding per class times
    the model's logit scale (100 for OpenAI's); bias 0 — what model-soups starts its heads from.
    """
    if not name.startswith(PREFIX):
        raise LinftError(f"a zero-shot head needs a CLIP backbone (clip:NAME), not {name}; use a probe head")
    oc, model_name = open_clip_module(), _model_name(name)
    templates = list(oc.OPENAI_IMAGENET_TEMPLATES if templates is None else templates)
    if weights in oc.list_pretrained_tags_by_model(model_name.removesuffix(QUICKGELU)):
        clip_model, _ = _tag_weights(model_name.removesuffix(QUICKGELU), weights)
    else:
        path = weights_file(name, weights, [])
        state = read_state_dict(path)
        if not any(k.startswith("transformer.") for k in state):
            raise LinftError(f"{path} holds no CLIP text tower (transformer.*); a zero-shot head needs the whole "
                             f"CLIP model: pass its open_clip tag or state_dict")
        clip_model = _create(model_name)
        load_weights(clip_model, {k: v for k, v in state.items() if k != "attn_mask"}, name, str(path))
    clip_model = clip_model.to(device).eval()
    tokenizer = oc.get_tokenizer(model_name)
    weight = oc.build_zero_shot_classifier(clip_model, tokenizer, class_names, templates, device=device)
    scale = clip_model.logit_scale.exp().detach().float().cpu()
    w = (weight.T.float().cpu() * scale).contiguous()
    return LinearHead(w, torch.zeros(len(class_names)))


register_family(BackboneFamily(owns=lambda name: name.startswith(PREFIX), names=lambda: [PREFIX + "<open_clip model>"],
                               build=_build, load=_load))

"""The two ends of an interpolation: a fine-tuned run's selected model, and the pretrained network it started from.

:func:`load_endpoints` loads the fine-tuned checkpoint (a run folder of
``linft finetune`` or its ``selected.pt``), rebuilds the pretrained network
with the run's head architecture, and checks both against each other and
against the dataset, each mismatch in one line.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from linft.data.folders import MultiDomainDataset
from linft.errors import LinftError
from linft.models.averaging import check_compatible
from linft.models.blocks import phi_block_names
from linft.models.checkpoints import state_dict_sha256
from linft.models.heads import build_classifier, head_keys
from linft.models.registry import load_backbone
from linft.train.finetune.selected import load_selected, selected_file


@dataclass
class Endpoints:
    """The networks at both ends, before the probe head is fitted.

    ``network`` is the architecture (the pretrained backbone with the run's
    head ``Dropout → Linear(D, C)``, on the CPU, eval mode);
    ``pretrained_state`` is its state_dict (the head's weights are a
    placeholder until :func:`with_head` puts the probe head in);
    ``finetuned_state`` the fine-tuned run's; ``metadata`` the run's
    (the format of :mod:`linft.train.finetune.selected`).
    """

    network: nn.Module
    pretrained_state: dict
    finetuned_state: dict
    metadata: dict
    backbone: str
    pretrained_weights: str
    pretrained_sha256: str
    block_names: list[str]
    finetuned_id: str
    checkpoint: Path


_NEEDED_METADATA = ("backbone", "test_domain", "seed")


def _check_dataset(meta: dict, num_classes: int, dataset: MultiDomainDataset) -> None:
    """The run's classes, domains and held-out domain must be the dataset's (a different file list only warns)."""
    classes = list(dataset.classes)
    run_classes = meta.get("class_names")
    if (run_classes is not None and list(run_classes) != classes) or num_classes != len(classes):
        shown = list(run_classes) if run_classes is not None else f"{num_classes} classes"
        raise LinftError(f"the fine-tuned model was trained on classes {shown} but {dataset.root} has {classes}; "
                         "interpolate on the dataset the run was fine-tuned on")
    run_domains = meta.get("domain_names")
    if run_domains is not None and list(run_domains) != list(dataset.domains):
        raise LinftError(f"the fine-tuned run's domains are {list(run_domains)} but {dataset.root} has "
                         f"{list(dataset.domains)}; interpolate on the dataset the run was fine-tuned on")
    if meta["test_domain"] not in dataset.domains:
        raise LinftError(f"the run's held-out domain '{meta['test_domain']}' is not in {dataset.root} "
                         f"({', '.join(dataset.domains)}); interpolate on the dataset the run was fine-tuned on")
    source = str(meta.get("source") or "")
    if source and source.split(":")[0] != dataset.file_list_sha256[:16]:
        warnings.warn(f"{dataset.root} does not hold the same files as the dataset the run was fine-tuned on; "
                      "its accuracies may not be comparable with the run's records")


def load_endpoints(finetuned: str | os.PathLike, dataset=None, pretrained: str | None = None,
                   backbone: str | None = None) -> Endpoints:
    """Load the fine-tuned checkpoint and build the pretrained network it started from.

    ``finetuned``: a run folder of ``linft finetune`` or a ``selected.pt``.
    ``pretrained``: the weights of θ_p (torchvision enum name, file or
    ``none``); default: the weights the run started from (its metadata).
    ``backbone`` overrides the metadata's. With ``dataset`` (a
    :class:`~linft.data.folders.MultiDomainDataset`) its classes and domains are
    checked against the run's. Every mismatch is a one-line :class:`LinftError`.
    """
    state, meta = load_selected(finetuned)
    checkpoint = selected_file(finetuned)
    if backbone:
        meta["backbone"] = backbone
    missing = [k for k in _NEEDED_METADATA if meta.get(k) is None]
    if missing:
        raise LinftError(f"{checkpoint} has no {', '.join(missing)} in its metadata; pass a run folder of "
                         "`linft finetune` or its selected.pt")
    wk, _ = head_keys(state)
    num_classes = int(state[wk].shape[0])
    if meta.get("num_classes") is not None and int(meta["num_classes"]) != num_classes:
        raise LinftError(f"{checkpoint} says {meta['num_classes']} classes but its head has {num_classes}; "
                         "the checkpoint is damaged, use another")
    if dataset is not None:
        _check_dataset(meta, num_classes, dataset)

    weights = pretrained if pretrained is not None else meta.get("weights")
    if weights is None:
        raise LinftError(f"{checkpoint} does not say which pretrained weights the run started from; "
                         "pass pretrained=WEIGHTS", param="pretrained")
    if str(weights).lower() == "none" and pretrained is None:
        warnings.warn("the run started from random weights ('none'): the pretrained end is a random network")
    bb = load_backbone(meta["backbone"], weights)
    dropout = float((meta.get("hparams") or {}).get("dropout") or 0.0)
    net = build_classifier(bb.model, num_classes, dropout if 0.0 <= dropout < 1.0 else 0.0)
    net.eval()
    blocks = phi_block_names(net)
    pre_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:
        check_compatible([pre_state, state])
    except LinftError as exc:
        what = str(exc).split(";")[0]
        raise LinftError(f"the fine-tuned checkpoint does not fit the pretrained {meta['backbone']} ({what}); "
                         "interpolate checkpoints of the same architecture and class set") from None
    fid = str(meta.get("run_id") or state_dict_sha256(state)[:16])
    return Endpoints(network=net, pretrained_state=pre_state, finetuned_state=dict(state), metadata=meta,
                     backbone=meta["backbone"], pretrained_weights=bb.weights, pretrained_sha256=bb.weights_sha256,
                     block_names=blocks, finetuned_id=fid, checkpoint=checkpoint)

"""LP-FT (Kumar et al. 2022): fine-tuning whose head starts from the linear-probe solution.

An LP-FT run (``FineTuneRun(lp_ft=True)``) is a fine-tuning run whose head
``Dropout(λ) → Linear(D, C)`` starts, instead of from its seeded random
initialisation, from :func:`linft.models.heads.fit_probe_head` (full-batch
L2-regularised logistic regression by L-BFGS: deterministic, no learning rate)
fitted on the pretrained backbone's penultimate representation φ_l (the pooled
output of the last residual block, what the classifier reads) of the rows the
run trains on: the "in" splits of its training domains for its seed and
held-out domain, with the evaluation transform. Everything else (schedule,
dropout, one learning rate for every parameter, head included) is the
fine-tuning protocol's. It is the probe of the interpolation's pretrained end
(:mod:`linft.interpolation.run`) for the same run, with the same L2 strength.

Where φ_l comes from (``FineTuneConfig.lp_ft_cache``):

* a feature cache of ``linft extract`` of the same files, weights and image
  size: its last block as stored (float16 by default), no forward pass;
* ``None``: the run's own backbone, one forward pass (eval mode, autocast to
  ``config.precision`` on CUDA) over the evaluation images.

The two agree to the cache's storage precision only, so the source (the
cache's ``provenance_sha256`` or ``"backbone"``) and the probe's settings are
part of an LP-FT run's identity (:func:`lp_ft_identity`). Unreadable images a
cache recorded (``valid`` False) are left out of the fit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linft.cache.format import cache_attrs, check_cache, open_h5, read_paths, refuse_nonfinite
from linft.data.folders import MultiDomainDataset
from linft.data.images import EvalImages, describe_transform, eval_transform, model_input
from linft.errors import LinftError
from linft.models.blocks import PooledBlockFeatures, phi_block_names
from linft.models.heads import PROBE_L2, PROBE_MAX_ITER, PROBE_TOLERANCE, LinearHead, fit_probe_head
from linft.runtime import autocast
from linft.train.finetune.model import FineTuneConfig

#: ``lp_ft_identity(...)["features"]`` when φ_l is computed by the run's backbone.
BACKBONE_FEATURES = "backbone"


def _complete_cache_attrs(path: str | os.PathLike) -> dict:
    """The attributes of a complete feature cache at ``path`` (a missing, foreign or unfinished file is refused)."""
    path = Path(path)
    with open_h5(path) as f:
        meta = cache_attrs(f, path)
        check_cache(f, meta, path)
        if not meta.get("complete"):
            raise LinftError(f"{path} is an unfinished extraction; finish it with its `linft extract` command "
                             f"before using it for LP-FT")
        refuse_nonfinite(path, [f["features"]], len(f["features"]))  # before anything is trained
    return meta


def lp_ft_identity(config: FineTuneConfig) -> dict:
    """What an LP-FT run's starting head depends on beyond the run: the source of φ_l and the probe's settings."""
    source = BACKBONE_FEATURES if config.lp_ft_cache is None \
        else _complete_cache_attrs(config.lp_ft_cache)["provenance_sha256"]
    return {"features": source, "probe_l2": PROBE_L2, "probe_max_iter": PROBE_MAX_ITER,
            "probe_tolerance": PROBE_TOLERANCE}


def _cached_features(path: str | os.PathLike, ds: MultiDomainDataset, rows: np.ndarray, weights_sha256: str,
                     image_size: int, block: str) -> tuple[torch.Tensor, np.ndarray]:
    """φ_l of ``rows`` from the cache at ``path`` (float32) and the rows it holds valid features of.

    The cache must hold the dataset's files in its order, features of the run's weights at its image size, and
    ``block`` as its last block; anything else is one LinftError saying what differs.
    """
    path = Path(path)
    meta = _complete_cache_attrs(path)
    checks = [(meta["weights_sha256"] == weights_sha256, "features of other weights than the run's backbone"),
              (int(meta["image_size"]) == image_size, f"{meta['image_size']} px images, the run {image_size} px"),
              (meta["transform"] == describe_transform(eval_transform(image_size)),  # a transformer weight's own
               f"images transformed as {meta['transform']}, the run's with DomainBed's transform"),
              (meta["blocks"][-1] == block, f"last block {meta['blocks'][-1]}, the run's classifier reads {block}"),
              (meta["file_list_sha256"] == ds.file_list_sha256, f"another file list than {ds.root}")]
    wrong = [what for ok, what in checks if not ok]
    if wrong:
        raise LinftError(f"{path} does not fit this LP-FT run ({'; '.join(wrong)}); extract the dataset with the "
                         f"run's backbone, weights and image size, or leave the cache out")
    with open_h5(path) as f:
        if read_paths(f) != list(ds.paths):
            raise LinftError(f"{path} holds the dataset's files in another order; re-extract it")
        last = f["features"][:, len(meta["blocks"]) - 1, :]  # one hyperslab read: (N, D)
        valid = f["valid"][...]
    return torch.from_numpy(last[rows].astype(np.float32)), valid[rows]


@torch.no_grad()
def _backbone_features(model: nn.Module, images: EvalImages, rows: np.ndarray, block: str,
                       config: FineTuneConfig) -> torch.Tensor:
    """φ_l of ``rows`` computed by ``model`` in eval mode (one pass over ``images``); module modes are restored."""
    dev = next(model.parameters()).device
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    extractor = PooledBlockFeatures(model, [block])
    out = []
    try:
        for batch in images:
            with autocast(dev, config.precision):
                out.append(extractor(model_input(batch, dev, config.channels_last))[:, 0].cpu())
    finally:
        extractor.remove()
        for m, training in modes:
            m.training = training
    return torch.cat(out)[torch.from_numpy(rows)]


def probe_features(ds: MultiDomainDataset, rows: np.ndarray, model: nn.Module, weights_sha256: str,
                   config: FineTuneConfig, images: EvalImages) -> tuple[torch.Tensor, np.ndarray]:
    """The pretrained φ_l (float32, on the CPU) of ``rows`` that an LP-FT probe is fitted on, and which rows count.

    ``model`` is the run's network before its first step (the pretrained backbone; its head is not used),
    ``weights_sha256`` the pretrained weights' hash (:attr:`linft.models.registry.Backbone.weights_sha256`).
    φ_l comes from ``config.lp_ft_cache`` or, when None, from ``model`` over ``images`` (every row counts then).
    """
    rows = np.asarray(rows, dtype=np.int64)
    block = phi_block_names(model)[-1]
    if config.lp_ft_cache is None:
        return _backbone_features(model, images, rows, block, config), np.ones(len(rows), dtype=bool)
    return _cached_features(config.lp_ft_cache, ds, rows, weights_sha256, config.image_size, block)


def lp_ft_head(ds: MultiDomainDataset, rows: np.ndarray, model: nn.Module, weights_sha256: str,
               config: FineTuneConfig, images: EvalImages) -> LinearHead:
    """The starting head of an LP-FT run: :func:`fit_probe_head` on :func:`probe_features` of the run's training
    ``rows`` (in increasing order) and their labels, on the model's device (the head is returned there)."""
    features, keep = probe_features(ds, rows, model, weights_sha256, config, images)
    if not keep.any():
        raise LinftError("no training image with valid features for the LP-FT probe; check the dataset")
    dev = next(model.parameters()).device
    return fit_probe_head(features[torch.from_numpy(keep)].to(dev), ds.labels[np.asarray(rows)][keep],
                          len(ds.classes))

"""The interpolation paths between a pretrained and a fine-tuned model, as pure functions and passes over images.

α is the share of the **fine-tuned** end: α = 0 is the pretrained model,
α = 1 the fine-tuned one (the paper's appendix writes α for the pretrained
share).

- **weights** (:func:`iter_weight_path`): θ(α) = (1-α)θ_p + αθ_f over every
  state_dict entry (:func:`linft.models.averaging.interpolate_state_dicts`);
  one forward pass per α.
- **representation** (:func:`representation_logits`, the paper's appendix A.1):
  ((1-α)W_p + αW_f)((1-α)Φ_p + αΦ_f) + (1-α)b_p + αb_f. Bilinear in α, not an
  output ensemble; Φ_p and Φ_f come from one pass per model
  (:func:`pooled_features_and_logits`).
- **linearized** (:func:`first_order_outputs`): f(θ_0) + α·J(θ_f − θ_0), one jvp
  for every α.

Exactness: at α = 0 and α = 1 the weight path loads the end state_dicts
themselves, the representation path multiplies by exactly 1 and 0, and the
linearized path at α = 0 is the jvp's primal, so each path reproduces its
endpoint models up to the order of float operations inside a matrix product
of a different shape (a different code path: compare to a tolerance).

Memory: Φ_p and Φ_f of every evaluation image and every φ block are kept in
float32 on the CPU: N·K·D·4 bytes per model (PACS with ResNet-50: 0.25 GB;
DomainNet: 14 GB).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linft.data.images import model_input
from linft.errors import LinftError
from linft.models.averaging import interpolate_state_dicts
from linft.models.blocks import PooledBlockFeatures
from linft.models.heads import LinearHead
from linft.models.linearize import first_order_terms
from linft.protocol.selection import predicted_classes
from linft.runtime import autocast

#: The default α sweep: 11 points from 0 (pretrained) to 1 (fine-tuned).
DEFAULT_ALPHAS = "0:1:11"

# --------------------------------------------------------------------------- α


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """α values as sorted unique floats in [0, 1]; :class:`LinftError` otherwise."""
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise LinftError(f"α values must be numbers, got {alphas!r}; use e.g. 0:1:11 or 0,0.5,1",
                         param="alphas") from None
    if not values:
        raise LinftError("no α given; use e.g. 0:1:11 (11 evenly spaced values) or 0,0.5,1", param="alphas")
    bad = [a for a in values if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise LinftError(f"α {bad[0]:g} is outside [0, 1] (α is the share of the fine-tuned model: 0 = pretrained, "
                         f"1 = fine-tuned); use values in [0, 1], e.g. 0:1:11", param="alphas")
    return sorted(set(values))


def parse_alphas(text: str | Sequence[float]) -> list[float]:
    """``"0:1:11"`` (START:STOP:COUNT, evenly spaced, both ends included) or ``"0,0.25,1"`` -> sorted α list.

    Values are rounded to 12 decimals (0.30000000000000004 -> 0.3) and must lie in [0, 1].
    """
    if not isinstance(text, str):
        return check_alphas(text)
    s = text.strip()
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise LinftError(f"α range {text!r} has COUNT {count}; "
                                 "use START:STOP:COUNT with COUNT >= 1, e.g. 0:1:11", param="alphas")
            values = np.linspace(start, stop, count).tolist() if count > 1 else [start]
        else:
            values = [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise LinftError(f"cannot read α {text!r}; use START:STOP:COUNT (e.g. 0:1:11) "
                         "or a comma list (e.g. 0,0.5,1)", param="alphas") from None
    return check_alphas([round(v, 12) + 0.0 for v in values])


# --------------------------------------------------------------------------- the representation path


def _mix(alpha: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    return (1.0 - alpha) * start + alpha * end


def representation_logits(alpha: float, phi_p: torch.Tensor, phi_f: torch.Tensor,
                          head_p: LinearHead, head_f: LinearHead) -> torch.Tensor:
    """Representation interpolation (paper appendix A.1, α = share of the fine-tuned end).

    ``((1-α)W_p + αW_f)((1-α)Φ_p + αΦ_f) + (1-α)b_p + αb_f`` for features
    ``phi_p``, ``phi_f`` (N, D) of the same images and heads (W (C, D), b (C,)).
    Bilinear in α. At α = 0 and 1 the mixing multiplies by exactly 1 and 0,
    so the result is ``head_p(phi_p)`` resp. ``head_f(phi_f)``.
    """
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 <= a <= 1.0):
        raise LinftError(f"α {alpha!r} is outside [0, 1] (0 = pretrained, 1 = fine-tuned)", param="alpha")
    if phi_p.shape != phi_f.shape:
        raise LinftError(f"representations of different shapes {tuple(phi_p.shape)} and {tuple(phi_f.shape)}: "
                         "compute both on the same images with the same architecture")
    if head_p.weight.shape != head_f.weight.shape:
        raise LinftError(f"heads of different shapes {tuple(head_p.weight.shape)} and {tuple(head_f.weight.shape)}: "
                         "interpolate only models with the same class set")
    return F.linear(_mix(a, phi_p, phi_f), _mix(a, head_p.weight, head_f.weight), _mix(a, head_p.bias, head_f.bias))


@torch.no_grad()
def representation_path_predictions(alphas: Sequence[float], phi_p: torch.Tensor, phi_f: torch.Tensor,
                                    head_p: LinearHead, head_f: LinearHead, device="cpu",
                                    chunk: int = 256) -> torch.Tensor:
    """Predicted classes (A, N) of :func:`representation_logits` for every α, in row chunks on ``device`` (-1 for a
    row of non-finite logits, :func:`~linft.protocol.selection.predicted_classes`)."""
    dev = torch.device(device)
    hp, hf = head_p.to(dev), head_f.to(dev)
    out = torch.empty(len(alphas), len(phi_p), dtype=torch.long)
    for a0 in range(0, len(phi_p), chunk):
        xp, xf = phi_p[a0:a0 + chunk].to(dev), phi_f[a0:a0 + chunk].to(dev)
        for i, a in enumerate(alphas):
            out[i, a0:a0 + chunk] = predicted_classes(representation_logits(a, xp, xf, hp, hf)).cpu()
    return out


# --------------------------------------------------------------------------- passes over the images


@torch.no_grad()
def pooled_features_and_logits(model: nn.Module, block_names: Sequence[str], images, device="cpu",
                               channels_last: bool = False, precision: str = "float32",
                               update: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` (eval mode) over uint8 batches ``images``.

    Returns ``(Φ, logits)``: Φ (N, K, D) the average-pooled outputs of the
    blocks ``block_names`` (:class:`linft.backbones.PooledBlockFeatures`) and
    the model's own logits (N, C), both float32 on the CPU.
    """
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    logits: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: logits.append(o.float().cpu()))
    extractor = PooledBlockFeatures(model, list(block_names))
    phis = []
    try:
        for batch in images:
            with autocast(dev, precision):
                phis.append(extractor(model_input(batch, dev, channels_last)).cpu())
            if update:
                update(len(batch))
    finally:
        extractor.remove()
        handle.remove()
        model.train(was_training)
    if not phis:
        raise LinftError("no evaluation images; the dataset is empty")
    return torch.cat(phis), torch.cat(logits)


@torch.no_grad()
def iter_weight_path(model: nn.Module, start_state: Mapping[str, torch.Tensor], end_state: Mapping[str, torch.Tensor],
                     alphas: Sequence[float], images, device="cpu", channels_last: bool = False,
                     precision: str = "float32", update: Callable[[int], None] | None = None
                     ) -> Iterator[tuple[float, torch.Tensor]]:
    """``(α, logits (N, C))`` of the weight-interpolated model θ(α) = (1-α)·start + α·end, one α at a time.

    Every state_dict entry is interpolated by
    :func:`linft.averaging.interpolate_state_dicts` (α = 0 and 1 load the end
    state_dicts exactly) and loaded strictly into ``model``; one forward pass
    (eval mode) over ``images`` per α. ``model``'s own weights are
    overwritten.
    """
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for a in check_alphas(alphas) if len(alphas) else []:
            model.load_state_dict(interpolate_state_dicts(start_state, end_state, a), strict=True)
            out = []
            for batch in images:
                with autocast(dev, precision):
                    out.append(model(model_input(batch, dev, channels_last)).float().cpu())
                if update:
                    update(len(batch))
            yield a, torch.cat(out)
    finally:
        model.train(was_training)


def first_order_outputs(model: nn.Module, theta0_state: Mapping[str, torch.Tensor],
                        thetaf_state: Mapping[str, torch.Tensor], images, device="cpu", channels_last: bool = False,
                        update: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ0), J(θ0)(θf − θ0))`` over every image, (N, C) each, float32 on the CPU.

    One :func:`linft.linearize.first_order_terms` jvp per batch of images
    (eval mode, BatchNorm statistics of θ0); the first-order weight path is
    then ``f(θ0) + α·J(θf − θ0)`` for every α at no further cost.
    """
    dev = torch.device(device)
    s0 = {k: v.to(dev) for k, v in theta0_state.items()}
    sf = {k: v.to(dev) for k, v in thetaf_state.items()}
    f0s, jvps = [], []
    for batch in images:
        with warnings.catch_warnings():  # torch's first jvp scripts its decompositions and warns about torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            f0, jv = first_order_terms(model, s0, sf, model_input(batch, dev, channels_last))
        f0s.append(f0.float().cpu())
        jvps.append(jv.float().cpu())
        if update:
            update(len(batch))
    return torch.cat(f0s), torch.cat(jvps)

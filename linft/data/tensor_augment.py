"""DomainBed's training augmentation as batched tensor operations on the device (``FineTuneConfig.augment="tensor"``).

The family of :func:`linft.data.images.train_augmentation`, on a whole batch at
once: ``RandomResizedCrop(S, scale=(0.7, 1), ratio=(3/4, 4/3))``,
``RandomHorizontalFlip(0.5)``, ``ColorJitter(0.3, 0.3, 0.3, 0.3)`` (its four
operations in a random order per image) and ``RandomGrayscale(0.1)``, with the
same parameter distributions as torchvision's. It is not bit-identical to the
PIL pipeline, and differs from it on purpose in these ways:

* it starts from the evaluation transform's ``S x S`` image (decoded once, or
  held in memory), not from the original file, so a crop holds at most ``S``
  pixels of detail; the crop box is whole pixels of that image, as torchvision's;
* the crop is resized by bilinear sampling (``grid_sample``, pixel centres as
  ``align_corners=False``, the box's edge pixels repeated beyond it); a crop is
  never larger than ``S``, so this is an upsampling and needs no antialiasing;
* pixels stay float through every step and are rounded to uint8 once at the
  end (PIL rounds after each step); contrast blends with the float mean of
  the grayscale image, hue is shifted in float HSV.

Randomness: the parameters of image ``k`` are a function of ``seeds[k]`` alone
(a CPU ``torch.Generator`` seeded with it draws :data:`UNIFORMS` numbers), so
they are the same on any device, in any batch composition and on any resume;
a batch is augmented bit for bit the same on a resume on the same device.
Every operation whose amount or probability is 0 is skipped, as torchvision
skips it, so :data:`IDENTITY` returns its input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

#: Candidate crops drawn per image before falling back to the whole image (torchvision's 10 attempts).
CROP_ATTEMPTS = 10
#: Uniform numbers drawn per image: crop areas and ratios, crop position, flip, 4 jitter factors, order, grayscale.
UNIFORMS = 2 * CROP_ATTEMPTS + 2 + 1 + 4 + 4 + 1
#: ITU-R 601-2 luma, as ``rgb_to_grayscale`` and PIL's ``convert("L")``.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class TensorAugment:
    """Amounts and probabilities of the tensor augmentation (the defaults are DomainBed's)."""

    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.3
    grayscale: float = 0.1


DOMAINBED = TensorAugment()
IDENTITY = TensorAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, brightness=0.0, contrast=0.0,
                         saturation=0.0, hue=0.0, grayscale=0.0)


def draw_uniforms(seeds: Sequence[int]) -> torch.Tensor:
    """(B, :data:`UNIFORMS`) float64 numbers in [0, 1): row ``k`` from a generator seeded with ``seeds[k]``."""
    out = torch.empty(len(seeds), UNIFORMS, dtype=torch.float64)
    g = torch.Generator()
    for k, seed in enumerate(seeds):
        g.manual_seed(int(seed))
        torch.rand(UNIFORMS, generator=g, dtype=torch.float64, out=out[k])
    return out


def augment_params(u: torch.Tensor, size: int, spec: TensorAugment = DOMAINBED) -> dict[str, torch.Tensor]:
    """Per-image parameters from the uniforms ``u`` (:func:`draw_uniforms`) of ``size`` x ``size`` images.

    ``top, left, height, width`` (int64): the crop box, torchvision's rule
    (area uniform in ``scale``, log-ratio uniform in ``ratio``, the first of
    :data:`CROP_ATTEMPTS` candidates that fits, else the whole image), its
    position uniform over the positions where it fits; ``flip``, ``gray``
    (bool); ``factors`` (B, 4): brightness, contrast, saturation factors
    uniform in ``[max(0, 1 - a), 1 + a]`` and the hue shift uniform in
    ``[-a, a]``; ``order`` (B, 4): a uniformly random permutation of the jitter operations.
    """
    n = CROP_ATTEMPTS
    area = size * size * (spec.scale[0] + u[:, :n] * (spec.scale[1] - spec.scale[0]))
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    ratio = torch.exp(log_lo + u[:, n:2 * n] * (log_hi - log_lo))
    w, h = torch.sqrt(area * ratio).round().long(), torch.sqrt(area / ratio).round().long()
    fits = (w >= 1) & (w <= size) & (h >= 1) & (h <= size)
    first = fits.long().argmax(1, keepdim=True)  # the first candidate that fits (0 when none does)
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], size)
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], size)
    top = (u[:, 2 * n] * (size - h + 1)).floor().long()
    left = (u[:, 2 * n + 1] * (size - w + 1)).floor().long()
    k = 2 * n + 2
    amounts = torch.tensor([spec.brightness, spec.contrast, spec.saturation, spec.hue], dtype=torch.float64)
    low = torch.cat([(1 - amounts[:3]).clamp(min=0), -amounts[3:]])
    high = torch.cat([1 + amounts[:3], amounts[3:]])
    factors = low + u[:, k + 1:k + 5] * (high - low)
    return {"top": top, "left": left, "height": h, "width": w, "flip": u[:, k] < spec.flip,
            "factors": factors, "order": u[:, k + 5:k + 9].argsort(1), "gray": u[:, k + 9] < spec.grayscale}


def crop_resize_flip(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Each image's crop box resized back to the full size, mirrored where ``p["flip"]``.

    Bilinear with pixel centres as ``align_corners=False`` and the box's edge
    pixels repeated beyond it: what ``resized_crop(..., antialias=False)`` does
    on the cropped tensor, for every image at once.
    """
    b, _, s, _ = x.shape
    top, left, h, w = (p[k].double() for k in ("top", "left", "height", "width"))
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = (1.0 - 2.0 * p["flip"].double()) * w / s
    theta[:, 0, 2] = (2 * left + w) / s - 1
    theta[:, 1, 1] = h / s
    theta[:, 1, 2] = (2 * top + h) / s - 1
    grid = F.affine_grid(theta, [b, 3, s, s], align_corners=False)
    low = torch.stack([2 * left + 1, 2 * top + 1], 1) / s - 1  # centres of the box's first and last pixels
    high = torch.stack([2 * (left + w) - 1, 2 * (top + h) - 1], 1) / s - 1
    grid = torch.maximum(torch.minimum(grid, high.view(b, 1, 1, 2)), low.view(b, 1, 1, 2))
    return F.grid_sample(x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of float RGB images."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, hue + ``shift`` (turns, per image) modulo 1, -> RGB; floats in [0, 1]."""
    v, _ = x.max(1, keepdim=True)
    c = v - x.min(1, keepdim=True)[0]
    r, g, b = x.unbind(1)
    safe = torch.where(c > 0, c, torch.ones_like(c))[:, 0]
    v0 = v[:, 0]
    h = torch.where(v0 == r, (g - b) / safe, torch.where(v0 == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(c[:, 0] > 0, h, torch.zeros_like(h))
    h6 = torch.remainder(h + 6 * shift.view(-1, 1, 1), 6).unsqueeze(1)  # hue in sixths of a turn
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) + h6, 6)
    return v - c * torch.minimum(k, 4 - k).clamp(0, 1)


def _jitter(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    fv = f.view(-1, 1, 1, 1)
    if op == 0:
        return (x * fv).clamp(0, 1)
    if op == 1:
        return (fv * x + (1 - fv) * grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
    if op == 2:
        return (fv * x + (1 - fv) * grayscale(x)).clamp(0, 1)
    return shift_hue(x, f)


def color_jitter(x: torch.Tensor, p: dict, spec: TensorAugment = DOMAINBED) -> torch.Tensor:
    """The four jitter operations, in each image's order; an operation with amount 0 is skipped.

    Works on one copy of ``x`` updated in place (the input is left as it was)."""
    active = [a > 0 for a in (spec.brightness, spec.contrast, spec.saturation, spec.hue)]
    if not any(active):
        return x
    x = x.clone()
    factors = p["factors"].to(x.device, x.dtype)
    for position in range(4):
        for op in range(4):
            rows = (p["order"][:, position] == op).nonzero()[:, 0]  # on the CPU: no device sync
            if active[op] and len(rows):
                rows = rows.to(x.device)
                x.index_copy_(0, rows, _jitter(x.index_select(0, rows), op, factors[rows, op]))
    return x


def augment_batch(images: torch.Tensor, seeds: Sequence[int], spec: TensorAugment = DOMAINBED) -> torch.Tensor:
    """The tensor augmentation of uint8 images (B, 3, S, S), on their device; returns uint8 (B, 3, S, S).

    Image ``k`` is augmented with the parameters of ``seeds[k]`` (see the module's note on randomness).
    """
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected square RGB images (B, 3, S, S), got {tuple(images.shape)}")
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    p = augment_params(draw_uniforms(seeds), images.shape[-1], spec)
    x = crop_resize_flip(images.float().div_(255), p)
    x = color_jitter(x, p, spec)
    if spec.grayscale > 0:
        x = torch.where(p["gray"].to(x.device).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)

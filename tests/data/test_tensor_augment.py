"""linft.data.tensor_augment: each component against its definition (torchvision's functional ops as the
reference), parameter distributions, determinism per seed, and identity when every amount is zero."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from linft.data.tensor_augment import IDENTITY, TensorAugment, augment_batch, augment_params, draw_uniforms

SIZE = 32


def images(n=24, size=SIZE, seed=0) -> torch.Tensor:
    """Random uint8 images with smooth parts (so that crops and resizes change them) and noisy parts."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=(size, size), mode="bilinear")
    noise = torch.rand(n, 3, size, size, generator=g)
    x = torch.where(torch.arange(size).view(1, 1, 1, -1) < size // 2, smooth, noise)
    return (x * 255).round().to(torch.uint8)


def reference(image: torch.Tensor, p: dict, k: int) -> torch.Tensor:
    """Image ``k`` augmented one operation at a time with torchvision's functional ops on floats, rounded once."""
    x = image.float() / 255
    x = TF.resized_crop(x, int(p["top"][k]), int(p["left"][k]), int(p["height"][k]), int(p["width"][k]),
                        [image.shape[-1]] * 2, antialias=False)
    if p["flip"][k]:
        x = TF.hflip(x)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in p["order"][k].tolist():
        x = ops[op](x, float(p["factors"][k, op]))
    if p["gray"][k]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def test_every_image_matches_torchvisions_functional_ops_with_its_parameters():
    candidates = augment_params(draw_uniforms(range(400)), SIZE)["gray"]
    seeds = np.flatnonzero(candidates.numpy())[:8].tolist() + np.flatnonzero(~candidates.numpy())[:16].tolist()
    x = images()
    out = augment_batch(x, seeds)
    p = augment_params(draw_uniforms(seeds), SIZE)
    assert p["gray"].sum() == 8 and p["flip"].any() and not p["flip"].all()  # every branch runs
    for k in range(len(x)):
        # Two code paths in float32 (batched grid_sample and HSV formulas vs per-image torchvision ops), rounded
        # to uint8 once: a pixel can land on the other side of a .5 boundary, hence 1 level.
        diff = (out[k].int() - reference(x[k], p, k).int()).abs()
        assert diff.max() <= 1, k


def test_same_seeds_same_images_other_seeds_other_images():
    x, seeds = images(), list(range(24))
    a = augment_batch(x, seeds)
    assert torch.equal(a, augment_batch(x, seeds))
    assert not torch.equal(a, augment_batch(x, [s + 1000 for s in seeds]))
    assert a.dtype == torch.uint8 and a.shape == x.shape


def test_zero_amounts_and_probabilities_are_the_identity():
    x = images()
    # grid_sample at the pixel centres computes each pixel as 1 x itself (+ float error < 1e-3 level): rounding
    # the float result recovers the integer exactly
    assert torch.equal(augment_batch(x, list(range(24)), IDENTITY), x)


def test_crop_boxes_follow_random_resized_crop():
    size, n = 64, 4000
    p = augment_params(draw_uniforms(range(n)), size)
    top, left, h, w = (p[k].numpy() for k in ("top", "left", "height", "width"))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
    # w, h = round(sqrt(area * ratio)), round(sqrt(area / ratio)): rounding moves each side by at most 1/2
    area = h * w / size**2
    slack = (h + w) / (2 * size**2) + 0.25 / size**2
    assert (area >= 0.7 - slack).all() and (area <= 1.0).all()
    ratio = w / h
    assert (ratio >= 3 / 4 * (1 - 1 / h) - 1e-9).all() and (ratio <= 4 / 3 * (1 + 1 / h) + 1e-9).all()
    assert area.min() < 0.71 and area.max() > 0.98  # the whole range is used
    # positions are uniform over where the box fits: the mean of top / (size - h) is 1/2 (SE about 0.005 here)
    free = size - h
    assert abs(np.mean(top[free > 0] / free[free > 0]) - 0.5) < 0.03


def test_flip_grayscale_and_jitter_draws_follow_their_definitions():
    n = 4000
    p = augment_params(draw_uniforms(range(n)), SIZE)
    # Bernoulli(p) frequencies over 4000 fixed seeds, within 5 standard errors
    assert abs(p["flip"].float().mean() - 0.5) < 5 * (0.25 / n) ** 0.5
    assert abs(p["gray"].float().mean() - 0.1) < 5 * (0.09 / n) ** 0.5
    f = p["factors"].numpy()
    assert (f[:, :3] >= 0.7).all() and (f[:, :3] <= 1.3).all() and (np.abs(f[:, 3]) <= 0.3).all()
    assert (f.min(0) < [0.71, 0.71, 0.71, -0.29]).all() and (f.max(0) > [1.29, 1.29, 1.29, 0.29]).all()
    order = p["order"].numpy()
    assert (np.sort(order, 1) == np.arange(4)).all()  # every row is a permutation
    first = np.bincount(order[:, 0], minlength=4) / n
    assert (np.abs(first - 0.25) < 5 * (0.1875 / n) ** 0.5).all()


def test_grayscale_images_have_equal_channels():
    x, seeds = images(), list(range(24))
    out = augment_batch(x, seeds, TensorAugment(grayscale=1.0))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    candidates = augment_params(draw_uniforms(range(400)), SIZE)["gray"].numpy()
    seeds = np.flatnonzero(candidates)[:4].tolist() + np.flatnonzero(~candidates)[:20].tolist()
    gray = augment_params(draw_uniforms(seeds), SIZE)["gray"]
    default = augment_batch(x, seeds)
    assert gray.sum() == 4
    assert torch.equal(default[gray, 0], default[gray, 1]) and torch.equal(default[gray, 1], default[gray, 2])


def test_flip_alone_mirrors_and_brightness_alone_scales():
    x, seeds = images(), list(range(24))
    assert torch.equal(augment_batch(x, seeds, replace(IDENTITY, flip=1.0)), x.flip(-1))
    out = augment_batch(x, seeds, replace(IDENTITY, brightness=0.3))
    b = augment_params(draw_uniforms(seeds), SIZE, replace(IDENTITY, brightness=0.3))["factors"][:, 0]
    expected = (x.double() * b.view(-1, 1, 1, 1)).clamp(0, 255)
    assert (out.double() - expected).abs().max() <= 0.5 + 1e-3  # rounded once (float32 arithmetic: 1e-3)


def test_bad_shapes_and_seed_counts_are_refused():
    with pytest.raises(ValueError, match="square RGB"):
        augment_batch(torch.zeros(2, 3, 8, 9, dtype=torch.uint8), [0, 1])
    with pytest.raises(ValueError, match="seeds"):
        augment_batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0])

"""A procedural domain-shift benchmark written as real image files in the DomainBed layout.

Every image shows one shape (the class) drawn in one rendering style (the
domain), the way PACS differs by style:

* ``photo``    shaded, lit object over a textured background;
* ``sketch``   a grey pencil outline on paper, no fill;
* ``cartoon``  flat saturated fill with a thick black outline on a plain colour;
* ``painting`` blurred colour with brush-stroke blobs and strong noise.

Position, size, rotation, colours and lighting vary per image. Each image is
drawn from its own generator seeded by ``(seed, domain, class, index)``, so
the same seed gives the same files whatever the order or parallelism. Nothing
here is tuned to favour any fine-tuning method; the styles are simply distinct.

The same generator, broader (16 shapes x 5 styles) and drawn from another
``seed_tag``, writes the pretraining source of the shipped ``demo-resnet``
(:func:`write_pretraining_source`).
"""

from __future__ import annotations

import json
import os
import shlex
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

import linft
from linft.errors import LinftError
from linft.locks import output_lock
from linft.output import PARTIAL_SUFFIX, atomic_write_text, partial_path, remove_path, writable_folder, write_failure

DEMO_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent")
DEMO_STYLES = ("photo", "sketch", "cartoon", "painting")


# --------------------------------------------------------------------------- shapes
# Each shape is an implicit function f(u, v) in object coordinates (object radius ~1):
# inside where f < 0. Outlines are drawn where |f| is small.


def _shape_field(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if shape == "circle":
        return r - 0.85
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.7
    if shape == "triangle":
        normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        return np.max([nx * u + ny * v for nx, ny in normals], axis=0) - 0.45
    if shape == "star":
        return r - (0.55 + 0.35 * np.cos(5 * theta))
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(u) - 0.28, np.abs(v) - 0.9), np.maximum(np.abs(u) - 0.9, np.abs(v) - 0.28))
    if shape == "ring":
        return np.abs(r - 0.65) - 0.22
    if shape == "crescent":
        return np.maximum(r - 0.9, 0.72 - np.hypot(u - 0.45, v))
    if shape == "heart":
        return (u**2 + (1.2 * v - np.sqrt(np.abs(u)) * 0.7) ** 2) - 0.55
    if shape == "diamond":
        return np.abs(u) * 0.8 + np.abs(v) * 1.2 - 0.85
    if shape == "hexagon":
        return np.max([np.abs(np.cos(a) * u + np.sin(a) * v) for a in (0, np.pi / 3, 2 * np.pi / 3)], axis=0) - 0.7
    if shape == "arrow":
        head = np.maximum(np.abs(v) * 1.0 + u - 0.9, -u - 0.05)
        shaft = np.maximum(np.abs(v) - 0.2, np.abs(u + 0.45) - 0.45)
        return np.minimum(head, shaft)
    if shape == "plus_ring":
        return np.minimum(np.abs(r - 0.75) - 0.12, np.minimum(np.maximum(np.abs(u) - 0.12, r - 0.75),
                                                              np.maximum(np.abs(v) - 0.12, r - 0.75)))
    if shape == "bar":
        return np.maximum(np.abs(u) - 0.9, np.abs(v) - 0.25)
    if shape == "dots":
        return np.min([np.hypot(u - cx, v - cy) - 0.3 for cx, cy in ((-0.5, -0.4), (0.5, -0.4), (0, 0.5))], axis=0)
    if shape == "moon_pair":
        return np.minimum(np.hypot(u + 0.45, v) - 0.4, np.hypot(u - 0.45, v) - 0.4)
    if shape == "spiral":
        return np.abs(np.sin(3 * theta + 6 * r)) * 0.5 + np.maximum(r - 0.9, 0) - 0.2
    raise LinftError(f"unknown shape '{shape}'")


def _grid(size: int, rng: np.random.Generator, *, min_scale=0.45, max_scale=0.75):
    """Object coordinates for a random similarity transform of the image plane."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    x = (xs + 0.5) / size * 2 - 1
    y = (ys + 0.5) / size * 2 - 1
    scale = rng.uniform(min_scale, max_scale)
    cx, cy = rng.uniform(-1 + scale, 1 - scale, size=2)
    a = rng.uniform(0, 2 * np.pi)
    dx, dy = (x - cx) / scale, (y - cy) / scale
    u = np.cos(a) * dx + np.sin(a) * dy
    v = -np.sin(a) * dx + np.cos(a) * dy
    return u, v, x, y, 1.0 / (scale * size / 2)  # last: object units per pixel


def _smooth_noise(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a random cells x cells grid upsampled bilinearly."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _random_color(rng, saturation=(0.5, 1.0), value=(0.5, 1.0)) -> np.ndarray:
    h = rng.random()
    s = rng.uniform(*saturation)
    v = rng.uniform(*value)
    k = (np.array([5, 3, 1]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        img = (img + np.roll(img, 1, 0) + np.roll(img, -1, 0) + np.roll(img, 1, 1) + np.roll(img, -1, 1)) / 5
    return img


def _painting(size: int, rng: np.random.Generator, soft: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The ``painting`` style: blurred colour, brush-stroke blobs and strong noise."""
    base = _random_color(rng, (0.3, 0.8), (0.4, 0.9))
    bg = base * (0.6 + 0.8 * _smooth_noise(size, rng, 6)[..., None])
    fg = _random_color(rng, (0.5, 1.0), (0.6, 1.0)) * (0.7 + 0.6 * _smooth_noise(size, rng, 8)[..., None])
    img = bg * (1 - soft) + fg * soft
    for _ in range(int(rng.integers(6, 12))):  # brush-stroke blobs
        bx, by = rng.uniform(-1, 1, size=2)
        blob = np.exp(-(((x - bx) / rng.uniform(0.1, 0.3)) ** 2 + ((y - by) / rng.uniform(0.05, 0.15)) ** 2))
        img = img * (1 - 0.5 * blob[..., None]) + 0.5 * blob[..., None] * _random_color(rng)
    return _blur(img, 2) + rng.normal(0, 0.08, img.shape).astype(np.float32)


def render(shape: str, style: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One ``size`` x ``size`` RGB uint8 image of ``shape`` drawn in ``style``."""
    u, v, x, y, px = _grid(size, rng)
    f = _shape_field(shape, u, v)
    inside = (f < 0).astype(np.float32)
    soft = np.clip(0.5 - f / (2 * px), 0, 1)[..., None]  # anti-aliased coverage
    if style == "photo":
        bg = _smooth_noise(size, rng, 4)[..., None] * _random_color(rng, (0.1, 0.4), (0.4, 0.9))
        bg = bg + 0.15 * _smooth_noise(size, rng, 16)[..., None]
        light = rng.uniform(-1, 1, size=2)
        shade = np.clip(0.65 + 0.35 * (light[0] * u + light[1] * v) / 1.2, 0.2, 1.0)[..., None]
        texture = 0.85 + 0.3 * _smooth_noise(size, rng, 12)[..., None]
        fg = _random_color(rng) * shade * texture
        shadow = np.clip(0.5 - _shape_field(shape, u - 0.15, v - 0.15) / (2 * px), 0, 1)[..., None]
        img = bg * (1 - 0.4 * shadow)
        img = img * (1 - soft) + fg * soft
    elif style == "sketch":
        paper = 0.92 + 0.06 * _smooth_noise(size, rng, 8)[..., None]
        width = rng.uniform(0.7, 1.6) * px
        jitter = 0.6 * px * (_smooth_noise(size, rng, 10) - 0.5)
        line = np.clip(1 - np.abs(f + jitter) / width, 0, 1)[..., None]
        ink = rng.uniform(0.05, 0.35)
        hatch = ((np.sin((x + y) * size * 0.9) > 0.6).astype(np.float32)[..., None] * inside[..., None]
                 * rng.uniform(0, 0.25))
        img = paper * (1 - line) + ink * line
        img = img * (1 - hatch) + ink * hatch
        img = np.repeat(img.mean(-1, keepdims=True), 3, -1)
    elif style == "cartoon":
        bg = _random_color(rng, (0.2, 0.6), (0.7, 1.0))
        fg = _random_color(rng, (0.8, 1.0), (0.8, 1.0))
        outline = np.clip(1 - np.abs(f) / rng.uniform(2.0, 3.5) / px, 0, 1)[..., None] > 0.3
        img = np.where(soft > 0.5, fg, bg)
        img = np.where(outline, 0.0, img)
    elif style == "painting":
        img = _painting(size, rng, soft, x, y)
    elif style == "mosaic":  # extra styles for the pretraining source
        cells = int(rng.integers(6, 12))
        grid = _smooth_noise(size, rng, cells)
        fg, bg = _random_color(rng), _random_color(rng)
        q = np.floor(grid * 4)[..., None] / 4
        img = (bg * (1 - soft) + fg * soft) * (0.7 + 0.6 * q)
    elif style == "neon":
        glow = np.exp(-np.abs(f) / (3 * px))[..., None]
        img = 0.05 + glow * _random_color(rng, (0.8, 1.0), (0.9, 1.0))
    elif style == "silhouette":
        bg = np.linspace(0.3, 1.0, size, dtype=np.float32)[:, None, None] * _random_color(rng, (0.3, 0.8), (0.7, 1.0))
        img = bg * (1 - soft)
    elif style == "halftone":
        period = rng.uniform(3, 5)
        dots = ((np.sin(x * size * np.pi / period) * np.sin(y * size * np.pi / period))
                > 0.0).astype(np.float32)[..., None]
        ink = _random_color(rng, (0.6, 1.0), (0.3, 0.8))
        img = 1.0 - soft * dots * (1 - ink)
    else:
        raise LinftError(f"unknown style '{style}'")
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _write_one_folder(args) -> int:
    out, seed, style_index, style, class_index, shape, count, size, seed_tag = args
    folder = Path(out) / style / shape
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = np.random.default_rng([seed_tag, seed, style_index, class_index, i])
        Image.fromarray(render(shape, style, rng, size)).save(folder / f"{i:05d}.png", optimize=False)
    return count


def write_shapes_dataset(
    out: str | os.PathLike,
    *,
    classes=DEMO_CLASSES,
    styles=DEMO_STYLES,
    per_class: int = 150,
    size: int = 64,
    seed: int = 0,
    seed_tag: int = 0,
    workers: int | None = None,
) -> Path:
    """Write ``out/<style>/<shape>/<index>.png`` for every style and shape; returns ``out``.

    ``seed_tag`` separates families of images that use the same seed (the demo
    benchmark uses 0, the pretraining source 1), so they never share an image.
    """
    if size > 64 or size < 16:
        raise LinftError(f"size {size} is out of range; use 16 to 64 pixels", param="size")
    if per_class < 1:
        raise LinftError(f"per_class {per_class} writes no image; use at least 1 image per domain and class",
                         param="per_class")
    if seed < 0:
        raise LinftError(f"seed {seed} is negative; use a seed >= 0", param="seed")
    out = Path(out)
    jobs = [(str(out), seed, si, st, ci, sh, per_class, size, seed_tag)
            for si, st in enumerate(styles) for ci, sh in enumerate(classes)]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_one_folder, jobs))
    else:
        for job in jobs:
            _write_one_folder(job)
    return out


def write_new_folder(out: str | os.PathLike, write: Callable[[Path], None], force: bool = False,
                     refusal: str = "pass force=True to replace it whole (then re-extract its caches with force=True)"
                     ) -> Path:
    """Make the folder ``out`` with ``write(folder)``: a folder with files in it is refused unless ``force``.

    The files are written into ``<out>.partial`` and the folder takes its name only once complete; with ``force``
    the old folder is then replaced whole (never merged: no image or domain of the old folder is left). A run
    that stops half-way leaves ``out`` as it was (the old folder is moved back if the new one cannot take its
    place). ``refusal`` is the caller's way out of the refusal. Two commands on one ``out`` exclude each other
    (:func:`linft.locks.output_lock` on ``out``).
    """
    out = Path(out).expanduser()

    def refuse_filled() -> None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
            raise LinftError(f"{out} exists and is not empty; choose a new folder, or {refusal}", param="force")
    refuse_filled()
    with output_lock(out):  # creates the parent folder
        refuse_filled()  # under the lock: a folder another process filled meanwhile is not replaced
        staging = partial_path(out)
        old = out.with_name(f"{out.name}.old{PARTIAL_SUFFIX}")
        remove_path(staging)
        writable_folder(staging)
        try:
            write(staging)
            if out.exists():
                remove_path(old)
                os.replace(out, old)
                try:
                    os.replace(staging, out)
                except OSError:
                    os.replace(old, out)  # put the old folder back
                    raise
                remove_path(old)
            else:
                os.replace(staging, out)
        except OSError as exc:
            raise LinftError(f"cannot write {out} ({write_failure(exc)}); free space or choose another folder "
                             f"(an existing {out.name} is unchanged)") from None
        finally:
            remove_path(staging)
    return out


def write_demo_data(out: str | os.PathLike, seed: int = 0, per_class: int = 150, size: int = 64,
                    force: bool = False) -> Path:
    """The demo benchmark: 4 style domains x 7 shape classes, ``per_class`` images each (1,050 per domain).

    ``out`` must be new or empty unless ``force`` (:func:`write_new_folder`).
    """
    return write_new_folder(out, lambda folder: write_shapes_dataset(
        folder, classes=DEMO_CLASSES, styles=DEMO_STYLES, per_class=per_class, size=size, seed=seed, seed_tag=0),
        force)


# --------------------------------------------------------------------------- the pretraining source of demo-resnet

#: Every shape and style the procedural generator knows (the demo uses 7 shapes x 4 styles).
SOURCE_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent",
                 "heart", "diamond", "hexagon", "arrow", "plus_ring", "bar", "dots", "moon_pair", "spiral")
#: The source's styles: ``photo`` (what ImageNet mostly holds) and four styles the demo never uses. The demo's
#: ``sketch``, ``cartoon`` and ``painting`` are left out on purpose, as PACS's art, cartoons and sketches are
#: rare in ImageNet: with them in the source, the pretrained features already solved every held-out domain
#: of the demo (measured: 94-100% o.o.d. accuracy for every method), which left nothing to study.
SOURCE_STYLES = ("photo", "mosaic", "neon", "silhouette", "halftone")
#: ``seed_tag`` of the pretraining source (the demo benchmark uses 0): no image is shared.
SOURCE_SEED_TAG = 1
#: The file :func:`write_pretraining_source` leaves beside the domain folders (how it was made).
SOURCE_MANIFEST = "linft_source.json"


def write_pretraining_source(out: str | os.PathLike, seed: int = 0, per_class: int = 528, size: int = 64,
                             workers: int | None = None) -> Path:
    """Write the pretraining source: 5 style domains x 16 shape classes, ``per_class`` PNGs each.

    With the default 528 that is 42,240 images at 64 px, 10x the demo
    benchmark, with 9 more shapes and 4 styles the demo does not have (the
    only shared style is ``photo``: see :data:`SOURCE_STYLES`); images are drawn with
    ``seed_tag`` :data:`SOURCE_SEED_TAG`, so none is a demo image. A small
    ``linft_source.json`` beside the domain folders records how the folder was
    made; :func:`linft.train.pretrain.pretrain` copies it into the checkpoint's command.
    """
    if per_class < 1:
        raise LinftError(f"per_class must be at least 1, got {per_class}", param="per_class")
    out = Path(out).expanduser()
    command = f"linft pretrain-source {shlex.quote(os.fspath(out))} --seed {seed} --per-class {per_class}"
    if size != 64:
        command += f" --size {size}"
    manifest = {
        "command": command, "seed": seed, "per_class": per_class, "size": size, "seed_tag": SOURCE_SEED_TAG,
        "classes": list(SOURCE_SHAPES), "domains": list(SOURCE_STYLES),
        "num_images": per_class * len(SOURCE_SHAPES) * len(SOURCE_STYLES), "linft_version": linft.__version__,
    }

    def write(folder: Path) -> None:
        write_shapes_dataset(folder, classes=SOURCE_SHAPES, styles=SOURCE_STYLES, per_class=per_class, size=size,
                             seed=seed, seed_tag=SOURCE_SEED_TAG, workers=workers)
        atomic_write_text(folder / SOURCE_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return write_new_folder(out, write, refusal="delete it first")


def source_command(root: Path) -> str | None:
    """The command that wrote the pretraining source at ``root`` (from its manifest), or None."""
    try:
        manifest = json.loads((root / SOURCE_MANIFEST).read_text())
        return str(manifest["command"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

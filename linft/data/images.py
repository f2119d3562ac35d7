"""The one image pipeline: decoding, the evaluation transform, the training augmentation, one Dataset, preloading.

* :func:`eval_transform` — DomainBed's evaluation transform up to the tensor:
  ``Resize((S, S))`` (PIL, bilinear, antialiased) and ``PILToTensor`` (uint8).
* :func:`train_augmentation` — DomainBed's training augmentation up to the
  tensor: ``RandomResizedCrop(S, scale=(0.7, 1))``, horizontal flip,
  ``ColorJitter(0.3, 0.3, 0.3, 0.3)``, ``RandomGrayscale``, per image with PIL
  (its batched tensor version, on the device after :func:`eval_transform`, is
  :func:`linft.data.tensor_augment.augment_batch`).
* :data:`NORMALIZE` — ImageNet normalisation, applied on the device to the
  uint8 batch (:func:`normalize_uint8`, :func:`model_input`), so that workers
  ship 4x fewer bytes.
* :func:`describe_transform` — the text stored in caches and records, made
  from the transform objects that run (it cannot drift from what they do).
* :class:`ImageFiles` — the one ``Dataset``: an item is a row (evaluation
  transform) or ``(row, seed)`` (augmentation seeded by ``seed``); it returns
  ``(image, views, row, ok, error)`` and never raises on a bad image, so the
  main process can name the file (a DataLoader worker cannot).
* :func:`image_loader`, :func:`decoded_batches`, :func:`preload_images` and
  :class:`EvalImages` — batches in a given order, decoded in DataLoader
  workers, optionally held in memory.

Randomness: an augmented image is drawn with torch's RNG seeded by
``seed_hash(seed, j)`` for view ``j`` inside :func:`torch.random.fork_rng`, so
it is the same in any worker, on any resume, and the caller's RNG is untouched.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from linft.data.folders import MultiDomainDataset
from linft.data.splits import seed_hash
from linft.errors import LinftError, worker_died
from linft.output import progress_bar

#: ImageNet normalisation used by DomainBed's transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)

#: Datasets larger than this (decoded, uint8) are decoded again at each pass instead of held in memory.
PRELOAD_LIMIT_BYTES = 2 << 30


def check_workers(workers: int | None) -> None:
    """The one check of a count of decoding processes: None (one per spare core) or 0 or more."""
    if workers is not None and workers < 0:
        raise LinftError(f"workers must be >= 0, got {workers}", param="workers")


def default_workers(workers: int | None = None) -> int:
    """DataLoader processes that decode images: ``workers`` when given, else one per spare core (at most 8)."""
    if workers is not None:
        check_workers(workers)
        return workers
    return min(8, max(1, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------------- transforms


def eval_transform(image_size: int) -> transforms.Compose:
    """DomainBed's evaluation transform before normalisation: PIL image -> uint8 (3, S, S)."""
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])


def train_augmentation(image_size: int) -> transforms.Compose:
    """DomainBed's training augmentation before normalisation: PIL image -> uint8 (3, S, S)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3, 0.3), transforms.RandomGrayscale(), transforms.PILToTensor(),
    ])


def _jitter_amount(value, centre: float) -> str:
    """ColorJitter's stored range as the amount it was given (symmetric about ``centre``), else the range."""
    if value is None:
        return "0"
    low, high = value
    amount = (high - low) / 2
    if abs((low + high) / 2 - centre) < 1e-9 and (centre == 0 or abs(low - max(0.0, centre - amount)) < 1e-9):
        return f"{amount:g}"
    return f"({low:g}, {high:g})"


def _describe_one(t, brief_normalize: bool = False) -> str:
    if isinstance(t, transforms.Resize):
        size = tuple(t.size) if isinstance(t.size, (list, tuple)) else t.size
        return f"Resize({size}) [PIL {t.interpolation.value}]"
    if isinstance(t, transforms.RandomResizedCrop):
        size = t.size[0] if t.size[0] == t.size[1] else tuple(t.size)
        extra = "" if tuple(t.ratio) == (3 / 4, 4 / 3) else f", ratio={tuple(t.ratio)}"
        mode = "" if t.interpolation == transforms.InterpolationMode.BILINEAR else f" [PIL {t.interpolation.value}]"
        return f"RandomResizedCrop({size}, scale={tuple(t.scale)}{extra}){mode}"
    if isinstance(t, transforms.RandomHorizontalFlip):
        return "RandomHorizontalFlip" if t.p == 0.5 else f"RandomHorizontalFlip(p={t.p:g})"
    if isinstance(t, transforms.ColorJitter):
        return "ColorJitter({})".format(", ".join(_jitter_amount(v, c) for v, c in (
            (t.brightness, 1.0), (t.contrast, 1.0), (t.saturation, 1.0), (t.hue, 0.0))))
    if isinstance(t, transforms.RandomGrayscale):
        return "RandomGrayscale" if t.p == 0.1 else f"RandomGrayscale(p={t.p:g})"
    if isinstance(t, transforms.CenterCrop):
        size = t.size[0] if t.size[0] == t.size[1] else tuple(t.size)
        return f"CenterCrop({size})"
    if isinstance(t, (transforms.PILToTensor, transforms.ToTensor)):
        return "ToTensor"
    if isinstance(t, transforms.Normalize):
        if brief_normalize and tuple(t.mean) == IMAGENET_MEAN and tuple(t.std) == IMAGENET_STD:
            return "Normalize(ImageNet)"
        return f"Normalize(mean={list(t.mean)}, std={list(t.std)})"
    return repr(t).replace("\n", " ")


def describe_transform(transform: transforms.Compose, normalize: transforms.Normalize = NORMALIZE,
                       brief_normalize: bool = False) -> str:
    """The stored description of ``transform`` followed by ``normalize``, made from the objects themselves.

    ``describe_transform(eval_transform(224))`` is
    ``Resize((224, 224)) [PIL bilinear], ToTensor, Normalize(mean=[...], std=[...])``, the text
    caches have always stored; ``brief_normalize`` writes ImageNet's normalisation as
    ``Normalize(ImageNet)``, as caches have always stored it after the augmentation of
    their views. Every parameter that differs from its default is written; transforms
    without a short form are written as their ``repr``.
    """
    steps = list(getattr(transform, "transforms", [transform])) + [normalize]
    return ", ".join(_describe_one(t, brief_normalize) for t in steps)


def describe_views_transform(image_size: int, normalize: transforms.Normalize = NORMALIZE) -> str:
    """The stored description of the augmented views of a cache (:func:`train_augmentation`, then normalisation)."""
    return describe_transform(train_augmentation(image_size), normalize, brief_normalize=True)


def normalize_uint8(batch: torch.Tensor, normalize: transforms.Normalize = NORMALIZE) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32, scaled to [0, 1] and normalised (= ToTensor + Normalize)."""
    mean = torch.tensor(normalize.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(normalize.std, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().div_(255.0)).sub_(mean).div_(std)


def model_input(batch: torch.Tensor, dev: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 images -> the normalised float batch on ``dev`` (channels_last when asked)."""
    x = normalize_uint8(batch.to(dev, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------- decoding


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path``, decoded and converted to RGB (the file is closed again)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def load_image_uint8(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """One image through :func:`eval_transform`: uint8 (3, S, S), RGB."""
    return eval_transform(image_size)(open_rgb(path))


def augment_views(img: Image.Image, image_size: int, num_views: int, seed: int) -> torch.Tensor:
    """``num_views`` draws of :func:`train_augmentation` of one RGB image, uint8 (V, 3, S, S).

    View ``j`` is drawn with torch's RNG seeded by ``seed_hash(seed, j)`` (the
    caller passes a per-image seed), so it is the same in any worker and on
    any resume; the caller's RNG state is restored.
    """
    if num_views == 0:
        return torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
    augment, out = train_augmentation(image_size), []
    with torch.random.fork_rng(devices=[]):
        for j in range(num_views):
            torch.manual_seed(seed_hash(seed, j))
            out.append(augment(img))
    return torch.stack(out)


def augmented_views_uint8(path: str | os.PathLike, image_size: int, num_views: int, seed: int) -> torch.Tensor:
    """:func:`augment_views` of the image at ``path``."""
    return augment_views(open_rgb(path), image_size, num_views, seed)


class ImageFiles(torch.utils.data.Dataset):
    """The images of a dataset, decoded in DataLoader workers; a bad image comes back flagged, never raised.

    An item is a row ``i`` (the evaluation transform) or ``(i, seed)``: the
    training augmentation seeded by ``seed`` (``seed=None``: the evaluation
    transform). With ``views`` > 0 every item also carries that many augmented
    views, seeded per row by ``views_seed``. Returns ``(image uint8 (3, S, S),
    views uint8 (V, 3, S, S), i, ok, error)``; ``error`` is "" when ``ok``.
    ``transform`` replaces the evaluation transform (a backbone's own, giving S x S images).
    """

    def __init__(self, ds: MultiDomainDataset, image_size: int, views: int = 0, views_seed: int = 0,
                 transform: transforms.Compose | None = None):
        self.root, self.paths, self.size = ds.root, ds.paths, image_size
        self.views, self.views_seed = views, views_seed
        self.transform = eval_transform(image_size) if transform is None else transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        i, seed = item if isinstance(item, tuple) else (item, None)
        path = self.root / self.paths[i]
        try:
            img = open_rgb(path)  # decoded once for the image and all its views
            image = self.transform(img) if seed is None else augment_views(img, self.size, 1, seed)[0]
            views = augment_views(img, self.size, self.views, seed_hash("views", self.views_seed, i))
            return image, views, i, True, ""
        except Exception as exc:  # any decoder failure is reported by path, in the main process
            zeros = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            return zeros, zeros.expand(self.views, -1, -1, -1).clone(), i, False, f"{type(exc).__name__}: {exc}"


class WorkerGuard:
    """A DataLoader whose dead worker (killed by a signal, out of memory) ends the loop with one LinftError."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as exc:
                error = worker_died(exc)
                if error is None:
                    raise
                raise error from None
            yield batch


def image_loader(ds: MultiDomainDataset, image_size: int, items: Sequence | None = None, *, batch_size: int = 256,
                 batches: Iterator | None = None, workers: int | None = None, views: int = 0, views_seed: int = 0,
                 pin_memory: bool = False, transform: transforms.Compose | None = None) -> WorkerGuard:
    """A DataLoader over :class:`ImageFiles` (in a :class:`WorkerGuard`): ``items`` in that order in batches of
    ``batch_size``, or the batches of a batch sampler ``batches`` (lists of items). It never touches the global
    RNG."""
    workers = default_workers(workers)
    files = ImageFiles(ds, image_size, views, views_seed, transform)
    common = dict(num_workers=workers, pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                  generator=torch.Generator().manual_seed(0))
    if batches is not None:
        return WorkerGuard(torch.utils.data.DataLoader(files, batch_sampler=batches, **common))
    items = list(range(len(ds))) if items is None else items
    return WorkerGuard(torch.utils.data.DataLoader(torch.utils.data.Subset(files, items), batch_size=batch_size,
                                                   shuffle=False, **common))


def first_bad_image(ds: MultiDomainDataset, ok: torch.Tensor, rows: torch.Tensor, errors) -> str | None:
    """The one-line description of the first unreadable image of a batch, or None when all were read."""
    bad = np.flatnonzero(~ok.numpy())
    if len(bad) == 0:
        return None
    j = int(bad[0])
    return f"{ds.root / ds.paths[int(rows[j])]} ({errors[j]})"


def decoded_batches(ds: MultiDomainDataset, image_size: int, items: Sequence | None = None, batch_size: int = 256,
                    workers: int | None = None, transform: transforms.Compose | None = None) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, S, S) batches of ``items`` (rows, or ``(row, seed)``), in order; a bad image is a LinftError."""
    for images, _views, rows, ok, errors in image_loader(ds, image_size, items, batch_size=batch_size,
                                                         workers=workers, transform=transform):
        bad = first_bad_image(ds, ok, rows, errors)
        if bad:
            raise LinftError(f"cannot read image {bad}; fix or remove it, then re-run")
        yield images


def preload_images(ds: MultiDomainDataset, image_size: int, items: Sequence | None = None, workers: int | None = None,
                   progress: bool = False, label: str = "decoding images",
                   transform: transforms.Compose | None = None) -> torch.Tensor:
    """Every image of ``items`` (default: all rows) decoded once into one uint8 (N, 3, S, S) tensor."""
    items = list(range(len(ds))) if items is None else list(items)
    images = torch.empty(len(items), 3, image_size, image_size, dtype=torch.uint8)
    with progress_bar(len(items), label, unit="img", enabled=progress) as update:
        start = 0
        for batch in decoded_batches(ds, image_size, items, 256, workers, transform):
            images[start:start + len(batch)] = batch
            start += len(batch)
            update(len(batch))
    return images


def fits_in_memory(num_images: int, image_size: int) -> bool:
    """Whether ``num_images`` decoded uint8 images fit in :data:`PRELOAD_LIMIT_BYTES`."""
    return num_images * 3 * image_size * image_size <= PRELOAD_LIMIT_BYTES


class EvalImages:
    """Every image of a dataset with the evaluation transform (or ``transform``), as uint8 batches in dataset order.

    Decoded once, at first use, and kept in memory when the whole set fits in
    :data:`PRELOAD_LIMIT_BYTES`; otherwise decoded again at each pass.
    """

    def __init__(self, ds: MultiDomainDataset, image_size: int, batch_size: int = 256, workers: int | None = None,
                 progress: bool = False, transform: transforms.Compose | None = None):
        self.ds, self.size, self.batch_size, self.workers = ds, image_size, batch_size, workers
        self.transform = transform
        self.progress = progress
        self.preload = fits_in_memory(len(ds), image_size)
        self._images = None

    @property
    def images(self) -> torch.Tensor | None:
        """All images, uint8 (N, 3, S, S), decoded at first use (None when too large to keep)."""
        if self.preload and self._images is None:
            self._images = preload_images(self.ds, self.size, workers=self.workers, progress=self.progress,
                                          label="decoding evaluation images", transform=self.transform)
        return self._images

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.images is None:
            yield from decoded_batches(self.ds, self.size, None, self.batch_size, self.workers, self.transform)
        else:
            for a in range(0, len(self.images), self.batch_size):
                yield self.images[a:a + self.batch_size]

"""The feature cache: pooled φ-block features of a whole dataset in one HDF5 file.

:func:`extract_features` runs a frozen backbone over a :class:`~linft.data.MultiDomainDataset`
and writes the file described in DESIGN.md; :func:`open_cache` reads it back
into memory for training; :func:`cache_info` and :func:`verify_cache` inspect it.

File layout (readable with ``h5ls``/``h5dump``):

* datasets ``features`` (N, K, D) float16/float32, optionally ``views``
  (N, V, K, D): the same features of V augmented views of every image
  (DomainBed's training augmentation, ``extract --views V``), ``labels`` (N,) int64,
  ``domains`` (N,) int64, ``paths`` (N,) utf-8 (``domain/class/file``),
  ``valid`` (N,) bool (False for images skipped with ``skip_bad_images``;
  their features are zero);
* attributes: scalars as they are, lists and dicts as JSON text (see
  :data:`JSON_ATTRS`); ``complete`` says whether the file may be used and
  ``provenance_sha256`` identifies its content (records of later stages carry it).

Crash safety: the file is written as ``<out>.partial`` beside the target and
flushed after each batch with its progress in the ``num_done`` attribute. A
killed extraction resumes from there when the same command runs again; the
file takes its final name (an atomic rename) only once complete, and readers
refuse files not marked complete. An existing cache is never replaced unless
``force`` is given, and even then only once the new one is complete.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

import linft
from linft.backbones import PooledBlockFeatures, load_backbone, phi_block_names
from linft.data import (
    IMAGENET_MEAN, IMAGENET_STD, MultiDomainDataset, file_list_sha256, load_image_folder, seed_hash,
)
from linft.errors import LinftError
from linft.progress import progress_bar

CACHE_FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"

#: Attributes stored as JSON text.
JSON_ATTRS = ("blocks", "domain_names", "class_names", "per_domain", "skipped_paths")

#: Attributes that determine the file's content; their hash is ``provenance_sha256``.
IDENTITY_ATTRS = (
    "format_version", "backbone", "weights_sha256", "blocks", "image_size", "transform",
    "dtype", "compute", "domain_names", "class_names", "num_examples", "file_list_sha256",
)

_DTYPES = {"float16": np.float16, "float32": np.float32}


def eval_transform(image_size: int) -> str:
    """Text of DomainBed's evaluation transform at ``image_size`` (as stored in the cache)."""
    return (f"Resize(({image_size}, {image_size})) [PIL bilinear], ToTensor, "
            f"Normalize(mean={list(IMAGENET_MEAN)}, std={list(IMAGENET_STD)})")


def load_image_uint8(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """One image as DomainBed's eval transform sees it before ``ToTensor``: uint8 (3, S, S), RGB."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img = TF.resize(img, [image_size, image_size])
        return TF.pil_to_tensor(img)


def train_transform(image_size: int) -> str:
    """Text of DomainBed's training augmentation at ``image_size`` (the transform of augmented views)."""
    return (f"RandomResizedCrop({image_size}, scale=(0.7, 1.0)), RandomHorizontalFlip, "
            f"ColorJitter(0.3, 0.3, 0.3, 0.3), RandomGrayscale, ToTensor, Normalize(ImageNet)")


def augmented_views_uint8(path: str | os.PathLike, image_size: int, num_views: int, seed: int) -> torch.Tensor:
    """``num_views`` DomainBed training augmentations of one image, uint8 (V, 3, S, S).

    View ``j`` is drawn with torch's RNG seeded by ``seed_hash(seed, j)``
    (the caller passes a per-image seed), so it is the same in any worker and
    on any resume.
    """
    from torchvision import transforms

    augment = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.7, 1.0)), transforms.RandomHorizontalFlip(),
        transforms.ColorJitter(0.3, 0.3, 0.3, 0.3), transforms.RandomGrayscale(), transforms.PILToTensor(),
    ])
    with Image.open(path) as img:
        img = img.convert("RGB")
        out = []
        with torch.random.fork_rng(devices=[]):
            for j in range(num_views):
                torch.manual_seed(seed_hash(seed, j))
                out.append(augment(img))
    return torch.stack(out)


def normalize_uint8(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32, scaled to [0, 1] and ImageNet-normalised (= ToTensor + Normalize)."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().div_(255.0)).sub_(mean).div_(std)


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes images in DataLoader workers; a bad image comes back flagged, never raised."""

    def __init__(self, root: Path, paths: list[str], image_size: int, views: int = 0, views_seed: int = 0):
        self.root, self.paths, self.size = root, paths, image_size
        self.views, self.views_seed = views, views_seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = self.root / self.paths[i]
        try:
            plain = load_image_uint8(path, self.size)
            views = augmented_views_uint8(path, self.size, self.views, seed_hash("views", self.views_seed, i)) \
                if self.views else torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
            return plain, views, i, True, ""
        except Exception as exc:  # any decoder failure is reported by path, below
            zeros = torch.zeros(3, self.size, self.size, dtype=torch.uint8)
            return zeros, zeros.expand(self.views, -1, -1, -1).clone(), i, False, f"{type(exc).__name__}: {exc}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; other values as torch understands them."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LinftError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LinftError(f"device {device} asked for but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LinftError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs); use cuda:0 or auto")
    return dev


def default_cache_path(dataset: MultiDomainDataset, backbone: str, weights: str, folder="features_cache") -> Path:
    """``features_cache/<dataset>_<backbone>_<weights>.h5`` (weights file names lose their suffix)."""
    w = Path(str(weights)).stem if os.sep in str(weights) or str(weights).endswith((".pt", ".pth")) else str(weights)
    name = (dataset.name or dataset.root.name).replace(" ", "_")
    return Path(folder) / f"{name}_{backbone}_{w}.h5"


def provenance_sha256(attrs: dict) -> str:
    """Hash of the identity attributes (:data:`IDENTITY_ATTRS`): equal hashes mean the same content.

    Augmented views count only when present, so caches without them keep the
    hash they had before views existed.
    """
    identity = {k: attrs[k] for k in IDENTITY_ATTRS}
    if attrs.get("views"):
        identity.update(views=attrs["views"], views_transform=attrs["views_transform"], views_seed=attrs["views_seed"])
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _read_attrs(f: h5py.File) -> dict:
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        if k in JSON_ATTRS and isinstance(v, str):
            v = json.loads(v)
        out[k] = v
    return out


def _write_attrs(f: h5py.File, attrs: dict) -> None:
    for k, v in attrs.items():
        # str() also turns str subclasses such as torch.__version__ into plain text
        f.attrs[k] = json.dumps(v) if k in JSON_ATTRS else (str(v) if isinstance(v, str) else v)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in IDENTITY_ATTRS if a.get(k) != b.get(k)]


@dataclass
class ExtractResult:
    """What :func:`extract_features` did: ``status`` is ``extracted``, ``resumed`` or ``up-to-date``."""

    path: Path
    status: str
    num_examples: int
    num_extracted: int
    seconds: float
    skipped_paths: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.num_extracted / self.seconds if self.seconds > 0 else float("nan")


def _open_existing(path: Path) -> dict | None:
    """Attributes of an existing linft cache at ``path``, or None if it is not one (or unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            attrs = _read_attrs(f)
    except OSError as exc:
        if exc.errno == errno.EAGAIN or "unable to lock file" in str(exc).lower():
            raise LinftError(f"{path} is open for writing in another process; wait for it to finish") from None
        return None  # truncated or foreign: not a usable cache
    return attrs if "provenance_sha256" in attrs else None


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + (16 << 20):
        raise LinftError(
            f"not enough disk space in {folder}: the cache needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free some space or choose another --out"
        )


def extract_features(
    dataset: MultiDomainDataset | str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    backbone: str = "resnet50",
    weights: str | os.PathLike | None = "DEFAULT",
    num_blocks: int | None = None,
    image_size: int = 224,
    batch_size: int = 256,
    workers: int | None = None,
    device: str | torch.device = "auto",
    dtype: str = "float16",
    amp: bool = True,
    skip_bad_images: bool = False,
    views: int = 0,
    views_seed: int = 0,
    force: bool = False,
    progress: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract pooled φ-block features of every image of ``dataset`` into an HDF5 cache at ``out``.

    ``num_blocks`` keeps the last K blocks of the last stage (default: all of
    them). On CUDA the forward runs under float16 autocast (``amp``) and in
    channels_last; on CPU in float32. Features are stored as ``dtype``.
    ``on_batch(num_done, num_examples)`` is called after each batch is on disk.
    ``views`` > 0 also stores that many augmented views of every image
    (DomainBed's training augmentation, seeded per image by ``views_seed``)
    in a ``views`` dataset; linear fine-tuning then samples one per step.

    Re-running with the same arguments on a complete cache returns at once;
    on an interrupted one it resumes. A cache or partial file of different
    provenance at the target is refused unless ``force``.
    """
    t0 = _dt.datetime.now(_dt.timezone.utc)
    tick = time.perf_counter()
    ds = dataset if isinstance(dataset, MultiDomainDataset) else load_image_folder(dataset)
    if dtype not in _DTYPES:
        raise LinftError(f"unknown --dtype {dtype}; use float16 or float32")
    if image_size < 16:
        raise LinftError(f"--image-size {image_size} is too small; use at least 16 (DomainBed uses 224)")
    if batch_size < 1:
        raise LinftError(f"--batch-size must be at least 1, got {batch_size}")
    if views < 0:
        raise LinftError(f"--views must be 0 or more, got {views}")
    if workers is not None and workers < 0:
        raise LinftError(f"--workers must be 0 or more, got {workers}")
    dev = resolve_device(device)
    use_amp = bool(amp and dev.type == "cuda")

    bb = load_backbone(backbone, weights)
    blocks = phi_block_names(bb.model, num_blocks)
    extractor = PooledBlockFeatures(bb.model, blocks).to(dev).eval()
    if dev.type == "cuda":
        extractor = extractor.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        probe = extractor(torch.zeros(1, 3, image_size, image_size, device=dev))
    dim = int(probe.shape[-1])

    out = Path(out) if out is not None else default_cache_path(ds, backbone, bb.weights)
    out = out.expanduser()
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    n = len(ds)
    attrs = {
        "format_version": CACHE_FORMAT_VERSION,
        "backbone": bb.name,
        "weights": bb.weights,
        "weights_label": bb.weights_label,
        "weights_sha256": bb.weights_sha256,
        "blocks": blocks,
        "feature_dim": dim,
        "image_size": int(image_size),
        "transform": eval_transform(image_size),
        "dtype": dtype,
        "compute": "cuda autocast float16" if use_amp else "float32",
        "dataset_name": ds.name or ds.root.name,
        "dataset_root": str(ds.root.resolve()),
        "domain_names": list(ds.domains),
        "class_names": list(ds.classes),
        "per_domain": {d: {"count": ds.counts[d], "classes": ds.class_counts[d]} for d in ds.domains},
        "num_examples": n,
        "file_list_sha256": ds.file_list_sha256,
        "linft_version": linft.__version__,
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "h5py_version": h5py.__version__,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "created": t0.isoformat(timespec="seconds"),
        "views": int(views),
        "views_transform": train_transform(image_size) if views else "",
        "views_seed": int(views_seed),
    }
    attrs["provenance_sha256"] = provenance_sha256(attrs)

    # 1. an existing file at the target
    if out.exists():
        existing = _open_existing(out)
        if existing is not None and existing.get("complete") and existing["provenance_sha256"] == attrs["provenance_sha256"]:
            return ExtractResult(out, "up-to-date", n, 0, time.perf_counter() - tick,
                                 list(existing.get("skipped_paths", [])))
        if not force:
            if existing is None:
                raise LinftError(f"{out} exists and is not a linft feature cache; choose another --out (or --force to replace it)")
            diff = ", ".join(_differences(existing, attrs)) or "completion"
            raise LinftError(f"{out} holds a feature cache with different provenance ({diff}); "
                             f"pass --force to replace it or choose another --out")

    # 2. an interrupted extraction beside it
    num_done = 0
    if partial.exists():
        previous = _open_existing(partial)
        if previous is not None and previous["provenance_sha256"] == attrs["provenance_sha256"]:
            num_done = int(previous.get("num_done", 0))
            attrs["created"] = previous.get("created", attrs["created"])
        elif previous is None and not force:
            warnings.warn(f"discarding unreadable partial file {partial} (interrupted mid-write); starting over",
                          stacklevel=2)
        elif not force:
            diff = ", ".join(_differences(previous, attrs))
            raise LinftError(f"{partial} is an unfinished extraction with different settings ({diff}); "
                             f"re-run its own command to finish it, or pass --force to discard it")
        if num_done == 0:
            partial.unlink()

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LinftError(f"cannot create folder {out.parent} ({exc.strerror}); choose another --out") from None
    if not os.access(out.parent, os.W_OK):
        raise LinftError(f"cannot write to {out.parent} (permission denied); choose another --out")
    itemsize = np.dtype(_DTYPES[dtype]).itemsize
    _check_space(out.parent, (n - num_done) * (1 + views) * len(blocks) * dim * itemsize + (0 if num_done else n * 120))

    # 3. create or reopen the partial file
    try:
        if num_done == 0:
            f = h5py.File(partial, "w")
            rows = max(1, min(n, (1 << 20) // (len(blocks) * dim * itemsize)))
            f.create_dataset("features", shape=(n, len(blocks), dim), dtype=_DTYPES[dtype],
                             chunks=(rows, len(blocks), dim))
            f.create_dataset("labels", data=ds.labels.astype(np.int64))
            f.create_dataset("domains", data=ds.domain_ids.astype(np.int64))
            f.create_dataset("paths", data=ds.paths, dtype=h5py.string_dtype("utf-8"))
            f.create_dataset("valid", shape=(n,), dtype=bool, fillvalue=False)
            if views:
                f.create_dataset("views", shape=(n, views, len(blocks), dim), dtype=_DTYPES[dtype],
                                 chunks=(max(1, rows // views), views, len(blocks), dim))
            _write_attrs(f, attrs)
            f.attrs["complete"] = False
            f.attrs["num_done"] = 0
            f.flush()
        else:
            f = h5py.File(partial, "r+")
    except (OSError, RuntimeError) as exc:  # h5py reports some write failures as RuntimeError
        raise LinftError(f"cannot write {partial} ({_first_line(exc)}); check the location or choose another --out") from None

    status = "resumed" if num_done else "extracted"
    extracted = 0
    try:
        extracted = _run_extraction(f, ds, extractor, dev, use_amp, image_size, batch_size, workers,
                                    num_done, skip_bad_images, progress, on_batch, views, views_seed)
        valid = f["valid"][...]
        skipped = [ds.paths[i] for i in np.flatnonzero(~valid)]
        f.attrs["skipped_paths"] = json.dumps(skipped)
        f.attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = True
        f.flush()
    except (OSError, RuntimeError) as exc:  # a full disk or file-size limit surfaces as either
        raise LinftError(f"writing {partial} failed ({_first_line(exc)}); free space or fix the location, "
                         f"then re-run the same command to resume", exit_at_once=True) from None
    finally:
        try:
            f.close()
        except (OSError, RuntimeError):  # the write failure above is the message that matters
            pass
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, out)
    return ExtractResult(out, status, n, extracted, time.perf_counter() - tick, skipped)


def _run_extraction(f, ds, extractor, dev, use_amp, image_size, batch_size, workers,
                    num_done, skip_bad_images, progress, on_batch, views, views_seed) -> int:
    """The batched loop: decode in workers, forward on ``dev``, write and flush one batch behind."""
    n = len(ds)
    if num_done >= n:
        return 0
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    files = _ImageFiles(ds.root, ds.paths, image_size, views, views_seed)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(files, range(num_done, n)),
        batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=dev.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )
    feats_ds, valid_ds = f["features"], f["valid"]
    views_ds = f["views"] if views else None
    np_dtype = feats_ds.dtype

    def write(pending):
        if pending is None:
            return
        a, b, host, ok = pending
        if isinstance(host, tuple):  # (tensor, cuda event)
            host[1].synchronize()
            host = host[0]
        host = host.numpy().astype(np_dtype, copy=False)
        feats_ds[a:b] = host[:, 0]
        if views_ds is not None:
            views_ds[a:b] = host[:, 1:]
        valid_ds[a:b] = ok
        f.attrs["num_done"] = b
        f.flush()
        if on_batch is not None:
            on_batch(b, n)

    pending = None
    done = num_done
    with progress_bar(n, "extracting", unit="img", enabled=progress, initial=num_done) as update, \
            torch.inference_mode():
        for images, view_images, index, ok, errors in loader:
            ok = ok.numpy()
            if not ok.all() and not skip_bad_images:
                write(pending)
                j = int(np.flatnonzero(~ok)[0])
                bad = ds.paths[int(index[j])]
                raise LinftError(f"cannot read image {ds.root / bad} ({errors[j]}); fix or remove it, "
                                 f"or pass --skip-bad-images to record and skip it")
            # one forward for the plain images and their views: (B, 1 + V, 3, S, S)
            x = torch.cat([images[:, None], view_images], 1).flatten(0, 1)
            x = normalize_uint8(x.to(dev, non_blocking=True))
            if dev.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
                feats = extractor(x)
            feats = feats.view(len(ok), 1 + views, *feats.shape[1:])
            feats[torch.from_numpy(~ok).to(dev)] = 0.0
            if dev.type == "cuda":
                host = feats.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                host = (host, event)
            else:
                host = feats
            write(pending)
            pending = (done, done + len(ok), host, ok)
            done += len(ok)
            update(len(ok))
        write(pending)
    return done - num_done


# --------------------------------------------------------------------------- reading


@dataclass
class FeatureCache:
    """A complete feature cache in memory: arrays plus the provenance attributes in ``meta``."""

    path: Path
    features: np.ndarray  # (N, K, D)
    labels: np.ndarray  # (N,) int64
    domains: np.ndarray  # (N,) int64 index into meta["domain_names"]
    paths: list[str]
    valid: np.ndarray  # (N,) bool
    meta: dict
    views: np.ndarray | None = None  # (N, V, K, D) augmented views, when extracted with views

    @property
    def domain_names(self) -> list[str]:
        return list(self.meta["domain_names"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def block_names(self) -> list[str]:
        return list(self.meta["blocks"])

    @property
    def provenance_sha256(self) -> str:
        return self.meta["provenance_sha256"]

    def domain_indices(self, domain: int | str) -> np.ndarray:
        """Global row indices of one domain, in its own order (what :func:`linft.data.split_indices` indexes)."""
        i = self.domain_names.index(domain) if isinstance(domain, str) else int(domain)
        return np.flatnonzero(self.domains == i)


def _open_h5(path: Path) -> h5py.File:
    if not path.exists():
        hint = f" (an unfinished extraction is at {path}{PARTIAL_SUFFIX}; re-run its command)" \
            if Path(str(path) + PARTIAL_SUFFIX).exists() else ""
        raise LinftError(f"feature cache {path} does not exist{hint}; create it with `linft extract`")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise LinftError(f"{path} is not a readable HDF5 file ({exc}); re-create it with `linft extract`") from None


def cache_info(path: str | os.PathLike) -> dict:
    """The attributes and dataset shapes of a cache (complete or not), without reading the features."""
    path = Path(path)
    with _open_h5(path) as f:
        info = _read_attrs(f)
        if "provenance_sha256" not in info:
            raise LinftError(f"{path} is an HDF5 file but not a linft feature cache")
        info["datasets"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in f.items()}
    info["path"] = str(path)
    info["file_bytes"] = path.stat().st_size
    return info


def open_cache(path: str | os.PathLike) -> FeatureCache:
    """Read a complete cache into memory (one read per dataset); refuses incomplete files."""
    path = Path(path)
    with _open_h5(path) as f:
        meta = _read_attrs(f)
        if "provenance_sha256" not in meta:
            raise LinftError(f"{path} is an HDF5 file but not a linft feature cache; create one with `linft extract`")
        if not meta.get("complete"):
            raise LinftError(
                f"{path} is an unfinished extraction ({meta.get('num_done', 0)} of {meta.get('num_examples')} images); "
                f"re-run the same `linft extract` command to finish it"
            )
        if meta.get("format_version", 0) > CACHE_FORMAT_VERSION:
            raise LinftError(f"{path} was written by a newer linft (format {meta['format_version']}); upgrade linft")
        return FeatureCache(
            path=path,
            features=f["features"][...],
            labels=f["labels"][...],
            domains=f["domains"][...],
            paths=[p.decode() if isinstance(p, bytes) else p for p in f["paths"][...]],
            valid=f["valid"][...],
            meta=meta,
            views=f["views"][...] if "views" in f else None,
        )


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_cache`: one ``(check, passed, detail)`` per check."""

    path: Path
    checks: list[tuple[str, bool, str]]

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)


def verify_cache(path: str | os.PathLike, data: str | os.PathLike | None = None, chunk_rows: int = 4096) -> VerifyReport:
    """Check a cache: completeness, provenance hash, shapes, counts, file-list hash, finite features.

    With ``data`` (a dataset folder) the file list of that folder must match
    the one the cache was made from.
    """
    path = Path(path)
    checks: list[tuple[str, bool, str]] = []
    with _open_h5(path) as f:
        meta = _read_attrs(f)
        if "provenance_sha256" not in meta:
            raise LinftError(f"{path} is an HDF5 file but not a linft feature cache")
        n = int(meta["num_examples"])
        checks.append(("complete", bool(meta.get("complete")),
                       "marked complete" if meta.get("complete") else
                       f"unfinished: {meta.get('num_done', 0)} of {n} images; re-run the extract command"))
        recomputed = provenance_sha256(meta)
        checks.append(("provenance", recomputed == meta["provenance_sha256"],
                       meta["provenance_sha256"][:16] if recomputed == meta["provenance_sha256"]
                       else "attributes were edited after extraction"))
        shapes = {k: f[k].shape for k in ("features", "labels", "domains", "paths", "valid")}
        want_feat = (n, len(meta["blocks"]), int(meta["feature_dim"]))
        shape_ok = shapes["features"] == want_feat and all(shapes[k] == (n,) for k in ("labels", "domains", "paths", "valid"))
        if meta.get("views"):
            shape_ok = shape_ok and "views" in f and f["views"].shape == (n, meta["views"], *want_feat[1:])
        checks.append(("shapes", shape_ok, f"features {shapes['features']}, expected {want_feat}"))
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][...]]
        sha = file_list_sha256(paths)
        checks.append(("file list", sha == meta["file_list_sha256"],
                       "paths match file_list_sha256" if sha == meta["file_list_sha256"] else "paths differ from file_list_sha256"))
        domains, labels = f["domains"][...], f["labels"][...]
        counts = np.bincount(domains, minlength=len(meta["domain_names"]))
        want_counts = [meta["per_domain"][d]["count"] for d in meta["domain_names"]]
        checks.append(("domain counts", counts.tolist() == want_counts, f"{dict(zip(meta['domain_names'], counts.tolist()))}"))
        label_ok = labels.size == 0 or (labels.min() >= 0 and labels.max() < len(meta["class_names"]))
        consistent = all(p.split("/")[0] == meta["domain_names"][d] and p.split("/")[1] == meta["class_names"][y]
                         for p, d, y in zip(paths, domains, labels)) if label_ok and len(counts) == len(want_counts) else False
        checks.append(("labels", bool(label_ok and consistent), "labels and domains agree with paths"
                       if label_ok and consistent else "labels or domains disagree with paths"))
        done = n if meta.get("complete") else int(meta.get("num_done", 0))
        bad_rows = 0
        for name in ("features", "views") if "views" in f else ("features",):
            feats = f[name]
            for a in range(0, done, chunk_rows):
                block = feats[a:min(done, a + chunk_rows)]
                bad_rows += int((~np.isfinite(block.reshape(len(block), -1)).all(axis=1)).sum())
        checks.append(("finite", bad_rows == 0, f"{bad_rows} rows with NaN/inf" if bad_rows else f"{done} rows finite"))
        skipped = meta.get("skipped_paths", [])
        if skipped:
            checks.append(("skipped images", True, f"{len(skipped)} skipped: {', '.join(skipped[:3])}"))
    if data is not None:
        ds = load_image_folder(data)
        if ds.file_list_sha256 == meta["file_list_sha256"]:
            checks.append(("dataset folder", True, f"{ds.root} has the same {len(ds)} files"))
        else:
            now, then = set(ds.paths), set(paths)
            added, removed = sorted(now - then), sorted(then - now)
            detail = f"{ds.root} differs: {len(added)} added ({', '.join(added[:3])}), {len(removed)} removed ({', '.join(removed[:3])})"
            checks.append(("dataset folder", False, detail))
    return VerifyReport(path, checks)


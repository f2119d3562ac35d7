"""Extraction: pooled φ-block features of every image of a dataset, written crash-safe into the cache file.

Crash safety: the file is written as ``<out>.partial`` beside the target and
flushed after each batch with its progress in the ``num_done`` attribute. A
killed extraction resumes from there when the same command runs again; the
file takes its final name (fsync, then an atomic rename) only once complete,
and readers refuse files not marked complete. An existing cache is never
replaced unless ``force`` is given, and even then only once the new one is
complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch
import torchvision

import linft
from linft.cache.format import (CACHE_FORMAT_VERSION, DTYPES, default_cache_path, existing_cache_attrs,
                                identity_differences, provenance_sha256, row_digests, write_attrs,
                                digest_mismatches)
from linft.data.folders import MultiDomainDataset, check_output_apart, load_image_folder
from linft.data.images import (check_workers, describe_transform, describe_views_transform, first_bad_image,
                               image_loader, model_input)
from linft.errors import HDF5WriteError, LinftError, worker_died
from linft.locks import output_lock
from linft.models.blocks import PooledBlockFeatures, phi_block_names
from linft.models.registry import Backbone, load_backbone
from linft.output import commit_partial, human_bytes, partial_path, progress_bar, read_only_file_system, writable_folder
from linft.runtime import DEFAULT_PRECISION, PRECISIONS, autocast, check_precision, effective_precision, resolve_device


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how (the defaults are the paper's: ResNet-50 "ResNet #2", 224 px, all φ blocks)."""

    backbone: str = "resnet50"
    weights: str = "DEFAULT"
    num_blocks: int | None = None  # the last K blocks of the last stage; None: all of them
    image_size: int = 224
    batch_size: int = 256
    workers: int | None = None
    device: str = "auto"
    dtype: str = "float16"  # storage
    precision: str = DEFAULT_PRECISION  # autocast dtype on CUDA (float32: none); the CPU computes in float32
    skip_bad_images: bool = False
    views: int = 0  # augmented views per image (DomainBed's training augmentation)
    views_seed: int = 0

    def check(self) -> None:
        """One-line errors for settings that cannot run."""
        if self.dtype not in DTYPES:
            raise LinftError(f"unknown dtype {self.dtype}; use float16 or float32", param="dtype")
        check_precision(self.precision)
        if self.image_size < 16:
            raise LinftError(f"image_size {self.image_size} is too small; use at least 16 (DomainBed uses 224)",
                             param="image_size")
        if self.batch_size < 1:
            raise LinftError(f"batch_size must be at least 1, got {self.batch_size}", param="batch_size")
        if self.views < 0:
            raise LinftError(f"views must be 0 or more, got {self.views}", param="views")
        check_workers(self.workers)


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


@dataclass
class _Extractor:
    """The frozen network that turns a uint8 batch into pooled φ-block features, on its device."""

    backbone: Backbone
    blocks: list[str]
    module: PooledBlockFeatures
    dev: torch.device
    precision: str  # what the forward runs in on this device (float32 off CUDA)
    dim: int
    transform: object  # PIL image -> uint8 (3, S, S): the weights' own, or DomainBed's at ``image_size``
    normalize: object  # the normalisation in effect (for the record; the network folds in any but ImageNet's)
    image_size: int

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = model_input(images, self.dev, channels_last=self.dev.type == "cuda")  # a network folds in any other
        with autocast(self.dev, self.precision):
            return self.module(x)


def compute_text(precision: str) -> str:
    """The cache's ``compute`` attribute for an effective precision (:func:`linft.runtime.effective_precision`).

    The texts are part of the provenance of existing caches (``tests/compat`` pins them): ``float32``, or
    ``cuda autocast <dtype>``.
    """
    return "float32" if precision == "float32" else f"cuda autocast {precision}"


def _extractor(config: ExtractConfig) -> _Extractor:
    dev = resolve_device(config.device)
    bb = load_backbone(config.backbone, config.weights)
    blocks = phi_block_names(bb.model, config.num_blocks)
    module = PooledBlockFeatures(bb.model, blocks).to(dev).eval()
    if dev.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    transform, normalize, size = bb.input_transform(config.image_size)
    ext = _Extractor(bb, blocks, module, dev, effective_precision(dev, config.precision), 0, transform, normalize, size)
    ext.dim = int(ext(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[-1])
    return ext


def cache_attributes(ds: MultiDomainDataset, config: ExtractConfig, ext: _Extractor) -> dict:
    """The attributes of the cache ``config`` makes of ``ds`` (``provenance_sha256`` included)."""
    dev, classes = ext.dev, ds.class_counts
    attrs = {
        "format_version": CACHE_FORMAT_VERSION, "backbone": ext.backbone.name, "weights": ext.backbone.weights,
        "weights_label": ext.backbone.weights_label, "weights_sha256": ext.backbone.weights_sha256,
        "blocks": ext.blocks, "feature_dim": ext.dim, "image_size": ext.image_size,
        "transform": describe_transform(ext.transform, ext.normalize), "dtype": config.dtype,
        "compute": compute_text(ext.precision), "dataset_name": ds.name or ds.root.name,
        "dataset_root": str(ds.root.resolve()), "domain_names": list(ds.domains), "class_names": list(ds.classes),
        "per_domain": {d: {"count": n, "classes": classes[d]} for d, n in ds.counts.items()},
        "num_examples": len(ds), "file_list_sha256": ds.file_list_sha256, "linft_version": linft.__version__,
        "torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
        "h5py_version": h5py.__version__,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "views": int(config.views),
        "views_transform": describe_views_transform(ext.image_size, ext.normalize) if config.views else "",
        "views_seed": int(config.views_seed),
    }
    attrs["provenance_sha256"] = provenance_sha256(attrs)
    return attrs


def _precision_hint(existing: dict, attrs: dict) -> str:
    """When only the precision differs from an existing file's: which precision made that file."""
    if identity_differences(existing, attrs) != ["compute"]:
        return ""
    made = next((p for p in PRECISIONS if compute_text(p) == existing.get("compute")), None)
    return f" (it was computed in {existing.get('compute')}: precision='{made}' reuses it)" if made else ""


def _up_to_date(out: Path, attrs: dict, force: bool) -> dict | None:
    """The attributes of a complete cache of the same provenance at ``out``; refuses any other file without force."""
    if not out.exists():
        return None
    if force:  # always re-extract: images may have changed in place (same names, same provenance)
        return None
    existing = existing_cache_attrs(out)
    if (existing is not None and existing.get("complete")
            and existing["provenance_sha256"] == attrs["provenance_sha256"]):
        return existing
    if existing is None:
        raise LinftError(f"{out} exists and is not a linft feature cache; choose another out "
                         f"(or pass force=True to replace it)", param="out")
    diff = ", ".join(identity_differences(existing, attrs)) or "completion"
    raise LinftError(f"{out} holds a feature cache with different provenance ({diff})"
                     f"{_precision_hint(existing, attrs)}; pass force=True to replace it or choose another out",
                     param="out")


def _resume_point(partial: Path, attrs: dict, force: bool, batch_size: int) -> int:
    """Rows already extracted in an interrupted file of the same provenance (0: start over, the file removed).

    Only rows whose stored digest matches their content count (:func:`proven_rows`): after a failed write (a full
    disk) the file may claim rows that never reached the disk. The point is a multiple of ``batch_size``, so the
    redone rows go through the same batches as in one go (on GPUs a row's features may depend on its batch).
    ``force`` always starts over.
    """
    if not partial.exists():
        return 0
    previous = None if force else existing_cache_attrs(partial)
    num_done = 0
    if previous is not None and previous["provenance_sha256"] == attrs["provenance_sha256"]:
        num_done = proven_rows(partial, int(previous.get("num_done", 0))) // batch_size * batch_size
        attrs["created"] = previous.get("created", attrs["created"])
    elif previous is None and not force:
        warnings.warn(f"discarding unreadable partial file {partial} (interrupted mid-write); starting over",
                      stacklevel=3)
    elif not force:
        diff = ", ".join(identity_differences(previous, attrs))
        raise LinftError(f"{partial} is an unfinished extraction with different settings ({diff})"
                         f"{_precision_hint(previous, attrs)}; "
                         f"re-run its own command to finish it, or pass force=True to discard it", param="force")
    if num_done == 0:
        partial.unlink()
    return num_done


def proven_rows(partial: Path, claimed: int, chunk: int = 4096) -> int:
    """How many leading rows of an interrupted extraction are proven written: their digests match their content.

    A file without digests (an older linft) proves nothing. Reading back costs one pass over the rows done.
    """
    try:
        with h5py.File(partial, "r") as f:
            if "digests" not in f:
                return 0
            return next(digest_mismatches(f, claimed, chunk, first_only=True), claimed)
    except (OSError, RuntimeError, KeyError):
        return 0


def _check_location(out: Path, needed_bytes: int) -> None:
    writable_folder(out.parent)
    free = shutil.disk_usage(out.parent).free
    if free < needed_bytes + (16 << 20):
        raise LinftError(f"not enough disk space in {out.parent}: the cache needs about {human_bytes(needed_bytes)} "
                         f"plus 16 MiB of headroom, {human_bytes(free)} free; free some space or choose another out",
                         param="out")


def _open_partial(partial: Path, ds: MultiDomainDataset, attrs: dict, num_done: int) -> h5py.File:
    """Reopen the interrupted file, or create it with every dataset and attribute (``complete`` False)."""
    if num_done:
        return h5py.File(partial, "r+")
    n, k, dim, views, dtype = (len(ds), len(attrs["blocks"]), attrs["feature_dim"], attrs["views"],
                               DTYPES[attrs["dtype"]])
    f = h5py.File(partial, "w")
    rows = max(1, min(n, (1 << 20) // (k * dim * np.dtype(dtype).itemsize)))
    f.create_dataset("features", shape=(n, k, dim), dtype=dtype, chunks=(rows, k, dim))
    f.create_dataset("labels", data=ds.labels.astype(np.int64))
    f.create_dataset("domains", data=ds.domain_ids.astype(np.int64))
    f.create_dataset("paths", data=ds.paths, dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("valid", shape=(n,), dtype=bool, fillvalue=False)
    f.create_dataset("digests", shape=(n,), dtype=np.uint64, fillvalue=0)
    if views:
        f.create_dataset("views", shape=(n, views, k, dim), dtype=dtype, chunks=(max(1, rows // views), views, k, dim))
    write_attrs(f, attrs)
    f.attrs["complete"] = False
    f.attrs["num_done"] = 0
    f.flush()
    return f


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def extract_features(dataset: MultiDomainDataset | str | os.PathLike, out: str | os.PathLike | None = None,
                     config: ExtractConfig = ExtractConfig(), *, force: bool = False, progress: bool = True,
                     on_checkpoint: Callable[[int, int], None] | None = None, **settings) -> ExtractResult:
    """Extract pooled φ-block features of every image of ``dataset`` into an HDF5 cache at ``out``.

    ``settings`` override fields of ``config`` (``backbone=..., weights=...``,
    see :class:`ExtractConfig`). On CUDA the forward runs under autocast to
    ``precision`` and in channels_last; on CPU in float32. Features are
    stored as ``dtype``. ``on_checkpoint(num_done, num_examples)`` is called each
    time a batch is on disk (the progress a resume would start from). ``views``
    > 0 also stores that many augmented views of every image (seeded per image
    by ``views_seed``); linear fine-tuning then samples one per step.

    Re-running with the same arguments on a complete cache returns at once;
    on an interrupted one it resumes. A cache or partial file of different
    provenance at the target is refused unless ``force``.
    """
    tick = time.perf_counter()
    config = replace(config, **settings)
    config.check()
    ds = dataset if isinstance(dataset, MultiDomainDataset) else load_image_folder(dataset)
    ext = _extractor(config)
    attrs = cache_attributes(ds, config, ext)
    out = (Path(out) if out is not None else default_cache_path(ds, config.backbone, ext.backbone.weights)).expanduser()
    check_output_apart(out, [ds.root], param="out")
    with output_lock(out):  # creates the folder
        return _extract_locked(config, _Target(ds, out, ext, attrs, force, progress, on_checkpoint, tick))


@dataclass
class _Target:
    """What :func:`extract_features` settled before taking the lock on the cache file."""

    ds: MultiDomainDataset
    out: Path
    ext: _Extractor
    attrs: dict  # the cache's attributes (its provenance)
    force: bool
    progress: bool
    on_checkpoint: Callable[[int, int], None] | None
    tick: float  # when the call started


def _extract_locked(config: ExtractConfig, target: _Target) -> ExtractResult:
    """:func:`extract_features` once the target is known and locked by this process."""
    ds, out, ext, attrs, force, tick = target.ds, target.out, target.ext, target.attrs, target.force, target.tick
    existing = _up_to_date(out, attrs, force)
    if existing is not None:
        return ExtractResult(out, "up-to-date", len(ds), 0, time.perf_counter() - tick,
                             list(existing.get("skipped_paths", [])))
    partial = partial_path(out)
    num_done = _resume_point(partial, attrs, force, config.batch_size)
    itemsize = np.dtype(DTYPES[config.dtype]).itemsize
    _check_location(out, (len(ds) - num_done) * (1 + config.views) * len(ext.blocks) * ext.dim * itemsize
                    + (0 if num_done else len(ds) * 120))
    try:
        f = _open_partial(partial, ds, attrs, num_done)
    except (OSError, RuntimeError) as exc:  # h5py reports some write failures as RuntimeError
        why = "read-only file system" if read_only_file_system(partial.parent) else _first_line(exc)
        raise LinftError(f"cannot write {partial} ({why}); check the location or choose another out",
                         param="out") from None
    try:
        extracted = _run_extraction(f, ds, ext, config, num_done, target.progress, target.on_checkpoint)
        skipped = [ds.paths[i] for i in np.flatnonzero(~f["valid"][...])]
        f.attrs["skipped_paths"] = json.dumps(skipped)
        f.attrs["completed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        f.attrs["complete"] = True
        f.flush()
    except NonFiniteFeatures:
        f.close()
        if num_done == 0:  # made by this command, and of no use once the weights or the dtype change
            partial.unlink(missing_ok=True)
        raise
    except (OSError, RuntimeError) as exc:  # a full disk or file-size limit surfaces as either
        died = worker_died(exc)  # a worker's death can surface anywhere in the loop (torch's SIGCHLD handler)
        if died is not None:
            raise died from None
        raise HDF5WriteError(f"writing {partial} failed ({_first_line(exc)}); free space or fix the location, "
                             f"then re-run the same call to resume (rows not proven written are redone)") from None
    finally:
        try:
            f.close()
        except (OSError, RuntimeError):  # the write failure above is the message that matters
            pass
    commit_partial(partial, out)
    return ExtractResult(out, "resumed" if num_done else "extracted", len(ds), extracted,
                         time.perf_counter() - tick, skipped)


class NonFiniteFeatures(LinftError):
    """Rows of features that are NaN or ±inf (computed so, or overflowing the storage dtype): nothing of them is
    written."""


def nonfinite_error(computed: np.ndarray, stored: np.ndarray, ok: np.ndarray, first_row: int, blocks: list[str],
                    precision: str) -> NonFiniteFeatures | None:
    """The error for a batch (rows from ``first_row``; ``(rows, 1 + views, blocks, dim)``) whose ``stored`` rows are
    not all finite, naming how many, the blocks, and the cause: the storage dtype when the ``computed`` values
    were finite, else the weights (and the precision of the forward). None when every valid row is finite."""
    bad = ~np.isfinite(stored).all(axis=(1, 3)) & ok[:, None]  # (rows, blocks)
    if not bad.any():
        return None
    rows = np.flatnonzero(bad.any(axis=1))
    where = (f"{len(rows)} of images {first_row}..{first_row + len(ok) - 1} (the first: image {first_row + rows[0]}) "
             f"in block{'s' if bad.any(axis=0).sum() > 1 else ''} "
             f"{', '.join(b for b, x in zip(blocks, bad.any(axis=0)) if x)}")
    if np.isfinite(computed[ok]).all():
        largest = float(np.abs(computed[ok]).max())
        return NonFiniteFeatures(f"features of {where} overflow {stored.dtype} storage (largest {largest:.3g}); "
                                 f"store them as float32 (dtype float32), or check the weights", param="dtype")
    also = f", or compute in float32 (precision float32 instead of {precision})" if precision != "float32" else ""
    return NonFiniteFeatures(f"the backbone gives NaN or inf features for {where}; check the weights (a file with "
                             f"NaN or inf or huge values){also}", param="weights")


class _BatchWriter:
    """Writes one batch behind the forward (the copy from the GPU overlaps the next batch), then flushes."""

    def __init__(self, f: h5py.File, num_examples: int, on_checkpoint, blocks: list[str], precision: str):
        self.f, self.n, self.on_checkpoint = f, num_examples, on_checkpoint
        self.blocks, self.precision = blocks, precision
        self.features, self.valid, self.digests = f["features"], f["valid"], f["digests"]
        self.views = f["views"] if "views" in f else None
        self.pending = None

    def __call__(self, batch=None) -> None:
        pending, self.pending = self.pending, batch
        if pending is None:
            return
        a, b, host, event, ok = pending
        if event is not None:
            event.synchronize()
        computed = host.float().numpy()
        with np.errstate(over="ignore"):  # an overflow of the storage dtype is said by nonfinite_error
            host = computed.astype(self.features.dtype, copy=False)
        error = nonfinite_error(computed, host, ok, a, self.blocks, self.precision)
        if error is not None:
            raise error
        views = host[:, 1:] if self.views is not None else None
        self.features[a:b] = host[:, 0]
        if views is not None:
            self.views[a:b] = views
        self.valid[a:b] = ok
        self.digests[a:b] = row_digests(host[:, 0], views, ok)
        self.f.flush()  # the rows first, then the progress that claims them
        self.f.attrs["num_done"] = b
        self.f.flush()
        if self.on_checkpoint is not None:
            self.on_checkpoint(b, self.n)


def _run_extraction(f, ds: MultiDomainDataset, ext: _Extractor, config: ExtractConfig, num_done: int, progress: bool,
                    on_checkpoint) -> int:
    """The batched loop: decode in workers, forward on the device, write and flush one batch behind."""
    n = len(ds)
    if num_done >= n:
        return 0
    loader = image_loader(ds, ext.image_size, range(num_done, n), batch_size=config.batch_size,
                          workers=config.workers, views=config.views, views_seed=config.views_seed,
                          pin_memory=ext.dev.type == "cuda", transform=ext.transform)
    write = _BatchWriter(f, n, on_checkpoint, ext.blocks, ext.precision)
    done = num_done
    with progress_bar(n, "extracting", unit="img", enabled=progress, initial=num_done) as update, \
            torch.inference_mode():
        for images, view_images, rows, ok, errors in loader:
            bad = first_bad_image(ds, ok, rows, errors)
            if bad and not config.skip_bad_images:
                write()
                raise LinftError(f"cannot read image {bad}; fix or remove it, or pass skip_bad_images=True to record "
                                 f"and skip it", param="skip_bad_images")
            ok = ok.numpy()
            # one forward for the plain images and their views (no copy when there are no views)
            feats = ext(torch.cat([images[:, None], view_images], 1).flatten(0, 1) if config.views else images)
            feats = feats.view(len(ok), 1 + config.views, *feats.shape[1:])
            feats[torch.from_numpy(~ok).to(ext.dev)] = 0.0
            event = None
            if ext.dev.type == "cuda":
                feats = feats.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            write((done, done + len(ok), feats, event, ok))
            done += len(ok)
            update(len(ok))
        write()
    return done - num_done

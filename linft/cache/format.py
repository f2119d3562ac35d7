"""The feature cache file: its layout, its attributes, and reading it back.

One HDF5 file per (backbone, weights, dataset, transform), readable with ``h5ls``/``h5dump``:

* datasets ``features`` (N, K, D) float16/float32, optionally ``views``
  (N, V, K, D): the same features of V augmented views of every image
  (DomainBed's training augmentation, ``extract --views V``), ``labels`` (N,) int64,
  ``domains`` (N,) int64, ``paths`` (N,) utf-8 (``domain/class/file``),
  ``valid`` (N,) bool (False for images skipped with ``skip_bad_images``;
  their features are zero), ``digests`` (N,) uint64 (a digest of each row's stored bytes, by which a
  resumed extraction proves which rows reached the disk; optional: a cache without it is read, and verified without
  the row check);
* attributes: scalars as they are, lists and dicts as JSON text (see
  :data:`JSON_ATTRS`); ``complete`` says whether the file may be used and
  ``provenance_sha256`` identifies its content (records of later stages carry it).

:func:`open_cache` reads a complete file into memory and refuses others;
:func:`cache_info` reads the attributes of any linft cache, complete or not.
Both, and :mod:`linft.cache.verify`, check the file's structure with the same
functions (:func:`attribute_problems`, :func:`dataset_problems`,
:func:`content_problems`): a file that is HDF5 but was edited or is not
linft's is one :class:`~linft.errors.LinftError`, never a ``KeyError``.
Writing is :mod:`linft.cache.extract`; checking is :mod:`linft.cache.verify`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from linft.data.folders import MultiDomainDataset
from linft.errors import LinftError
from linft.output import PARTIAL_SUFFIX, is_count, partial_path

CACHE_FORMAT_VERSION = 1

#: Attributes stored as JSON text.
JSON_ATTRS = ("blocks", "domain_names", "class_names", "per_domain", "skipped_paths")

#: Attributes that determine the file's content; their hash is ``provenance_sha256``.
IDENTITY_ATTRS = (
    "format_version", "backbone", "weights_sha256", "blocks", "image_size", "transform",
    "dtype", "compute", "domain_names", "class_names", "num_examples", "file_list_sha256",
)

DTYPES = {"float16": np.float16, "float32": np.float32}

#: Attributes every cache holds: the identity, its hash, and what the readers and :func:`describe_cache` use.
REQUIRED_ATTRS = (*IDENTITY_ATTRS, "provenance_sha256", "feature_dim", "per_domain", "complete", "weights",
                  "weights_label", "dataset_name", "dataset_root", "linft_version", "torch_version",
                  "torchvision_version", "device", "created")


def default_cache_path(dataset: MultiDomainDataset, backbone: str, weights: str, folder="features_cache") -> Path:
    """``features_cache/<dataset>_<backbone>_<weights>.h5`` (weights file names lose their suffix)."""
    w = Path(str(weights)).stem if os.sep in str(weights) or str(weights).endswith((".pt", ".pth")) else str(weights)
    name = (dataset.name or dataset.root.name).replace(" ", "_")
    return Path(folder) / f"{name}_{backbone.replace(':', '-')}_{w}.h5"  # clip:ViT-B-32 -> clip-ViT-B-32


def provenance_sha256(attrs: dict) -> str:
    """Hash of the identity attributes (:data:`IDENTITY_ATTRS`): equal hashes mean the same content.

    Augmented views count only when present, so caches without them keep the
    hash they had before views existed.
    """
    identity = {k: attrs[k] for k in IDENTITY_ATTRS}
    if attrs.get("views"):
        identity.update(views=attrs["views"], views_transform=attrs["views_transform"], views_seed=attrs["views_seed"])
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def read_attrs(f: h5py.File) -> dict:
    """The file's attributes as Python values (JSON attributes decoded)."""
    out = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.generic):
            v = v.item()
        if k in JSON_ATTRS and isinstance(v, str):
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass  # left as text: attribute_problems names it
        out[k] = v
    return out


def write_attrs(f: h5py.File, attrs: dict) -> None:
    """Store ``attrs`` (JSON attributes as text)."""
    for k, v in attrs.items():
        # str() also turns str subclasses such as torch.__version__ into plain text
        f.attrs[k] = json.dumps(v) if k in JSON_ATTRS else (str(v) if isinstance(v, str) else v)


def identity_differences(a: dict, b: dict) -> list[str]:
    """The identity attributes in which two caches differ."""
    return [k for k in IDENTITY_ATTRS if a.get(k) != b.get(k)]


def existing_cache_attrs(path: Path) -> dict | None:
    """Attributes of an existing linft cache at ``path``, or None if it is not one (or unreadable).

    This is the check of a process about to write ``path`` (:mod:`linft.cache.extract`), so it opens the file
    with HDF5's lock: a file another process is writing is one LinftError (wait for it), not a file to take
    over. Readers that only look (:func:`open_h5`) take no lock.
    """
    try:
        with h5py.File(path, "r") as f:
            attrs = read_attrs(f)
            damaged = "provenance_sha256" not in attrs or bool(cache_problems(f, attrs)[0])
    except OSError as exc:
        if exc.errno == errno.EAGAIN or "unable to lock file" in str(exc).lower():
            raise LinftError(f"{path} is open for writing in another process; wait for it to finish") from None
        return None  # truncated or foreign: not a usable cache
    return None if damaged else attrs  # foreign, or edited (:func:`cache_problems`): not a usable cache



def row_digests(features: np.ndarray, views: np.ndarray | None, valid: np.ndarray) -> np.ndarray:
    """One 64-bit digest per row of its stored bytes (features, views, valid flag); never 0 (the fill value)."""
    out = np.empty(len(features), dtype=np.uint64)
    for i in range(len(features)):
        h = hashlib.blake2b(np.ascontiguousarray(features[i]).tobytes(), digest_size=8)
        if views is not None:
            h.update(np.ascontiguousarray(views[i]).tobytes())
        h.update(b"\x01" if valid[i] else b"\x00")
        out[i] = int.from_bytes(h.digest(), "little") | (1 << 63)
    return out


def digest_mismatches(f: h5py.File, rows: int, chunk: int = 4096, first_only: bool = False):
    """Yield the rows among the first ``rows`` of an open cache whose content does not match their stored digest,
    in order, reading ``chunk`` rows at a time (``first_only``: stop after the first)."""
    views = f["views"] if "views" in f else None
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        got = row_digests(f["features"][a:b], views[a:b] if views is not None else None, f["valid"][a:b])
        for i in np.flatnonzero(got != f["digests"][a:b]):
            yield a + int(i)
            if first_only:
                return


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

    def usable_counts(self) -> list[int]:
        """The number of usable images (``valid`` rows) of each domain, in ``domain_names`` order."""
        return np.bincount(self.domains[self.valid], minlength=len(self.domain_names)).tolist()

    def domain_indices(self, domain: int | str) -> np.ndarray:
        """Global row indices of one domain, in its own order (what :func:`linft.data.splits.split_indices` indexes)."""
        i = self.domain_names.index(domain) if isinstance(domain, str) else int(domain)
        return np.flatnonzero(self.domains == i)


def open_h5(path: Path) -> h5py.File:
    """The cache file at ``path`` opened read-only and without HDF5's file lock; a missing or unreadable file is
    one LinftError.

    Without the lock, a ``.partial`` file that an extraction is writing can be read while it runs (``linft cache
    info``, ``linft status``): what is read is the file as of the extraction's last flush (one per batch).
    Complete caches are never written in place (an extraction writes ``.partial`` and renames it), so reading
    them without the lock is safe.
    """
    if not path.exists():
        hint = f" (an unfinished extraction is at {partial_path(path)}; re-run its command)" \
            if partial_path(path).exists() else ""
        raise LinftError(f"feature cache {path} does not exist{hint}; create it with `linft extract`")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if path.name.endswith(PARTIAL_SUFFIX):
            raise LinftError(f"{path} cannot be read now ({reason}); if an extraction is writing it, try again in a "
                             f"moment, else re-run its `linft extract` command to finish it") from None
        raise LinftError(f"{path} is not a readable HDF5 file ({reason}); re-create it with `linft extract`") from None


def cache_attrs(f: h5py.File, path: Path) -> dict:
    """The attributes of an open linft cache; an HDF5 file that is not one is a LinftError."""
    meta = read_attrs(f)
    if "provenance_sha256" not in meta:
        raise LinftError(f"{path} is an HDF5 file but not a linft feature cache; create one with `linft extract`")
    return meta


def _names_problem(meta: dict, key: str) -> str | None:
    names = meta[key]
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
        return None
    return f"has a {key} attribute that is not a JSON list of distinct names ({str(names)[:40]})"


def attribute_problems(meta: dict, provenance: bool = True) -> list[str]:
    """What is wrong with a cache's attributes: missing ones, ones of the wrong type, and (with ``provenance``) a
    ``provenance_sha256`` that is not their hash (attributes edited after extraction). Each problem reads after
    "the cache ..."."""
    missing = [k for k in REQUIRED_ATTRS if k not in meta]
    if missing:
        more = f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""
        return [f"lacks the attribute{'s' if len(missing) > 1 else ''} {', '.join(missing[:4])}{more}"]
    problems = [p for p in (_names_problem(meta, k) for k in ("domain_names", "class_names", "blocks")) if p]
    problems += [f"has {k} {meta[k]!r}, not a whole number >= {least}"
                 for k, least in (("num_examples", 0), ("feature_dim", 1)) if not is_count(meta[k], least)]
    per_domain = meta["per_domain"]
    if not problems and not (isinstance(per_domain, dict) and all(
            isinstance(per_domain.get(d), dict) and is_count(per_domain[d].get("count"))
            for d in meta["domain_names"])):
        problems.append("has a per_domain attribute without the count of every domain")
    if meta.get("views") and not (is_count(meta["views"], 1) and "views_transform" in meta and "views_seed" in meta):
        problems.append(f"has views {meta['views']!r} without views_transform and views_seed")
    if provenance and not problems and _hash_or_none(meta) != meta["provenance_sha256"]:
        problems.append("has attributes edited after extraction (provenance_sha256 is not their hash)")
    return problems


def _hash_or_none(meta: dict) -> str | None:
    try:
        return provenance_sha256(meta)
    except TypeError:  # an identity attribute edited into an array, which JSON cannot hold
        return None


def expected_datasets(meta: dict) -> dict[str, tuple]:
    """Each dataset of a cache with attributes ``meta`` (free of :func:`attribute_problems`) and its shape."""
    n, row = meta["num_examples"], (len(meta["blocks"]), meta["feature_dim"])
    shapes = {"features": (n, *row), "labels": (n,), "domains": (n,), "paths": (n,), "valid": (n,)}
    if meta.get("views"):
        shapes["views"] = (n, meta["views"], *row)
    return shapes


def _kind_ok(name: str, ds: h5py.Dataset) -> bool:
    if name in ("features", "views"):
        return ds.dtype.kind == "f"
    if name in ("labels", "domains"):
        return ds.dtype.kind in "iu"
    return ds.dtype == np.bool_ if name == "valid" else h5py.check_string_dtype(ds.dtype) is not None


def dataset_problems(f: h5py.File, meta: dict) -> list[str]:
    """Missing datasets, and datasets of the wrong shape or type, against the attributes ``meta`` (free of
    :func:`attribute_problems`)."""
    shapes = expected_datasets(meta)
    missing = [k for k in shapes if not isinstance(f.get(k), h5py.Dataset)]
    if missing:
        return [f"lacks the dataset{'s' if len(missing) > 1 else ''} {', '.join(missing)}"]
    return [f"has a {k} dataset of shape {f[k].shape} and type {f[k].dtype} (expected shape {want})"
            for k, want in shapes.items() if f[k].shape != want or not _kind_ok(k, f[k])]


def content_problems(labels: np.ndarray, domains: np.ndarray, meta: dict) -> list[str]:
    """Class and domain ids outside the ``class_names`` and ``domain_names`` lists."""
    problems = []
    for name, ids, names in (("labels", labels, meta["class_names"]), ("domains", domains, meta["domain_names"])):
        bad = np.flatnonzero((ids < 0) | (ids >= len(names)))
        if bad.size:
            problems.append(f"has {bad.size} {name} outside 0..{len(names) - 1} ({int(ids[bad[0]])} in row {bad[0]})")
    return problems


def cache_problems(f: h5py.File, meta: dict) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
    """THE structural check of an open cache: the problems of its attributes, else of its datasets, else of its ids;
    with the labels and domains it read (None when it could not)."""
    problems = attribute_problems(meta) or dataset_problems(f, meta)
    if problems:
        return problems, None, None
    labels, domains = f["labels"][...], f["domains"][...]
    return content_problems(labels, domains, meta), labels, domains


def check_cache(f: h5py.File, meta: dict, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Refuse, in one line, a cache whose attributes, datasets or ids are unusable; returns its labels and domains."""
    problems, labels, domains = cache_problems(f, meta)
    if problems:
        raise LinftError(f"{path} is not a usable linft feature cache: it {'; it '.join(problems)}; re-create it "
                         f"with `linft extract` (`linft cache verify {path}` lists every check)")
    return labels, domains


def read_paths(f: h5py.File) -> list[str]:
    """The ``paths`` dataset as ``str``."""
    return [p.decode() if isinstance(p, bytes) else p for p in f["paths"][...]]


def cache_info(path: str | os.PathLike) -> dict:
    """The attributes and dataset shapes of a cache (complete or not), without reading the features."""
    path = Path(path)
    with open_h5(path) as f:
        info = cache_attrs(f, path)
        check_cache(f, info, path)
        info["datasets"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in f.items()}
    info["path"] = str(path)
    info["file_bytes"] = path.stat().st_size
    return info


def nonfinite_rows(array, rows: int, chunk_rows: int = 4096) -> np.ndarray:
    """Which of the first ``rows`` rows of ``array`` (in memory, an HDF5 dataset, or rows left in the file) hold a
    NaN or ±inf, read ``chunk_rows`` at a time."""
    bad = np.zeros(rows, bool)
    for a in range(0, rows, chunk_rows):
        block = np.asarray(array[a:min(rows, a + chunk_rows)])
        bad[a:a + len(block)] = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    return bad


def refuse_nonfinite(path: Path, arrays, rows: int) -> None:
    """One LinftError naming the cache ``path`` when a row of ``arrays`` (its features, its views) is not finite:
    nothing is trained on such a cache (its runs would "diverge" for a reason that is not the learning rate)."""
    bad = np.zeros(rows, bool)
    for array in arrays:
        bad |= nonfinite_rows(array, rows)
    if bad.any():
        raise LinftError(f"the feature cache {path} holds {int(bad.sum())} row{'s' if bad.sum() > 1 else ''} of NaN or "
                         f"inf features (of {rows}; the first: {int(np.flatnonzero(bad)[0])}): nothing can be trained "
                         f"on them; run `linft cache verify {path}`, then extract it again (check the weights; store "
                         f"float32 where float16 overflowed)")


def open_cache(path: str | os.PathLike, read_array=None) -> FeatureCache:
    """Read a complete cache into memory (one read per dataset); refuses incomplete files.

    ``read_array(name, dataset)`` reads ``features`` and ``views`` (default: into memory;
    :func:`linft.cache.chunks.open_cache_within` leaves those that do not fit a budget in the file).
    """
    read = read_array or (lambda name, dataset: dataset[...])
    path = Path(path)
    with open_h5(path) as f:
        meta = cache_attrs(f, path)
        if is_count(meta.get("format_version")) and meta["format_version"] > CACHE_FORMAT_VERSION:
            raise LinftError(f"{path} was written by a newer linft (format {meta['format_version']}); upgrade linft")
        labels, domains = check_cache(f, meta, path)
        if not meta.get("complete"):
            raise LinftError(
                f"{path} is an unfinished extraction ({meta.get('num_done', 0)} of {meta['num_examples']} images); "
                f"re-run the same `linft extract` command to finish it"
            )
        features = read("features", f["features"])
        views = read("views", f["views"]) if "views" in f else None
        refuse_nonfinite(path, [a for a in (features, views) if a is not None], len(labels))
        return FeatureCache(path=path, features=features, labels=labels, domains=domains, paths=read_paths(f),
                            valid=f["valid"][...], meta=meta, views=views)


def describe_cache(info: dict) -> str:
    """A :func:`cache_info` dict as aligned ``name  value`` lines for people."""
    n, done = info["num_examples"], info.get("num_done", 0)
    state = "complete" if info.get("complete") else f"UNFINISHED ({done} of {n} images)"
    feats = info["datasets"]["features"]
    rows = [
        ("file", f"{info['path']} ({info['file_bytes'] / 2**20:.1f} MiB, {state})"),
        ("dataset", f"{info['dataset_name']} at {info['dataset_root']}"),
        ("images", f"{n} in {len(info['domain_names'])} domains, {len(info['class_names'])} classes"),
        ("domains", ", ".join(f"{d} ({info['per_domain'][d]['count']})" for d in info["domain_names"])),
        ("backbone", f"{info['backbone']}, weights {info['weights']} ({info['weights_label']}), "
                     f"sha256 {info['weights_sha256'][:16]}"),
        ("blocks", ", ".join(info["blocks"])),
        ("features", f"{tuple(feats['shape'])} {feats['dtype']}, computed in {info['compute']}"),
        ("transform", info["transform"]),
        *([("views", f"{info['views']} augmented views per image: {info['views_transform']}, "
                     f"seed {info['views_seed']}")]
          if info.get("views") else []),
        ("file list", f"sha256 {info['file_list_sha256'][:16]}"),
        ("provenance", info["provenance_sha256"]),
        ("made with", f"linft {info['linft_version']}, torch {info['torch_version']}, "
                      f"torchvision {info['torchvision_version']} on {info['device']}, {info['created']}"),
    ]
    skipped = info.get("skipped_paths") or []
    if skipped:
        rows.append(("skipped", f"{len(skipped)} unreadable images: {', '.join(skipped[:3])}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

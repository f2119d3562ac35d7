"""Checking a feature cache against its own attributes, and optionally against the image folder it came from.

:func:`verify_cache` runs every check of :data:`CHECKS` (each a small function
of the open file, its attributes and its paths, returning ``(passed, detail)``) and never
stops at the first failure: the report lists them all. The structural checks
are those every reader makes (:func:`linft.cache.format.attribute_problems`,
:func:`~linft.cache.format.dataset_problems`, :func:`~linft.cache.format.content_problems`),
reported here as failed checks: a file whose content cannot be read as a cache
(a dataset or attribute missing) fails the check that needs it, with what is
missing as the detail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from linft.cache.format import (attribute_problems, cache_attrs, content_problems, dataset_problems, expected_datasets,
                                digest_mismatches, nonfinite_rows, open_h5, read_paths)
from linft.data.folders import file_list_sha256, load_image_folder


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_cache`: one ``(check, passed, detail)`` per check."""

    path: Path
    checks: list[tuple[str, bool, str]]

    @property
    def ok(self) -> bool:
        return all(passed for _, passed, _ in self.checks)


def _required(paths: list[str] | None) -> list[str]:
    if paths is None:
        raise KeyError("the cache has no 'paths' dataset")
    return paths


def _num_examples(meta: dict) -> int:
    return int(meta["num_examples"])


def check_complete(f: h5py.File, meta: dict, paths: list[str] | None) -> tuple[bool, str]:
    if meta.get("complete"):
        return True, "marked complete"
    return False, f"unfinished: {meta.get('num_done', 0)} of {_num_examples(meta)} images; re-run the extract command"


def _problems(problems: list[str], passed: str) -> tuple[bool, str]:
    return (False, "the cache " + "; it ".join(problems)) if problems else (True, passed)


def check_provenance(f: h5py.File, meta: dict, paths: list[str] | None) -> tuple[bool, str]:
    return _problems(attribute_problems(meta), meta["provenance_sha256"][:16])


def check_shapes(f: h5py.File, meta: dict, paths: list[str] | None) -> tuple[bool, str]:
    if attribute_problems(meta, provenance=False):
        return False, "cannot check: attributes are missing or unusable (see provenance)"
    return _problems(dataset_problems(f, meta), f"features {expected_datasets(meta)['features']}")


def check_file_list(f: h5py.File, meta: dict, paths: list[str] | None) -> tuple[bool, str]:
    if file_list_sha256(_required(paths)) == meta["file_list_sha256"]:
        return True, "paths match file_list_sha256"
    return False, "paths differ from file_list_sha256"


def check_domain_counts(f: h5py.File, meta: dict, paths: list[str] | None) -> tuple[bool, str]:
    counts = np.bincount(f["domains"][...], minlength=len(meta["domain_names"])).tolist()
    want = [meta["per_domain"][d]["count"] for d in meta["domain_names"]]
    return counts == want, f"{dict(zip(meta['domain_names'], counts))}"


def check_labels(f: h5py.File, meta: dict, paths: list[str] | None) -> tuple[bool, str]:
    domains, labels, paths = f["domains"][...], f["labels"][...], _required(paths)
    names, classes = meta["domain_names"], meta["class_names"]
    out_of_range = content_problems(labels, domains, meta)
    if out_of_range:
        return _problems(out_of_range, "")
    ok = len(paths) == len(domains) == len(labels) and all(
        p.split("/")[0] == names[d] and p.split("/")[1] == classes[y] for p, d, y in zip(paths, domains, labels))
    return bool(ok), "labels and domains agree with paths" if ok else "labels or domains disagree with paths"


def _rows_written(meta: dict) -> int:
    """Rows the file holds: all of them in a complete cache, else the ones an interrupted extraction wrote."""
    return _num_examples(meta) if meta.get("complete") else int(meta.get("num_done", 0))


def check_finite(f: h5py.File, meta: dict, paths: list[str] | None, chunk_rows: int = 4096) -> tuple[bool, str]:
    done = _rows_written(meta)
    bad_rows = sum(int(nonfinite_rows(f[name], done, chunk_rows).sum())
                   for name in (("features", "views") if "views" in f else ("features",)))
    return bad_rows == 0, f"{bad_rows} rows with NaN/inf" if bad_rows else f"{done} rows finite"


def check_digests(f: h5py.File, meta: dict, paths: list[str] | None, chunk_rows: int = 4096) -> tuple[bool, str]:
    """Every written row's content against the digest stored with it; passes, saying so, on a cache without digests."""
    if "digests" not in f:
        return True, "no row digests (made by an earlier linft)"
    done = _rows_written(meta)
    bad = list(digest_mismatches(f, done, chunk_rows))
    if bad:
        return False, f"{len(bad)} rows differ from their digest (first: row {bad[0]}); re-extract it (force=True)"
    return True, f"{done} rows match their digests"


#: The checks of :func:`verify_cache`, in report order.
CHECKS = {"complete": check_complete, "provenance": check_provenance, "shapes": check_shapes,
          "file list": check_file_list, "domain counts": check_domain_counts, "labels": check_labels,
          "finite": check_finite, "digests": check_digests}


def check_dataset_folder(meta: dict, paths: list[str], data: str | os.PathLike) -> tuple[bool, str]:
    """Whether the folder ``data`` still holds the files the cache was made from."""
    ds = load_image_folder(data)
    if ds.file_list_sha256 == meta["file_list_sha256"]:
        return True, f"{ds.root} has the same {len(ds)} files"
    added, removed = sorted(set(ds.paths) - set(paths)), sorted(set(paths) - set(ds.paths))
    return False, (f"{ds.root} differs: {len(added)} added ({', '.join(added[:3])}), "
                   f"{len(removed)} removed ({', '.join(removed[:3])})")


def verify_cache(path: str | os.PathLike, data: str | os.PathLike | None = None) -> VerifyReport:
    """Check a cache: completeness, provenance hash, shapes, counts, file-list hash, labels, finite features.

    With ``data`` (a dataset folder) the file list of that folder must match
    the one the cache was made from.
    """
    path = Path(path)
    checks: list[tuple[str, bool, str]] = []
    with open_h5(path) as f:
        meta = cache_attrs(f, path)
        paths = read_paths(f) if "paths" in f else None  # read once: DomainNet has 586,575 of them
        for name, check in CHECKS.items():
            try:
                passed, detail = check(f, meta, paths)
            except (KeyError, ValueError, TypeError, IndexError) as exc:  # a dataset or attribute is missing
                passed, detail = False, f"cannot check: {type(exc).__name__} {exc}"
            checks.append((name, passed, detail))
        skipped = meta.get("skipped_paths", [])
        if skipped:
            checks.append(("skipped images", True, f"{len(skipped)} skipped: {', '.join(skipped[:3])}"))
    if data is not None:
        checks.append(("dataset folder", *check_dataset_folder(meta, paths or [], data)))
    return VerifyReport(path, checks)

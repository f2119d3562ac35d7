"""Caches larger than memory: the features and views read from the HDF5 file in chunks, within a memory budget.

:func:`open_cache_within` reads a complete cache like :func:`~linft.cache.format.open_cache`, but keeps
``features`` and ``views`` in the file (as :class:`H5Rows`) when they do not fit ``memory_budget`` bytes: the
features first, then the views. An :class:`H5Rows` reads contiguous slices (``rows[a:b]``, what an evaluation
reads chunk by chunk) and sorted row sets (:meth:`H5Rows.take`, what the linear engine reads for a window of
steps, :mod:`linft.train.linear.engine`).
"""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import numpy as np
import torch

from linft.cache.format import FeatureCache, open_cache, open_h5
from linft.errors import LinftError
from linft.output import human_bytes


class H5Rows:
    """A features or views dataset left in its HDF5 file: ``shape``, ``dtype`` (torch), slices and row sets."""

    def __init__(self, path: Path, name: str):
        self.file = open_h5(Path(path))
        self.dataset = self.file[name]
        self.shape = tuple(self.dataset.shape)
        self.dtype = torch.from_numpy(np.zeros(0, self.dataset.dtype)).dtype
        weakref.finalize(self, self.file.close)  # the HDF5 handle lives as long as this object

    def __getitem__(self, index: slice) -> np.ndarray:
        return self.dataset[index]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The rows ``rows`` (sorted, unique), read in runs of consecutive rows."""
        out = np.empty((len(rows),) + self.shape[1:], self.dataset.dtype)
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
            out[lo:hi] = self.dataset[rows[lo]:rows[hi - 1] + 1]
        return out


def open_cache_within(path: str | os.PathLike, memory_budget: int | None) -> FeatureCache:
    """A complete cache (:func:`~linft.cache.format.open_cache`, the same checks) with ``features``, then
    ``views``, in memory while they fit ``memory_budget`` bytes (None: no limit), the others as :class:`H5Rows`."""
    left = float("inf") if memory_budget is None else memory_budget

    def read(name, dataset):
        nonlocal left
        size = int(np.prod(dataset.shape)) * dataset.dtype.itemsize
        if size <= left:
            left -= size
            return dataset[...]
        left = 0  # the views are not read into memory when the features were not
        return H5Rows(path, name)

    return open_cache(path, read)


def in_memory_bytes(cache: FeatureCache) -> int:
    """Bytes of the cache's features and views held in memory (not :class:`H5Rows`)."""
    return sum(a.nbytes for a in (cache.features, cache.views) if a is not None and not isinstance(a, H5Rows))


def memory_budget_bytes(budget: float | None) -> int | None:
    """A memory budget in bytes as an int: None or +inf is no limit; NaN, zero or less is one LinftError that
    shows the budget in GiB (as ``--memory-gib`` takes it), not in bytes."""
    if budget is None or budget == math.inf:
        return None
    if not budget > 0:  # NaN too
        shown = "nan" if math.isnan(budget) else f"{budget / 2**30:g} GiB"
        raise LinftError(f"memory_budget must be positive, got {shown}; give a number of GiB above 0, or "
                         f"none for no limit", param="memory_budget")
    return int(budget)


def window_steps(rows_per_step: int, row_bytes: int, memory_budget: int | None, total_steps: int) -> int:
    """How many steps' rows one read from the file serves within ``memory_budget`` (at least 1; a LinftError
    naming the size needed when even one step's rows do not fit)."""
    if memory_budget is None:
        return total_steps
    one = rows_per_step * row_bytes  # the most one step reads (every drawn row distinct)
    if one > memory_budget:
        raise LinftError(f"one training step reads {human_bytes(one)} of cached rows, more than the memory budget "
                         f"of {human_bytes(memory_budget)} left for them; raise memory_budget to at least "
                         f"{human_bytes(one)} more", param="memory_budget")
    return max(1, min(total_steps, memory_budget // one))

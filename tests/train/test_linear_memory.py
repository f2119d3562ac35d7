"""Caches larger than memory: train-linear reads what does not fit its memory budget from the file in chunks."""

import h5py
import numpy as np
import pytest

from linft.cache.chunks import H5Rows, open_cache_within
from linft.cache.format import write_attrs
from linft.errors import LinftError
from linft.protocol.records import read_records
from linft.train.linear import train_linear
from linft.train.linear_engine import LinearGridConfig

from helpers import synthetic_cache


def cache_file(tmp_path):
    """The synthetic cache (90 rows, K = 3, D = 6, float32) with 2 views, written as an HDF5 cache file."""
    cache = synthetic_cache(tmp_path)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        for name in ("features", "labels", "domains", "valid"):
            f[name] = getattr(cache, name)
        f["views"] = np.stack([cache.features, 0.5 * cache.features], 1)
        f["paths"] = np.array(cache.paths, dtype=h5py.string_dtype())
        write_attrs(f, {**cache.meta, "complete": True, "format_version": 1})
    return path, cache.features.nbytes


def run(path, out, budget):
    config = LinearGridConfig(steps=12, batch_size=4, eval_every=5)
    train_linear(path, out, dropouts=(0.0, 0.9), probe=True, lrs=(0.05,), weight_decays=(1e-3,), seeds=1,
                 config=config, device="cpu", progress=False, memory_budget=budget)
    return [(r["run_id"], r["step"], r["splits"], r["loss"]) for r in read_records([out])]


def test_training_from_the_file_within_a_memory_budget(tmp_path):
    path, feature_bytes = cache_file(tmp_path)
    step_bytes = 3 * 2 * 4 * (2 * 3 * 6 * 4)  # 3 groups x 2 training domains x 4 rows, each row's 2 views
    in_memory = run(path, tmp_path / "all", None)
    # the views (twice the features) do not fit: they are read from the file three steps at a time
    budget = feature_bytes + 3 * step_bytes
    cache = open_cache_within(path, budget)
    assert isinstance(cache.features, np.ndarray) and isinstance(cache.views, H5Rows)
    assert run(path, tmp_path / "views", budget) == in_memory  # the same rows, read from the file: the same numbers
    # neither fits: the evaluations also read the features from the file, and training reads one step at a time
    budget = feature_bytes - 1
    assert budget >= step_bytes
    cache = open_cache_within(path, budget)
    assert isinstance(cache.features, H5Rows) and isinstance(cache.views, H5Rows)
    assert run(path, tmp_path / "none", budget) == in_memory
    with pytest.raises(LinftError, match=r"one training step reads .* raise memory_budget to at least"):
        run(path, tmp_path / "small", step_bytes - 1)

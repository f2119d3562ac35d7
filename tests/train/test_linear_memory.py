"""Caches larger than memory: train-linear reads what does not fit its memory budget from the file in chunks."""

import h5py
import numpy as np
import pytest

from linft.cache.chunks import H5Rows, open_cache_within
from linft.cache.extract import ExtractConfig, extract_features
from linft.errors import LinftError
from linft.protocol.records import read_records
from linft.train.linear.driver import train_linear
from linft.train.linear.engine import LinearGridConfig

from conftest import make_image_folder


def cache_file(tmp_path):
    """A real cache file (resnet18 with random weights, 32 px, the toy image folder) with 2 augmented views."""
    path = tmp_path / "c.h5"
    extract_features(make_image_folder(tmp_path / "toy"), path, ExtractConfig(
        backbone="resnet18", weights="none", image_size=32, batch_size=8, device="cpu", dtype="float32", views=2),
        progress=False)
    with h5py.File(path, "r") as f:
        return path, f["features"].size * 4, f["views"].shape


def run(path, out, budget):
    config = LinearGridConfig(steps=12, batch_size=1, eval_every=5)
    train_linear(path, out, dropouts=(0.0, 0.9), probe=True, lrs=(0.05,), weight_decays=(1e-3,), seeds=1,
                 config=config, device="cpu", progress=False, memory_budget=budget)
    return [(r["run_id"], r["step"], r["splits"], r["loss"]) for r in read_records([out])]


def test_training_from_the_file_within_a_memory_budget(tmp_path):
    path, feature_bytes, (_, V, K, D) = cache_file(tmp_path)
    domains = len(open_cache_within(path, None).domain_names)
    step_bytes = domains * (domains - 1) * 1 * (V * K * D * 4)  # groups x training domains x 1 row, its views
    in_memory = run(path, tmp_path / "all", None)
    # the views (twice the features) do not fit: they are read from the file two steps at a time
    budget = feature_bytes + 2 * step_bytes
    assert budget < 3 * feature_bytes
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


@pytest.mark.parametrize("gib", ["nan", "-1", "0", "-inf"])
def test_a_memory_budget_that_is_not_a_positive_size_is_refused_in_gib(tmp_path, gib):
    from click.testing import CliRunner

    from conftest import assert_one_line_error
    from linft.cli.main import main

    path, _, _ = cache_file(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["train-linear", str(path), "--out", str(tmp_path / "o"), "--memory-gib", gib,
                                       "--steps", "2", "--seeds", "1", "--quiet"])
    assert_one_line_error(result, "memory")
    assert "1073741824" not in result.output  # the budget as the user wrote it, not in bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_an_infinite_memory_budget_means_no_limit(tmp_path):
    from linft.cache.chunks import memory_budget_bytes

    assert memory_budget_bytes(float("inf")) is None and memory_budget_bytes(None) is None
    assert memory_budget_bytes(2.5 * 2**30) == int(2.5 * 2**30)
    with pytest.raises(LinftError) as info:
        memory_budget_bytes(float("nan"))
    assert info.value.param == "memory_budget"

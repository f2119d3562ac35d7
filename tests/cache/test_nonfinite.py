"""Non-finite features are caught where they are made (extract) and before anything trains on them (train-linear,
LP-FT): one line naming the rows, the block, the storage dtype and the fix."""


import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from linft.cache import extract_features, open_cache
from linft.errors import LinftError
from linft.cli.main import main

from conftest import assert_one_line_error, make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def weights(tmp_path, name, change):
    """resnet18 weights (random, seeded) changed by ``change(state)``, saved under ``name``."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    change(state)
    path = tmp_path / name
    torch.save(state, path)
    return path


def extract(data, out, weights_path, *extra):
    return CliRunner().invoke(main, ["extract", str(data), "--out", str(out), "--backbone", "resnet18", "--weights",
                                     str(weights_path), "--image-size", "32", "--batch-size", "4", "--quiet",
                                     "--device", "cpu", *extra])


@pytest.fixture
def toy(tmp_path):
    return make_image_folder(tmp_path / "toy")


def test_weights_that_give_nan_features_are_refused_with_nothing_left(toy, tmp_path):
    path = weights(tmp_path, "nan.pt", lambda s: s["layer4.1.bn2.bias"].fill_(float("nan")))
    before = snapshot(tmp_path)
    result = extract(toy, tmp_path / "c.h5", path)
    assert_one_line_error(result, "layer4.1", "weights")
    assert snapshot(tmp_path) == before  # no cache, no .partial, no lock


def test_features_that_overflow_float16_name_the_dtype(toy, tmp_path):
    path = weights(tmp_path, "big.pt", lambda s: s["layer4.1.bn2.weight"].mul_(1e7))
    before = snapshot(tmp_path)
    result = extract(toy, tmp_path / "c.h5", path)  # float16 storage: the default
    assert_one_line_error(result, "float16", "float32")
    assert snapshot(tmp_path) == before
    ok = extract(toy, tmp_path / "c.h5", path, "--dtype", "float32")  # the fix it names works
    assert ok.exit_code == 0, ok.output
    assert np.isfinite(open_cache(tmp_path / "c.h5").features).all()


@pytest.fixture
def nan_cache(toy, tmp_path):
    """A complete float32 cache, then a NaN written into one row of its features (a cache made before this check,
    or damaged)."""
    path = tmp_path / "c.h5"
    extract_features(toy, path, backbone="resnet18", weights="none", image_size=32, batch_size=4, device="cpu",
                     dtype="float32", progress=False)
    with h5py.File(path, "r+") as f:
        row = f["features"][3]
        row[0, 0] = np.nan
        f["features"][3] = row
    return path


def test_train_linear_refuses_a_cache_with_nan_rows_before_training(nan_cache, tmp_path):
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["train-linear", str(nan_cache), "--out", str(tmp_path / "runs"), "--steps", "2",
                                       "--seeds", "1", "--quiet"])
    assert_one_line_error(result, str(nan_cache), "cache verify")
    assert "diverged" not in result.output and "--lr" not in result.output
    assert snapshot(tmp_path) == before


def test_a_cache_with_nan_rows_is_refused_however_it_is_opened(nan_cache):
    from linft.cache.chunks import open_cache_within

    for budget in (None, 1):  # in memory, and left in the file
        with pytest.raises(LinftError, match="1 row"):
            open_cache_within(nan_cache, budget)


def test_lp_ft_refuses_a_cache_with_nan_rows_before_training(nan_cache):
    from linft.train.finetune.lp_ft import lp_ft_identity
    from linft.train.finetune.model import FineTuneConfig

    with pytest.raises(LinftError, match="cache verify") as info:
        lp_ft_identity(FineTuneConfig(lp_ft_cache=str(nan_cache)))
    assert str(nan_cache) in str(info.value)

"""linft.cache.format: the cache file's layout and attributes, reading it back, refusing other files."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from linft.cache import default_cache_path, extract_features, open_cache
from linft.data import load_image_folder
from linft.errors import LinftError

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0,
             device="cpu", progress=False)


def test_float16_storage_and_readable_by_plain_h5py(image_folder, tmp_path):
    extract_features(image_folder, tmp_path / "a.h5", dtype="float32", **SMALL)
    extract_features(image_folder, tmp_path / "b.h5", **SMALL)  # default float16
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f["features"].dtype == np.float16
        assert bool(f.attrs["complete"]) and json.loads(f.attrs["blocks"]) == ["layer4.0", "layer4.1"]
        half = f["features"][...]
    single = open_cache(tmp_path / "a.h5").features
    # float16 rounding of float32 values: relative error at most 2**-11
    np.testing.assert_allclose(half, single, rtol=2e-3, atol=2e-3)
    # both files come from the same float32 computation (same code path, run twice): storage is only the cast
    np.testing.assert_array_equal(half, single.astype(np.float16))


def test_open_cache_refuses_foreign_files(tmp_path):
    with pytest.raises(LinftError, match="does not exist"):
        open_cache(tmp_path / "none.h5")
    (tmp_path / "t.h5").write_text("text")
    with pytest.raises(LinftError, match="not a readable HDF5 file"):
        open_cache(tmp_path / "t.h5")
    with h5py.File(tmp_path / "o.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(LinftError, match="not a linft feature cache"):
        open_cache(tmp_path / "o.h5")


def test_default_cache_path(image_folder):
    ds = load_image_folder(image_folder, name="PACS")
    assert default_cache_path(ds, "resnet50", "IMAGENET1K_V2") == Path("features_cache/PACS_resnet50_IMAGENET1K_V2.h5")
    assert default_cache_path(ds, "resnet50", "/x/my ckpt.pt").name == "PACS_resnet50_my ckpt.h5"

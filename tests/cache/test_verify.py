"""linft.cache.verify: every check runs and is reported, tampering and folder changes are found."""

import shutil

import h5py
import numpy as np
import pytest

from linft.cache import extract_features, verify_cache
from linft.cache.verify import CHECKS

from conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0,
             device="cpu", progress=False)


def test_verify_detects_tampering_and_folder_changes(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract_features(image_folder, out, **SMALL)
    report = verify_cache(out, image_folder)
    assert report.ok, report.checks
    make_image_folder(image_folder, domains=("domA",), classes=("cat",), per_class=4, seed=5, ext=".jpg")
    report = verify_cache(out, image_folder)
    assert not report.ok
    assert any(name == "dataset folder" and "4 added" in detail and "domA/cat/img00.jpg" in detail
               for name, _, detail in report.checks)
    with h5py.File(out, "r+") as f:
        f.attrs["image_size"] = 64
        f["features"][0, 0, 0] = np.nan
    failed = {name for name, ok, _ in verify_cache(out).checks if not ok}
    assert failed == {"provenance", "finite", "digests"}  # the NaN row no longer matches its digest either


def test_verify_finds_a_silently_changed_row_by_its_digest(verified_cache, tmp_path):
    """A finite, plausible change (bit rot, an edit) that no other check sees."""
    out = tmp_path / "c.h5"
    shutil.copy(verified_cache, out)
    with h5py.File(out, "r+") as f:
        f["features"][3, 0, 0] = f["features"][3, 0, 0] + 0.5
    report = verify_cache(out)
    assert {name for name, ok, _ in report.checks if not ok} == {"digests"}
    assert any("1 rows differ from their digest (first: row 3)" in detail for _, _, detail in report.checks)
    with h5py.File(out, "r+") as f:
        del f["digests"]  # as an earlier linft wrote it: nothing to prove, nothing failed
    assert verify_cache(out).ok


@pytest.fixture(scope="module")
def verified_cache(tmp_path_factory):
    """A complete cache that passes every check (made once for the tests that break copies of it)."""
    root = tmp_path_factory.mktemp("verify")
    folder = make_image_folder(root / "toy")
    out = root / "c.h5"
    extract_features(folder, out, **SMALL)
    assert verify_cache(out).ok
    return out


@pytest.mark.parametrize("dataset,failing", [("valid", {"shapes", "digests"}),
                                             ("features", {"shapes", "finite", "digests"})])
def test_a_missing_dataset_is_a_failed_check_not_a_traceback(verified_cache, tmp_path, dataset, failing):
    broken = tmp_path / "broken.h5"
    shutil.copy(verified_cache, broken)
    with h5py.File(broken, "r+") as f:
        del f[dataset]
    report = verify_cache(broken)  # no KeyError
    assert not report.ok
    assert [name for name, _, _ in report.checks] == list(CHECKS)  # every check ran and is reported
    failed = {name: detail for name, ok, detail in report.checks if not ok}
    assert set(failed) == failing
    assert all(dataset in detail for detail in failed.values()), failed  # the detail names what is missing

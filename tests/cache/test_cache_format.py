"""linft.cache.format: the cache file's layout and attributes, reading it back, refusing other files."""

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from linft.cache import cache_info, default_cache_path, extract_features, open_cache, verify_cache
from linft.cache.verify import CHECKS
from linft.cli.main import main
from linft.data import load_image_folder
from linft.errors import LinftError

from conftest import assert_one_line_error, make_image_folder

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


# -- HDF5 files that are not linft's or were edited: every reader refuses them in one line ------------------------

TRAIN = ["--steps", "2", "--eval-every", "1", "--seeds", "1", "--lr", "1e-3", "--weight-decay", "0", "--device", "cpu",
         "--quiet"]


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory):
    """A complete cache of 3 domains x 2 classes x 3 images, made once for the tests that edit copies of it."""
    root = tmp_path_factory.mktemp("edits")
    out = root / "c.h5"
    extract_features(make_image_folder(root / "toy"), out, **SMALL)
    return out


def _rewrite(f, name, values):
    del f[name]
    f[name] = values


#: (edit of the open file, a fragment the error names)
EDITS = {
    "no features": (lambda f: f.__delitem__("features"), "features"),
    "no valid": (lambda f: f.__delitem__("valid"), "valid"),
    "no num_examples": (lambda f: f.attrs.__delitem__("num_examples"), "num_examples"),
    "only a provenance": (lambda f: [f.attrs.__delitem__(k) for k in list(f.attrs) if k != "provenance_sha256"],
                          "lacks the attributes format_version"),
    "labels too short": (lambda f: _rewrite(f, "labels", f["labels"][:-1]), "labels"),
    "valid not bool": (lambda f: _rewrite(f, "valid", np.ones(len(f["valid"]), np.int64)), "valid"),
    "class renamed": (lambda f: f.attrs.__setitem__("class_names", json.dumps(["cat", "cow"])), "edited"),
    "class removed": (lambda f: f.attrs.__setitem__("class_names", json.dumps(["cat"])), "edited"),
    "class_names not JSON": (lambda f: f.attrs.__setitem__("class_names", "[cat"), "class_names"),
    "label 99": (lambda f: f["labels"].__setitem__(0, 99), "99"),
    "label -1": (lambda f: f["labels"].__setitem__(4, -1), "-1"),
    "domain 7": (lambda f: f["domains"].__setitem__(2, 7), "7"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_every_reader_refuses_an_edited_cache_in_one_line(good_cache, tmp_path, edit):
    change, fragment = EDITS[edit]
    broken = tmp_path / "broken.h5"
    broken.write_bytes(good_cache.read_bytes())
    with h5py.File(broken, "r+") as f:
        change(f)
    for read in (cache_info, open_cache):
        with pytest.raises(LinftError, match="not a usable linft feature cache") as caught:
            read(broken)
        assert fragment in str(caught.value)
    assert_one_line_error(CliRunner().invoke(main, ["cache", "info", str(broken)]), fragment)
    assert_one_line_error(CliRunner().invoke(main, ["cache", "info", str(broken), "--json"]), fragment)
    out = tmp_path / "runs"
    assert_one_line_error(CliRunner().invoke(main, ["train-linear", str(broken), "--out", str(out), *TRAIN]), fragment)
    assert not out.exists()  # refused before anything was written
    report = verify_cache(broken)  # a failed check, not an exception
    assert not report.ok and [c for c, _, _ in report.checks] == list(CHECKS)
    assert any(fragment in detail for _, ok, detail in report.checks if not ok), report.checks
    result = CliRunner().invoke(main, ["cache", "verify", str(broken)])
    assert result.exit_code == 1 and "Traceback" not in result.output and "verification FAILED" in result.output


def test_a_cache_edited_after_records_were_appended_is_refused_and_the_records_kept(good_cache, tmp_path):
    cache, out = tmp_path / "c.h5", tmp_path / "runs"
    cache.write_bytes(good_cache.read_bytes())
    assert CliRunner().invoke(main, ["train-linear", str(cache), "--out", str(out), *TRAIN]).exit_code == 0
    records = (out / "records.jsonl").read_bytes()
    with h5py.File(cache, "r+") as f:
        f.attrs["class_names"] = json.dumps(["dog", "cat"])  # swapped: same length, labels still in range
    result = CliRunner().invoke(main, ["train-linear", str(cache), "--out", str(out), *TRAIN, "--lr", "5e-4"])
    assert_one_line_error(result, str(cache), "edited")
    assert (out / "records.jsonl").read_bytes() == records


def test_an_edited_partial_file_is_not_resumed_but_started_over(good_cache, tmp_path):
    folder, out = make_image_folder(tmp_path / "toy"), tmp_path / "c.h5"
    partial = tmp_path / "c.h5.partial"
    partial.write_bytes(good_cache.read_bytes())
    with h5py.File(partial, "r+") as f:  # an interrupted extraction of the same settings, then a dataset deleted
        f.attrs["complete"], f.attrs["num_done"] = False, 8
        del f["valid"]
    with pytest.warns(UserWarning, match="discarding unreadable partial file"):
        assert extract_features(folder, out, **SMALL).status == "extracted"  # no KeyError; every row recomputed
    assert verify_cache(out).ok
    np.testing.assert_array_equal(open_cache(out).features, open_cache(good_cache).features)

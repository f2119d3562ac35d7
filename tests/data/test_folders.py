"""linft.data.folders: DomainBed-style folders listed in ImageFolder's order, their checks, names and identity."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from linft.data.folders import (
    DOMAINBED_DATASETS, MultiDomainDataset, file_list_sha256, find_dataset, load_image_folder,
)
from linft.errors import LinftError

from conftest import make_image_folder


def test_folder_order_matches_imagefolder(image_folder):
    import torchvision

    ds = load_image_folder(image_folder)
    assert ds.domains == ["dom C", "domA", "domB"]
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 18
    assert ds.counts == {"dom C": 6, "domA": 6, "domB": 6}
    for di, d in enumerate(ds.domains):
        ref = torchvision.datasets.ImageFolder(str(image_folder / d))
        idx = ds.domain_indices(d)
        rel = [p.split("/", 1)[1] for p in np.asarray(ds.paths)[idx]]
        assert rel == [str(Path(s).relative_to(image_folder / d).as_posix()) for s, _ in ref.samples]
        assert ds.labels[idx].tolist() == [y for _, y in ref.samples]
        assert (ds.domain_ids[idx] == di).all()


def test_nested_and_non_image_files(tmp_path):
    root = make_image_folder(tmp_path / "d", domains=("a", "b"), classes=("x",), per_class=1)
    (root / "a" / "x" / "notes.txt").write_text("not an image")
    sub = root / "a" / "x" / "sub"
    sub.mkdir()
    (root / "a" / "x" / "img00.png").rename(sub / "deep.PNG")
    ds = load_image_folder(root)
    assert ds.paths == ["a/x/sub/deep.PNG", "b/x/img00.png"]


def test_file_list_hash_is_order_free():
    assert file_list_sha256(["b", "a"]) == file_list_sha256(["a", "b"])
    assert file_list_sha256(["a"]) == hashlib.sha256(b"a\n").hexdigest()


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(LinftError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LinftError, match="no domain sub-folders"):
        load_image_folder(tmp_path / "empty")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(LinftError, match="not a folder"):
        load_image_folder(f)


def test_domain_without_images(tmp_path):
    root = make_image_folder(tmp_path / "d", domains=("a",), classes=("x",), per_class=1)
    (root / "b").mkdir()
    with pytest.raises(LinftError, match="domain 'b' .* has no images"):
        load_image_folder(root)
    (root / "b" / "x").mkdir()
    with pytest.raises(LinftError, match="class 'x' of domain 'b' has no images"):
        load_image_folder(root)


def test_class_sets_differ_lists_the_differences(tmp_path):
    root = tmp_path / "d"
    make_image_folder(root, domains=("a",), classes=("cat", "dog"), per_class=1)
    make_image_folder(root, domains=("b",), classes=("cat", "emu"), per_class=1)
    with pytest.raises(LinftError) as err:
        load_image_folder(root)
    msg = str(err.value)
    assert "'a' lacks emu" in msg and "'b' lacks dog" in msg and "\n" not in msg


def test_find_dataset_by_domainbed_name(tmp_path, monkeypatch):
    spec = DOMAINBED_DATASETS["OfficeHome"]
    make_image_folder(tmp_path / spec.folder, domains=spec.domains, classes=("Alarm_Clock",), per_class=1)
    ds = find_dataset("officehome", tmp_path)
    assert ds.name == "OfficeHome" and "Real World" in ds.domains
    monkeypatch.setenv("LINFT_DATA_ROOT", str(tmp_path))
    assert find_dataset("OfficeHome").root == tmp_path / "office_home"
    with pytest.raises(LinftError, match="PACS not found at"):
        find_dataset("PACS", tmp_path)
    make_image_folder(tmp_path / "PACS", domains=("photo", "sketch"), classes=("dog",), per_class=1)
    with pytest.raises(LinftError, match="lacks the PACS domain folders art_painting, cartoon"):
        find_dataset("PACS", tmp_path)


def test_find_dataset_by_path(image_folder):
    ds = find_dataset(image_folder)
    assert isinstance(ds, MultiDomainDataset) and ds.name == "toy"


def test_linked_folders_are_followed_but_a_loop_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", domains=("a",), classes=("x",), per_class=1)
    extra = make_image_folder(tmp_path / "elsewhere", domains=("e",), classes=("y",), per_class=1)
    (root / "a" / "x" / "linked").symlink_to(extra / "e" / "y", target_is_directory=True)
    assert load_image_folder(root).paths == ["a/x/img00.png", "a/x/linked/img00.png"]  # followed, as ImageFolder
    (root / "a" / "x" / "linked" / "loop").symlink_to(root / "a" / "x", target_is_directory=True)
    with pytest.raises(LinftError, match=r"linked/loop links back to .*\(a loop\); remove the link") as err:
        load_image_folder(root)
    assert "\n" not in str(err.value)


def test_a_file_name_that_is_not_utf8_is_refused_naming_it(tmp_path):
    """Names are stored as UTF-8 (the cache's paths, the file-list hash): another encoding is one line naming it."""
    root = make_image_folder(tmp_path / "d", domains=("a", "b"), classes=("x",), per_class=1)
    (root / "a" / "x" / "notes\udce9.txt").write_text("not an image: ignored, whatever its name")
    assert load_image_folder(root).paths == ["a/x/img00.png", "b/x/img00.png"]
    (root / "a" / "x" / "img00.png").rename(root / "a" / "x" / "caf\udce9.png")  # b"caf\xe9.png" in Latin-1
    with pytest.raises(LinftError, match=r"caf\\xe9\.png.* is not UTF-8; rename it") as err:
        load_image_folder(root)
    assert str(root / "a" / "x") in str(err.value)
    (root / "a" / "x" / "caf\udce9.png").rename(root / "a" / "x" / "img00.png")
    for d in ("a", "b"):  # a class folder of another encoding
        (root / d / "x").rename(root / d / "\udce7")
    with pytest.raises(LinftError, match=r"\\xe7.* is not UTF-8; rename it"):
        load_image_folder(root)


def test_entries_that_are_not_regular_files_are_skipped(tmp_path):
    """A FIFO named like an image would block the reader forever; a folder named like one is walked into."""
    root = make_image_folder(tmp_path / "d", domains=("a", "b"), classes=("x",), per_class=1)
    os.mkfifo(root / "a" / "x" / "pipe.png")
    with pytest.warns(UserWarning, match=r"skipped 1 entry that is not a regular file .*a/x/pipe\.png"):
        ds = load_image_folder(root)
    assert ds.paths == ["a/x/img00.png", "b/x/img00.png"]
    (root / "a" / "x" / "gone.png").symlink_to(tmp_path / "missing.png")  # a dangling link stays listed: reading it
    with pytest.warns(UserWarning):                                      # fails by name (or is skipped on request)
        assert "a/x/gone.png" in load_image_folder(root).paths


def test_a_dataset_folder_whose_path_is_not_utf8_is_refused_naming_the_folder(tmp_path):
    root = make_image_folder(tmp_path / "caf\udce9" / "d", domains=("a", "b"), classes=("x",), per_class=1)
    with pytest.raises(LinftError, match=rf"caf\\xe9' in {tmp_path} is not UTF-8; rename it"):
        load_image_folder(root)

import hashlib

import numpy as np
import pytest

from linft.data import (
    DOMAINBED_DATASETS, MultiDomainDataset, file_list_sha256, find_dataset, load_image_folder,
    seed_hash, split_indices,
)
from linft.errors import LinftError

from conftest import make_image_folder


def test_seed_hash_pins_domainbed_values():
    assert seed_hash(0, 0) == 894182419
    assert seed_hash(0, 1) == 1514274641
    # the rule itself, computed independently
    assert seed_hash(3, 2) == int(hashlib.md5(b"(3, 2)").hexdigest(), 16) % 2**31


def test_split_indices_pinned():
    in_idx, out_idx = split_indices(10, 0, 0)
    assert out_idx.tolist() == [2, 3]
    assert in_idx.tolist() == [8, 1, 4, 5, 0, 9, 6, 7]
    in_idx, out_idx = split_indices(9991, 0, 1)  # PACS-sized
    assert len(out_idx) == 1998 and len(in_idx) == 7993
    assert out_idx[:5].tolist() == [6136, 6908, 8655, 4834, 5639]
    assert in_idx[:5].tolist() == [8428, 1150, 6236, 2355, 1244]


@pytest.mark.parametrize("n,seed,env,frac", [(0, 0, 0, 0.2), (1, 1, 0, 0.2), (57, 2, 3, 0.2), (100, 0, 1, 0.5)])
def test_split_indices_partition_and_independent_rule(n, seed, env, frac):
    in_idx, out_idx = split_indices(n, seed, env, frac)
    assert len(out_idx) == int(n * frac)
    assert sorted(in_idx.tolist() + out_idx.tolist()) == list(range(n))
    keys = list(range(n))
    np.random.RandomState(seed_hash(seed, env)).shuffle(keys)
    assert out_idx.tolist() == keys[: int(n * frac)]


def test_split_indices_rejects_bad_fraction():
    with pytest.raises(LinftError, match="holdout_fraction"):
        split_indices(10, 0, 0, 1.5)


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
        assert rel == [str(__import__("pathlib").Path(s).relative_to(image_folder / d).as_posix()) for s, _ in ref.samples]
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

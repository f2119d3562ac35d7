"""linft.data.shapes: the procedural benchmark (demo data) and the pretraining source of demo-resnet."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linft.data import load_image_folder
from linft.data.shapes import (DEMO_CLASSES, DEMO_STYLES, SOURCE_MANIFEST, SOURCE_SHAPES, SOURCE_STYLES, render,
                               source_command, write_demo_data, write_pretraining_source, write_shapes_dataset)
from linft.errors import LinftError
from helpers import refused


def tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


# --------------------------------------------------------------------------- the demo benchmark


def test_demo_data_is_deterministic_and_laid_out(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=3, per_class=4, size=32)
    b = write_shapes_dataset(tmp_path / "b", seed=3, per_class=4, size=32, workers=1)  # other parallelism
    c = write_demo_data(tmp_path / "c", seed=4, per_class=4, size=32)
    assert tree_digest(a) == tree_digest(b)
    assert set(tree_digest(a).values()).isdisjoint(tree_digest(c).values())
    ds = load_image_folder(a)
    assert ds.domains == sorted(DEMO_STYLES) and ds.classes == sorted(DEMO_CLASSES)
    assert set(ds.counts.values()) == {4 * len(DEMO_CLASSES)}


def test_pretraining_family_never_shares_an_image_with_the_demo(tmp_path):
    demo = write_shapes_dataset(tmp_path / "d", per_class=3, size=32, seed_tag=0, workers=1)
    other = write_shapes_dataset(tmp_path / "p", per_class=3, size=32, seed_tag=1, workers=1)
    assert set(tree_digest(demo).values()).isdisjoint(tree_digest(other).values())


@pytest.mark.parametrize("style", DEMO_STYLES + ("mosaic", "neon", "silhouette", "halftone"))
def test_every_style_draws_the_shape(style):
    img = render("square", style, np.random.default_rng(0), 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and img.std() > 5


def test_unknown_names_and_sizes():
    with pytest.raises(LinftError, match="unknown shape"):
        render("blob", "photo", np.random.default_rng(0))
    with pytest.raises(LinftError, match="unknown style"):
        render("circle", "oil", np.random.default_rng(0))
    with refused("size"):
        write_demo_data("/tmp/never", size=128)


# --------------------------------------------------------------------------- the pretraining source


def test_pretraining_source_is_broader_and_disjoint_from_the_demo(tmp_path):
    src = write_pretraining_source(tmp_path / "src", seed=0, per_class=1, size=16, workers=1)
    assert sorted(p.name for p in src.iterdir() if p.is_dir()) == sorted(SOURCE_STYLES)
    assert sorted(p.name for p in (src / "neon").iterdir()) == sorted(SOURCE_SHAPES)
    assert len(list(src.rglob("*.png"))) == len(SOURCE_STYLES) * len(SOURCE_SHAPES)
    assert (src / SOURCE_MANIFEST).is_file()
    assert source_command(src) == f"linft pretrain-source {src} --seed 0 --per-class 1 --size 16"
    demo = write_demo_data(tmp_path / "demo", seed=0, per_class=1, size=16)
    assert source_command(demo) is None  # no manifest: not a pretraining source
    assert {"photo"} == set(SOURCE_STYLES) & set(DEMO_STYLES)  # the demo's other styles are never seen in pretraining
    for style, shape in (("photo", "circle"), ("photo", "star")):  # same (seed, style, class, index)
        a = np.asarray(Image.open(src / style / shape / "00000.png"))
        b = np.asarray(Image.open(demo / style / shape / "00000.png"))
        assert not np.array_equal(a, b)
    with pytest.raises(LinftError, match="not empty"):
        write_pretraining_source(src, per_class=1, size=16, workers=1)


def test_demo_data_refuses_a_folder_with_files_and_force_replaces_it_whole(tmp_path):
    from click.testing import CliRunner
    from conftest import assert_one_line_error
    from linft.cli.main import main
    out = tmp_path / "data"
    write_demo_data(out, seed=0, per_class=1, size=16)
    (out / "extra_domain" / "circle").mkdir(parents=True)
    (out / "extra_domain" / "circle" / "x.png").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["demo-data", str(out), "--seed", "1", "--per-class", "1", "--size", "16"])
    assert_one_line_error(result, "exists and is not empty", "--force")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = CliRunner().invoke(main, ["demo-data", str(out), "--seed", "1", "--per-class", "1", "--size", "16",
                                       "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(DEMO_STYLES)  # no domain of the old folder is left
    fresh = tmp_path / "fresh"
    write_demo_data(fresh, seed=1, per_class=1, size=16)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")} == \
        {p.relative_to(fresh): p.read_bytes() for p in fresh.rglob("*.png")}
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("change,fragment", [(dict(per_class=0), "per_class 0"), (dict(per_class=-3), "per_class -3"),
                                             (dict(seed=-1), "seed -1")])
def test_no_images_or_a_negative_seed_are_refused_before_writing(tmp_path, change, fragment):
    with pytest.raises(LinftError, match=fragment):
        write_demo_data(tmp_path / "d", **{"per_class": 2, "size": 16, **change})
    assert not (tmp_path / "d").exists()


def test_a_forced_replacement_that_fails_at_the_last_rename_keeps_the_old_folder(tmp_path):
    """The new folder cannot take the name (here: its write leaves the staging folder unusable for the rename): the
    old folder is moved back, whole, and nothing is left beside it."""
    from linft.data.shapes import write_new_folder
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def write(folder):
        (folder / "new.txt").write_text("new")
        folder.rename(folder.with_name("elsewhere"))  # the staging folder is gone: os.replace(staging, out) fails

    with pytest.raises(LinftError, match="an existing data is unchanged"):
        write_new_folder(out, write, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "elsewhere"]


def test_pretrain_source_refusal_names_its_own_way_out(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_text("x")
    with pytest.raises(LinftError, match="exists and is not empty; choose a new folder, or delete it first$"):
        write_pretraining_source(src, per_class=1, size=16, workers=1)

import hashlib
from pathlib import Path

import numpy as np
import pytest

from linft.data import load_image_folder
from linft.demo import run_demo
from linft.demo_data import DEMO_CLASSES, DEMO_STYLES, render, write_demo_data, write_shapes_dataset
from linft.errors import LinftError
from linft.features import open_cache
from linft.records import read_records


def tree_digest(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


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
    with pytest.raises(LinftError, match="out of range"):
        write_demo_data("/tmp/never", size=128)


def test_demo_runs_end_to_end(tmp_path):
    lines = []
    tiny = dict(per_class=3, linear_steps=20, seeds=1, finetune_steps=3, finetune_eval_every=2, progress=False)
    result = run_demo(tmp_path / "demo", say=lines.append, **tiny)
    cache = open_cache(result.cache)
    assert cache.features.shape[0] == 4 * 7 * 3
    assert not any("skipping" in line for line in lines)  # every stage is built
    summary = (result.report / "summary.md").read_text()
    for label in ("linear FT, dropout 0.9", "linear probe", "full FT, dropout 0", "full FT, dropout 0.9"):
        assert f"| {label} |" in summary
    assert (result.report / "clouds.png").stat().st_size > 0
    assert (result.report / "dropout.png").stat().st_size > 0
    assert (result.report / "interpolation.png").stat().st_size > 0
    records = read_records([result.out / "runs"])
    assert {r["method"] for r in records} >= {"linear-ft", "linear-probe", "finetune", "interpolation-weights",
                                              "interpolation-representation", "interpolation-linearized"}
    again = []
    run_demo(tmp_path / "demo", say=again.append, **tiny)
    assert any("using the demo benchmark already" in line for line in again)
    assert len(read_records([result.out / "runs"])) == len(records)  # nothing trained or written twice

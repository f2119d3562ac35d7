"""Helpers shared by several test files: toy run records, synthetic cached features, near-tie-aware split counts.

Importable as ``helpers`` from every test file (pytest puts ``tests/`` on ``sys.path`` for ``conftest.py``).
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import product

import numpy as np
import pytest
import torch
from PIL import Image

from linft.cache.format import FeatureCache
from linft.errors import LinftError

# -- refusals --------------------------------------------------------------------------------------------------------


@contextmanager
def refused(param: str | None = None, kind: type[LinftError] = LinftError):
    """The block raises ``kind`` about ``param`` (None: about no parameter), in one line that names no ``--flag``
    (only the CLI names flags). Yields pytest's ExceptionInfo, for the facts a test also checks (a path, a value)."""
    with pytest.raises(kind) as err:
        yield err
    assert err.value.param == param, f"param {err.value.param!r} ({err.value})"
    text = str(err.value)
    assert "\n" not in text and " --" not in f" {text}", text

# -- toy run records (selection, aggregation, reports) ------------------------------------------------------------


def rec(step, a_out, b_out, c_in, c_out, **kw):
    """A record with training domains a, b (out splits of 10) and held-out c (in 40, out 10)."""
    r = {"method": "linear-ft", "label": kw.pop("label", "m"), "dataset": "toy", "source": kw.pop("source", "p"),
         "test_domain": "c", "train_domains": ["a", "b"], "grid": kw.pop("grid", {"lr": 1}), "seed": kw.pop("seed", 0),
         "run_id": kw.pop("run_id", "r1"), "attempt": kw.pop("attempt", "x"), "step": step, "status": "ok",
         "final": kw.pop("final", False), "hparams": {"dropout": kw.pop("dropout", 0.0)},
         "splits": {"a_in": [0, 40], "a_out": [a_out, 10], "b_in": [0, 40], "b_out": [b_out, 10],
                    "c_in": [c_in, 40], "c_out": [c_out, 10]}}
    r.update(kw)
    return r


def grid_records():
    """2 grid points x 2 seeds for held-out c, final records only: per seed the best i.i.d. grid point has o.o.d.
    25/50 (seed 0) and 30/50 (seed 1), so 55.0 ± 5.0."""
    out = []
    for (g, seed), (a, c) in zip(product((1, 2), (0, 1)), [(6, 20), (8, 30), (7, 25), (5, 40)]):
        out.append(rec(0, a, a, c, 0, grid={"lr": g}, seed=seed, run_id=f"{g}-{seed}", final=True))
    return out


def held_out(r, test):
    """The same record with ``test`` held out: a's and b's roles go to the other two domains, c's to ``test``."""
    x, y = [d for d in "abc" if d != test]
    sp = r["splits"]
    splits = {f"{x}_in": sp["a_in"], f"{x}_out": sp["a_out"], f"{y}_in": sp["b_in"], f"{y}_out": sp["b_out"],
              f"{test}_in": sp["c_in"], f"{test}_out": sp["c_out"]}
    return {**r, "test_domain": test, "train_domains": [x, y], "splits": splits, "run_id": test + r["run_id"]}


def full_grid_records():
    """:func:`grid_records` with each of a, b and c held out in turn."""
    return [held_out(r, t) for t in "abc" for r in grid_records()]


# -- synthetic cached features (the linear engine and the linear protocol) ----------------------------------------

#: blocks, feature width, classes, domains of :func:`synthetic`
K, D, C, NDOM = 3, 6, 3, 3


def class_folder(root, classes, per_class: int, seed: int):
    """``root/<class>/<i>.png``: ``per_class`` random 40x36 RGB images per class (an ImageFolder-style set)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def synthetic(n_per_domain=40, seed=0):
    """Features with a class signal that weakens across domains (so training has something to learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=NDOM * n_per_domain)
    domains = np.repeat(np.arange(NDOM), n_per_domain)
    means = rng.normal(size=(C, K, D))
    feats = means[labels] * (1.0 - 0.3 * domains)[:, None, None] + rng.normal(size=(len(labels), K, D))
    return feats.astype(np.float32), labels.astype(np.int64), domains.astype(np.int64)


def synthetic_cache(tmp_path, n_per_domain=30):
    """A FeatureCache in memory of :func:`synthetic` features: domains a, b, c and classes x, y, z."""
    feats, labels, domains = synthetic(n_per_domain)
    names = ["a", "b", "c"]
    paths = [f"{names[d]}/{['x', 'y', 'z'][y]}/{i}.png" for i, (d, y) in enumerate(zip(domains, labels))]
    meta = {"domain_names": names, "class_names": ["x", "y", "z"], "provenance_sha256": "f" * 64,
            "dataset_name": "synthetic", "backbone": "none", "weights": "none", "blocks": ["b1", "b2", "b3"]}
    return FeatureCache(tmp_path / "fake.h5", feats, labels, domains, paths, np.ones(len(labels), bool), meta)


# -- split counts of two code paths (fine-tuning, interpolation) --------------------------------------------------

# Two code paths move the float32 logits of the tiny test networks by far less than NEAR_TIE: only an image whose
# top-2 logit margin is below it may change its predicted class between them, so split counts of two code paths may
# differ by the near ties of the split.
NEAR_TIE = 1e-3


def near_ties(logits: torch.Tensor, split_rows: dict, domains: list[str]) -> dict[str, int]:
    """Per split, the images whose top-2 logit margin is below NEAR_TIE."""
    top2 = logits.topk(2, dim=1).values
    close = ((top2[:, 0] - top2[:, 1]) < NEAR_TIE).numpy()
    return {f"{domains[d]}_{part}": int(close[rows].sum()) for (d, part), rows in sorted(split_rows.items())}


def assert_counts_agree(a: dict, b: dict, ties: dict):
    """Split counts ``{split: [correct, total]}`` of two code paths: the same totals, and correct counts that differ
    by at most the split's near ties (equal when there are none)."""
    assert a.keys() == b.keys() == ties.keys()
    for k in a:
        assert a[k][1] == b[k][1], k
        assert abs(a[k][0] - b[k][0]) <= ties[k], (k, a[k], b[k], ties[k])

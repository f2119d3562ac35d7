"""The linear protocol driver: train_linear's records, idempotent re-runs, divergence, and its errors."""

import numpy as np
import pytest
import torch

from linft.data.splits import domain_split_rows
from linft.errors import LinftError
from linft.protocol.records import REQUIRED_FIELDS, read_records
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.train.linear.driver import train_linear
from linft.train.linear.engine import GridPoint, LinearGridConfig

from helpers import refused, C, NDOM, synthetic_cache
from reference import ATOL, RTOL, decided_and_ties, plain_sgd_run


def test_protocol_records_and_idempotent_rerun(tmp_path):
    cache = synthetic_cache(tmp_path)
    config = LinearGridConfig(steps=12, batch_size=4, eval_every=5)
    res = train_linear(cache, tmp_path / "runs", dropouts=(0.0, 0.9), probe=True, lrs=(0.05,), weight_decays=(1e-3,),
                       seeds=2, config=config, device="cpu", progress=False)
    assert (res.trained, res.skipped, res.diverged) == (3 * 2 * 3, 0, 0)
    records = read_records([tmp_path / "runs"])
    assert len(records) == 18 * 4  # steps 0, 5, 10, 11
    r = records[0]
    for key in (*REQUIRED_FIELDS, "method", "label", "dataset", "source", "backbone", "weights", "hparams", "grid",
                "attempt", "loss", "status", "final", "cache"):
        assert key in r, key
    assert r["source"] == cache.provenance_sha256 and "cache_provenance" not in r  # today's schema: "source"
    assert {x["method"] for x in records} == {"linear-ft", "linear-probe"}
    assert {x["label"] for x in records} == {"linear FT, dropout 0", "linear FT, dropout 0.9", "linear probe"}
    # the split sizes follow DomainBed's rule on each domain's rows
    in_rows = domain_split_rows(cache.domains, 3, r["seed"])
    assert r["splits"]["a_out"][1] == len(in_rows[(0, "out")]) == 6 and r["splits"]["a_in"][1] == 24
    assert 0.0 <= iid_accuracy(r) <= 1.0 and 0.0 <= ood_accuracy(r) <= 1.0
    before = (tmp_path / "runs" / "records.jsonl").read_text()
    again = train_linear(cache, tmp_path / "runs", dropouts=(0.0, 0.9), probe=True, lrs=(0.05,), weight_decays=(1e-3,),
                         seeds=2, config=config, device="cpu", progress=False)
    assert (again.trained, again.skipped) == (0, 18)
    assert (tmp_path / "runs" / "records.jsonl").read_text() == before
    more = train_linear(cache, tmp_path / "runs", dropouts=(0.0, 0.5), lrs=(0.05,), weight_decays=(1e-3,),
                        seeds=2, config=config, device="cpu", progress=False)
    assert (more.trained, more.skipped) == (6, 6)


def test_same_seed_same_result_whatever_else_is_in_the_grid(tmp_path):
    """A run sees the same batches, noise and initialisation whatever else is trained with it.

    The two grids stack the run with different runs (6 groups x 2 points against 2 groups x 1 point), so their
    matmuls round differently: both are compared with the plain loop's run, losses to the tolerance and correct
    counts on every example that is not a near-tie of the loop's logits.
    """
    cache = synthetic_cache(tmp_path)
    config = LinearGridConfig(steps=10, batch_size=4, eval_every=3)
    train_linear(cache, tmp_path / "full", dropouts=(0.5,), lrs=(0.05, 0.01), weight_decays=(1e-3,), seeds=2,
                 config=config, device="cpu", progress=False)
    train_linear(cache, tmp_path / "one", dropouts=(0.5,), lrs=(0.05,), weight_decays=(1e-3,), seeds=2,
                 test_domains=["b"], config=config, device="cpu", progress=False)
    key = lambda r: (r["run_id"], r["step"])
    full = {key(r): r for r in read_records([tmp_path / "full"])}
    one = {key(r): r for r in read_records([tmp_path / "one"])}
    assert len(one) == 2 * 4 and set(one) <= set(full)  # seeds 0, 1 at steps 0, 3, 6, 9
    X, Y = torch.from_numpy(cache.features), torch.from_numpy(cache.labels)
    references = {}  # seed: the plain loop's ({step: (v, V, b)}, {step: training loss})
    for s in (0, 1):
        rows_of = domain_split_rows(cache.domains, NDOM, s, cache.valid)
        references[s] = plain_sgd_run(cache.features, cache.labels, rows_of, C, 1, s, GridPoint(0.05, 1e-3, 0.5),
                                      config)[3:]
    near_ties = 0
    for k, r in one.items():
        snapshots, losses = references[r["seed"]]
        (v, V, b), loss = snapshots[r["step"]], losses[r["step"]]
        right, tie = decided_and_ties(X, Y, v, V, b)
        near_ties += int(tie.sum())
        rows_of = domain_split_rows(cache.domains, NDOM, r["seed"], cache.valid)
        for got in (r, full[k]):
            assert got["loss"] == pytest.approx(loss, rel=RTOL, abs=ATOL), k
            for (d, part), rows in rows_of.items():
                correct, total = got["splits"][f"{'abc'[d]}_{part}"]
                lo = int(right[rows].sum())
                assert total == len(rows) and lo <= correct <= lo + int(tie[rows].sum()), (k, d, part)
    assert near_ties <= 0.01 * len(one) * len(Y)  # the tolerance leaves the counts compared


def test_diverged_runs_are_flagged(tmp_path):
    cache = synthetic_cache(tmp_path)
    res = train_linear(cache, tmp_path / "runs", dropouts=(0.0,), lrs=(1e9, 0.01), weight_decays=(0.0,), seeds=1,
                       test_domains=["a"], config=LinearGridConfig(steps=30, batch_size=4, eval_every=5),
                       device="cpu", progress=False)
    assert res.diverged == 1
    records = read_records([tmp_path / "runs"])
    bad = [r for r in records if r["status"] == "diverged"]
    assert len(bad) == 1 and bad[0]["final"] and bad[0]["hparams"]["lr"] == 1e9 and bad[0]["loss"] is None
    assert not any(r["hparams"]["lr"] == 1e9 and r["step"] > bad[0]["step"] for r in records)
    assert any(r["hparams"]["lr"] == 0.01 and r["final"] and r["status"] == "ok" for r in records)
    again = train_linear(cache, tmp_path / "runs", dropouts=(0.0,), lrs=(1e9, 0.01), weight_decays=(0.0,), seeds=1,
                         test_domains=["a"], config=LinearGridConfig(steps=30, batch_size=4, eval_every=5),
                         device="cpu", progress=False)
    assert (again.trained, again.skipped) == (0, 2)  # a diverged run is finished: never retrained


@pytest.mark.parametrize("kwargs,match", [
    (dict(test_domains=["zz"]), "held-out domain 'zz' is not in the cache"),
    (dict(dropouts=(1.0,)), r"outside \[0, 1\)"),
    (dict(dropouts=(-0.1,)), r"outside \[0, 1\)"),
    (dict(lrs=()), "grid is empty"),
    (dict(seeds=0), "grid is empty"),
    (dict(lrs=(-0.1,)), "learning rates must be finite and positive"),
    (dict(weight_decays=(-1e-4,)), "weight decays must be finite and >= 0"),
    # the error names the batch size (today as the CLI flag; see the report: library errors should name parameters)
    (dict(config=LinearGridConfig(steps=2, batch_size=0)), r"(--batch-size|batch_size)"),
    (dict(config=LinearGridConfig(steps=2, v_init="zeros")), "unknown v init 'zeros'"),
])
def test_bad_input(tmp_path, kwargs, match):
    args = dict(dropouts=(0.9,), lrs=(0.01,), weight_decays=(0.0,), seeds=1,
                config=LinearGridConfig(steps=2), device="cpu", progress=False)
    args.update(kwargs)
    with pytest.raises(LinftError, match=match):
        train_linear(synthetic_cache(tmp_path), tmp_path / "runs", **args)
    assert not (tmp_path / "runs" / "records.jsonl").exists()  # refused before anything is written


def test_protocol_samples_cached_views_when_present(tmp_path):
    cache = synthetic_cache(tmp_path)
    config = LinearGridConfig(steps=8, batch_size=4, eval_every=4)
    kwargs = dict(dropouts=(0.0,), lrs=(0.05,), weight_decays=(0.0,), seeds=1, test_domains=["a"], config=config,
                  device="cpu", progress=False)
    train_linear(cache, tmp_path / "plain", **kwargs)
    cache.views = np.stack([cache.features * 0.0, cache.features * 0.0], 1)  # views that carry no signal
    train_linear(cache, tmp_path / "views", **kwargs)
    plain, views = read_records([tmp_path / "plain"]), read_records([tmp_path / "views"])
    assert views[0]["hparams"]["train_views"] == 2 and plain[0]["hparams"]["train_views"] == 0
    assert views[0]["run_id"] != plain[0]["run_id"]
    # trained on all-zero views, only b learns (v and V get no gradient): the predictions differ from the plain run's
    assert [r["splits"] for r in views] != [r["splits"] for r in plain]


def test_training_domains_need_an_out_split(tmp_path):
    cache = synthetic_cache(tmp_path, n_per_domain=4)  # int(0.2 * 4) = 0 held-out images per domain
    with pytest.raises(LinftError, match="empty 'in' or 'out' split"):
        train_linear(cache, tmp_path / "runs", dropouts=(0.0,), lrs=(0.1,), weight_decays=(0.0,), seeds=1,
                     config=LinearGridConfig(steps=2), device="cpu", progress=False)


def test_a_folder_holding_another_caches_runs_is_refused_before_training(tmp_path):
    """After a forced extraction re-made the cache (new provenance) with the same default --out: refuse, append
    nothing, and leave the folder usable (report, re-runs of the first cache)."""
    import dataclasses
    cache = synthetic_cache(tmp_path)
    config = LinearGridConfig(steps=4, batch_size=4, eval_every=2)
    kw = dict(dropouts=(0.9,), lrs=(0.05,), weight_decays=(1e-3,), seeds=1, config=config, device="cpu",
              progress=False)
    train_linear(cache, tmp_path / "runs", **kw)
    records = tmp_path / "runs" / "records.jsonl"
    before = records.read_bytes()
    other = dataclasses.replace(cache, meta={**cache.meta, "provenance_sha256": "e" * 64})
    with refused("out_dir") as err:
        train_linear(other, tmp_path / "runs", **kw)
    assert "source ffffffffffff" in str(err.value) and "cache eeeeeeeeeeee" in str(err.value)  # both caches named
    assert records.read_bytes() == before
    assert train_linear(cache, tmp_path / "runs", **kw).skipped == 3
    assert not (tmp_path / "runs" / ".linft.lock").exists()


def test_a_second_train_linear_on_the_same_folder_is_refused(tmp_path):
    from linft.locks import output_lock
    cache = synthetic_cache(tmp_path)
    out = tmp_path / "runs"
    out.mkdir()
    lock = out / ".linft.lock"
    lock.write_text('{"pid": 1, "host": "another-host", "started": "then", "command": "linft train-linear"}')
    with pytest.raises(LinftError, match=r"being written by another linft process \(pid 1 on another-host"):
        train_linear(cache, out, lrs=(0.05,), weight_decays=(1e-3,), seeds=1,
                     config=LinearGridConfig(steps=2, batch_size=4, eval_every=1), device="cpu", progress=False)
    assert not (out / "records.jsonl").exists() and lock.exists()
    lock.write_text('{"pid": 999999999, "host": "%s", "started": "then", "command": "killed"}'
                    % __import__("socket").gethostname())  # its owner is dead: taken over
    res = train_linear(cache, out, lrs=(0.05,), weight_decays=(1e-3,), seeds=1,
                       config=LinearGridConfig(steps=2, batch_size=4, eval_every=1), device="cpu", progress=False)
    assert res.trained == 3 and not lock.exists()
    with output_lock(out, folder=True):  # the same process may nest its own lock (the demo, a notebook)
        assert train_linear(cache, out, lrs=(0.05,), weight_decays=(1e-3,), seeds=1,
                            config=LinearGridConfig(steps=2, batch_size=4, eval_every=1), device="cpu",
                            progress=False).skipped == 3


def test_split_seed_gives_every_seed_the_same_split(tmp_path):
    """--split-seed 0 (the official code's one split for all seeds): seeds differ in batches, masks and init only;
    the default (each seed its own split, DomainBed) keeps its run ids."""
    cache = synthetic_cache(tmp_path)
    config = LinearGridConfig(steps=4, batch_size=4, eval_every=2)
    kw = dict(dropouts=(0.9,), lrs=(0.05,), weight_decays=(1e-3,), seeds=2, test_domains=["c"], config=config,
              device="cpu", progress=False)
    train_linear(cache, tmp_path / "own", **kw)
    train_linear(cache, tmp_path / "fixed", split_seed=0, **kw)
    own, fixed = read_records([tmp_path / "own"]), read_records([tmp_path / "fixed"])
    rows = {s: domain_split_rows(cache.domains, NDOM, s, cache.valid) for s in (0, 1)}
    assert not np.array_equal(rows[0][(0, "in")], rows[1][(0, "in")])  # the seeds' own training pools differ
    assert all(r["hparams"]["split_seed"] == 0 for r in fixed) and all("split_seed" not in r["hparams"] for r in own)
    assert {r["label"] for r in fixed} == {"linear FT, dropout 0.9, split seed 0"}  # never pooled with the default
    assert {r["label"] for r in own} == {"linear FT, dropout 0.9"}
    assert {r["run_id"] for r in own}.isdisjoint({r["run_id"] for r in fixed})
    # seed 0 with split seed 0 is the default seed 0 run, up to its id: the same numbers
    strip = lambda recs: [(r["step"], r["splits"], r["loss"]) for r in recs if r["seed"] == 0]  # labels differ
    assert strip(own) == strip(fixed)
    # seed 1 with split seed 0: the plain loop fed seed 0's split and seed 1's randomness gives its losses
    rows_of = domain_split_rows(cache.domains, NDOM, 0, cache.valid)
    losses = plain_sgd_run(cache.features, cache.labels, rows_of, C, 2, 1, GridPoint(0.05, 1e-3, 0.9), config)[4]
    seed1 = [r for r in fixed if r["seed"] == 1]
    assert len(seed1) == 3  # steps 0, 2, 3
    for r in seed1:
        assert r["loss"] == pytest.approx(losses[r["step"]], rel=RTOL, abs=ATOL), r["step"]
    assert [r["loss"] for r in own if r["seed"] == 1] != [r["loss"] for r in seed1]  # its own split differs
    with refused("split_seed"):
        train_linear(cache, tmp_path / "bad", split_seed=-1, **kw)


@pytest.mark.skipif(__import__("linft._kernels.sparse_step", fromlist=["load_kernel"]).load_kernel()[0] is None,
                    reason="no compiled kernel")
def test_with_the_compiled_step_a_run_is_bit_identical_whatever_else_is_in_the_grid(tmp_path):
    """Each run is its own SIMD lane of the compiled step: the same arithmetic in any grid (the README's claim;
    the pure-torch step stacks runs in batched matmuls and agrees to float32 rounding, the test above)."""
    cache = synthetic_cache(tmp_path)
    config = LinearGridConfig(steps=60, batch_size=4, eval_every=20, step_kind="sparse")
    train_linear(cache, tmp_path / "full", dropouts=(0.5, 0.9), lrs=(0.05, 0.01), weight_decays=(1e-3, 1e-4),
                 seeds=2, config=config, device="cpu", progress=False)
    train_linear(cache, tmp_path / "one", dropouts=(0.9,), lrs=(0.01,), weight_decays=(1e-4,), seeds=2,
                 test_domains=["b"], config=config, device="cpu", progress=False)
    full = {(r["run_id"], r["step"]): r for r in read_records([tmp_path / "full"])}
    one = {(r["run_id"], r["step"]): r for r in read_records([tmp_path / "one"])}
    assert len(one) == 2 * 4 and set(one) <= set(full)
    for k, r in one.items():
        assert (r["loss"], r["splits"]) == (full[k]["loss"], full[k]["splits"]), k


def test_every_record_says_which_step_computed_it(tmp_path):
    """The compiled sparse step and the torch step agree to float32 rounding, not bit for bit: a record names its
    step (not part of the run id, so the same run from either step is the same run)."""
    from linft._kernels.sparse_step import load_kernel
    cache = synthetic_cache(tmp_path)
    kw = dict(dropouts=(0.9,), probe=True, lrs=(0.05,), weight_decays=(1e-3,), seeds=1, test_domains=["a"],
              device="cpu", progress=False)
    train_linear(cache, tmp_path / "auto", config=LinearGridConfig(steps=2, batch_size=4, eval_every=1), **kw)
    train_linear(cache, tmp_path / "torch", config=LinearGridConfig(steps=2, batch_size=4, eval_every=1,
                                                                    step_kind="torch"), **kw)
    auto = {(r["label"], r["step"]): r for r in read_records([tmp_path / "auto"])}
    forced = {(r["label"], r["step"]): r for r in read_records([tmp_path / "torch"])}
    compiled = load_kernel()[0] is not None
    for (label, step), r in auto.items():
        expected = "compiled sparse step" if compiled and label != "linear probe" else "torch step"
        assert r["engine"] == expected and forced[(label, step)]["engine"] == "torch step"
        assert r["run_id"] == forced[(label, step)]["run_id"]

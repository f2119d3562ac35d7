"""The linear fine-tuning engine: batched runs equal plain one-by-one torch.optim.SGD runs."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linft.errors import LinftError
from linft.features import FeatureCache
from linft.linear import (
    GridPoint, Group, LinearGridConfig, draw_batch, draw_noise, draw_views, eval_steps, group_generator, initial_parameters,
    inverted_dropout, linear_ft_logits, lr_at, train_linear, train_linear_grid,
)
from linft.protocol import domain_split_rows, iid_accuracy, ood_accuracy
from linft.records import read_records

K, D, C, NDOM = 3, 6, 3, 3


def synthetic(n_per_domain=40, seed=0):
    """Features with a class signal that weakens across domains (so training has something to learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, size=NDOM * n_per_domain)
    domains = np.repeat(np.arange(NDOM), n_per_domain)
    means = rng.normal(size=(C, K, D))
    feats = means[labels] * (1.0 - 0.3 * domains)[:, None, None] + rng.normal(size=(len(labels), K, D))
    return feats.astype(np.float32), labels.astype(np.int64), domains.astype(np.int64)


def split_ids(domains, seed):
    ids = np.full(len(domains), -1)
    for (d, part), rows in domain_split_rows(domains, NDOM, seed).items():
        ids[rows] = 2 * d + (part == "out")
    return torch.from_numpy(ids)


def plain_run(feats, labels, domains, test_domain, seed, point, config, views=None):
    """One run as people write it: nn-style parameters, torch.optim.SGD, a loop over steps."""
    gen_init = group_generator(seed, test_domain, "init", "cpu")
    v, V, b = (t.clone().requires_grad_(True) for t in initial_parameters(K, D, C, gen_init, config.v_init, point.probe))
    params = [V, b] if point.probe else [v, V, b]
    opt = torch.optim.SGD(params, lr=point.lr, momentum=0.9, weight_decay=point.weight_decay)
    gen = group_generator(seed, test_domain, "batches", "cpu")
    rows_of = domain_split_rows(domains, NDOM, seed)
    pools = [torch.from_numpy(rows_of[(d, "in")]) for d in range(NDOM) if d != test_domain]
    X, Y = torch.from_numpy(feats), torch.from_numpy(labels)
    trajectory = {}
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, point.lr, config.milestone_steps())
        rows = draw_batch(pools, config.batch_size, gen)
        phi = X[rows] if views is None else views[rows, draw_views(len(rows), views.shape[1], gen, "cpu")]
        keep = draw_noise(len(rows), D, gen, "cpu") >= point.dropout
        loss = F.cross_entropy(linear_ft_logits(phi, v, V, b, keep, point.dropout), Y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in eval_steps(config.steps, config.eval_every):
            with torch.no_grad():
                pred = linear_ft_logits(X, v, V, b).argmax(1)
            counts = {}
            for (d, part), r in rows_of.items():
                counts[f"{d}_{part}"] = int((pred[r] == Y[r]).sum())
            trajectory[step] = counts
    return v.detach(), V.detach(), b.detach(), trajectory


POINTS = [GridPoint(0.05, 1e-3, 0.0), GridPoint(0.02, 1e-2, 0.5), GridPoint(0.05, 0.0, 0.9), GridPoint(0.05, 1e-3, 0.0, True)]


@pytest.mark.parametrize("v_init,with_views", [("normal", False), ("last", False), ("last", True)])
def test_batched_engine_equals_one_by_one_sgd(v_init, with_views):
    feats, labels, domains = synthetic()
    views = torch.from_numpy(feats)[:, None] * torch.tensor([0.5, 1.5]).view(1, 2, 1, 1) if with_views else None
    config = LinearGridConfig(steps=40, batch_size=5, eval_every=15, v_init=v_init, lr_milestones=(0.5,))
    splits = {s: split_ids(domains, s) for s in (0, 1)}
    groups = []
    for e, s in [(0, 0), (2, 1), (1, 1)]:
        rows_of = domain_split_rows(domains, NDOM, s)
        groups.append(Group(e, s, [torch.from_numpy(rows_of[(d, "in")]) for d in range(NDOM) if d != e], POINTS))
    seen = {}
    v, V, b = train_linear_grid(torch.from_numpy(feats), torch.from_numpy(labels), splits, 2 * NDOM, groups, C,
                                config, on_eval=lambda ev: seen.__setitem__(ev.step, ev), views=views)
    assert sorted(seen) == [0, 15, 30, 39]
    for gi, g in enumerate(groups):
        for hi, p in enumerate(POINTS):
            rv, rV, rb, traj = plain_run(feats, labels, domains, g.test_domain, g.seed, p, config, views)
            torch.testing.assert_close(v[gi, hi], rv, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(V[gi, hi], rV, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b[gi, hi], rb, rtol=1e-4, atol=1e-5)
            for step, counts in traj.items():
                got = {f"{d}_{part}": int(seen[step].correct[gi, hi, 2 * d + (part == "out")])
                       for d in range(NDOM) for part in ("in", "out")}
                assert got == counts, (gi, hi, step)


def test_probe_touches_only_V_and_b():
    feats, labels, domains = synthetic()
    rows_of = domain_split_rows(domains, NDOM, 0)
    group = Group(0, 0, [torch.from_numpy(rows_of[(d, "in")]) for d in (1, 2)], [GridPoint(0.1, 1e-2, 0.0, True)])
    v, V, b = train_linear_grid(torch.from_numpy(feats), torch.from_numpy(labels), {0: split_ids(domains, 0)}, 6,
                                [group], C, LinearGridConfig(steps=20, batch_size=4, eval_every=10, v_init="normal"))
    expected_v = torch.zeros(K, D)
    expected_v[-1] = 1
    assert torch.equal(v[0, 0], expected_v)
    v0, V0, b0 = initial_parameters(K, D, C, group_generator(0, 0, "init", "cpu"), "normal", True)
    assert not torch.allclose(V[0, 0], V0) and not torch.allclose(b[0, 0], b0)


def test_dropout_scaling_and_evaluation_identity():
    x = torch.arange(1.0, 9.0).view(2, 4)
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    torch.testing.assert_close(inverted_dropout(x, keep, 0.75), torch.tensor([[4.0, 0, 12, 0], [0, 0, 0, 32]]))
    phi = torch.randn(5, K, D)
    v, V, b = torch.randn(K, D), torch.randn(C, D), torch.randn(C)
    expected = sum(v[k] * phi[:, k] for k in range(K)) @ V.T + b
    torch.testing.assert_close(linear_ft_logits(phi, v, V, b), expected)
    torch.testing.assert_close(linear_ft_logits(phi, v, V, b, torch.ones(5, D, dtype=torch.bool), 0.0), expected)
    # inverted dropout keeps the expectation
    g = torch.Generator().manual_seed(0)
    ones = torch.ones(200_000)
    mean = inverted_dropout(ones, torch.rand(200_000, generator=g) >= 0.9, 0.9).mean()
    assert abs(mean.item() - 1.0) < 0.03


def test_lr_schedule_and_eval_steps():
    assert lr_at(4999, 1e-3, (5000,)) == 1e-3 and lr_at(5000, 1e-3, (5000,)) == pytest.approx(1e-4)
    assert lr_at(25000, 1.0, (15000, 25000)) == pytest.approx(0.01)
    assert eval_steps(10_000, 300)[:3] == [0, 300, 600] and eval_steps(10_000, 300)[-2:] == [9900, 9999]


def make_cache(tmp_path, n_per_domain=30):
    feats, labels, domains = synthetic(n_per_domain)
    names = ["a", "b", "c"]
    paths = [f"{names[d]}/{['x', 'y', 'z'][y]}/{i}.png" for i, (d, y) in enumerate(zip(domains, labels))]
    meta = {"domain_names": names, "class_names": ["x", "y", "z"], "provenance_sha256": "f" * 64,
            "dataset_name": "synthetic", "backbone": "none", "weights": "none", "blocks": ["b1", "b2", "b3"]}
    return FeatureCache(tmp_path / "fake.h5", feats, labels, domains, paths, np.ones(len(labels), bool), meta)


def test_protocol_records_and_idempotent_rerun(tmp_path):
    cache = make_cache(tmp_path)
    config = LinearGridConfig(steps=12, batch_size=4, eval_every=5)
    res = train_linear(cache, tmp_path / "runs", dropouts=(0.0, 0.9), probe=True, lrs=(0.05,), weight_decays=(1e-3,),
                       seeds=2, config=config, device="cpu", progress=False)
    assert (res.trained, res.skipped, res.diverged) == (3 * 2 * 3, 0, 0)
    records = read_records([tmp_path / "runs"])
    assert len(records) == 18 * 4  # steps 0, 5, 10, 11
    r = records[0]
    for key in ("method", "label", "dataset", "cache_provenance", "test_domain", "train_domains", "hparams", "grid",
                "seed", "run_id", "step", "splits", "status", "final"):
        assert key in r
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
    cache = make_cache(tmp_path)
    config = LinearGridConfig(steps=10, batch_size=4, eval_every=3)
    train_linear(cache, tmp_path / "full", dropouts=(0.5,), lrs=(0.05, 0.01), weight_decays=(1e-3,), seeds=2,
                 config=config, device="cpu", progress=False)
    train_linear(cache, tmp_path / "one", dropouts=(0.5,), lrs=(0.05,), weight_decays=(1e-3,), seeds=2,
                 test_domains=["b"], config=config, device="cpu", progress=False)
    key = lambda r: (r["run_id"], r["step"])
    full = {key(r): r["splits"] for r in read_records([tmp_path / "full"])}
    one = {key(r): r["splits"] for r in read_records([tmp_path / "one"])}
    assert one and all(full[k] == v for k, v in one.items())


def test_diverged_runs_are_flagged(tmp_path):
    cache = make_cache(tmp_path)
    res = train_linear(cache, tmp_path / "runs", dropouts=(0.0,), lrs=(1e9, 0.01), weight_decays=(0.0,), seeds=1,
                       test_domains=["a"], config=LinearGridConfig(steps=30, batch_size=4, eval_every=5),
                       device="cpu", progress=False)
    assert res.diverged == 1
    records = read_records([tmp_path / "runs"])
    bad = [r for r in records if r["status"] == "diverged"]
    assert len(bad) == 1 and bad[0]["final"] and bad[0]["hparams"]["lr"] == 1e9
    assert not any(r["hparams"]["lr"] == 1e9 and r["step"] > bad[0]["step"] for r in records)
    assert any(r["hparams"]["lr"] == 0.01 and r["final"] and r["status"] == "ok" for r in records)


@pytest.mark.parametrize("kwargs,match", [
    (dict(test_domains=["zz"]), "held-out domain 'zz' is not in the cache"),
    (dict(dropouts=(1.0,)), r"outside \[0, 1\)"),
    (dict(dropouts=(-0.1,)), r"outside \[0, 1\)"),
    (dict(lrs=()), "grid is empty"),
    (dict(seeds=0), "grid is empty"),
    (dict(config=LinearGridConfig(steps=2, batch_size=0)), "--batch-size"),
])
def test_bad_input(tmp_path, kwargs, match):
    args = dict(dropouts=(0.9,), lrs=(0.01,), weight_decays=(0.0,), seeds=1,
                config=LinearGridConfig(steps=2), device="cpu", progress=False)
    args.update(kwargs)
    with pytest.raises(LinftError, match=match):
        train_linear(make_cache(tmp_path), tmp_path / "runs", **args)


def test_protocol_samples_cached_views_when_present(tmp_path):
    cache = make_cache(tmp_path)
    config = LinearGridConfig(steps=8, batch_size=4, eval_every=4)
    kwargs = dict(dropouts=(0.0,), lrs=(0.05,), weight_decays=(0.0,), seeds=1, test_domains=["a"], config=config,
                  device="cpu", progress=False)
    train_linear(cache, tmp_path / "plain", **kwargs)
    cache.views = np.stack([cache.features * 0.0, cache.features * 0.0], 1)  # views that carry no signal
    train_linear(cache, tmp_path / "views", **kwargs)
    plain, views = read_records([tmp_path / "plain"]), read_records([tmp_path / "views"])
    assert views[0]["hparams"]["train_views"] == 2 and plain[0]["hparams"]["train_views"] == 0
    assert views[0]["run_id"] != plain[0]["run_id"]
    assert [r["splits"] for r in views] != [r["splits"] for r in plain]


def test_training_domains_need_an_out_split(tmp_path):
    cache = make_cache(tmp_path, n_per_domain=4)  # int(0.2 * 4) = 0 held-out images per domain
    with pytest.raises(LinftError, match="empty 'in' or 'out' split"):
        train_linear(cache, tmp_path / "runs", dropouts=(0.0,), lrs=(0.1,), weight_decays=(0.0,), seeds=1,
                     config=LinearGridConfig(steps=2), device="cpu", progress=False)

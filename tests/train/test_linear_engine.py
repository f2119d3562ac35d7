"""The linear fine-tuning engine: the model's formulas, and batched runs against plain one-by-one torch.optim.SGD runs.

The engine trains a whole grid as stacked tensors with differently factored
matmuls (``Σ_k (V ⊙ v_k) · φ_k`` batched over runs); the reference in
tests/reference.py is the loop people write (``(Σ_k v_k ⊙ φ_k) · Vᵀ``, one run
at a time). The two are different code paths, so they agree to a stated
tolerance, and their correct counts agree on every example that is not a
near-tie of the reference.
"""

import numpy as np
import pytest
import torch

from linft.data.splits import domain_split_rows
from linft.errors import LinftError
from linft.protocol.schedule import eval_steps, lr_at
from linft.train.linear.engine import GridPoint, Group, LinearData, LinearGridConfig, train_linear_grid
from linft.train.linear.model import group_generator, initial_parameters, linear_ft_logits
from linft._kernels.sparse_step import load_kernel

from helpers import refused, C, D, K, NDOM, synthetic
from reference import ATOL, RTOL, plain_sgd_run, reference_counts


def split_ids(domains, seed):
    ids = np.full(len(domains), -1)
    for (d, part), rows in domain_split_rows(domains, NDOM, seed).items():
        ids[rows] = 2 * d + (part == "out")
    return torch.from_numpy(ids)


def linear_data(feats, labels, domains, seeds, views=None) -> LinearData:
    return LinearData(features=torch.from_numpy(feats), labels=torch.from_numpy(labels),
                      split_rows={s: split_ids(domains, s) for s in seeds}, num_splits=2 * NDOM, num_classes=C,
                      views=views)


def assert_counts_agree(got_correct, rows_of, right, tie, where):
    """Correct counts per split equal the reference's on the decided examples; near-ties may go either way."""
    for (d, part), rows in rows_of.items():
        decided = int((right[rows] & ~tie[rows]).sum())
        got = int(got_correct[2 * d + (part == "out")])
        assert decided <= got <= decided + int(tie[rows].sum()), (where, d, part, got, decided, int(tie[rows].sum()))


POINTS = [GridPoint(0.05, 1e-3, 0.0), GridPoint(0.02, 1e-2, 0.5), GridPoint(0.05, 0.0, 0.9),
          GridPoint(0.05, 1e-3, 0.0, True)]


#: the engine's step kinds: the compiled sparse step (skipped where no C++ compiler builds it) and the torch step
STEP_KINDS = [pytest.param("sparse", marks=pytest.mark.skipif(load_kernel()[0] is None, reason="no compiled kernel")),
              "torch"]


@pytest.mark.parametrize("step_kind", STEP_KINDS)
@pytest.mark.parametrize("v_init,with_views", [("normal", False), ("last", False), ("last", True)])
def test_batched_engine_equals_one_by_one_sgd(v_init, with_views, step_kind):
    feats, labels, domains = synthetic()
    views = torch.from_numpy(feats)[:, None] * torch.tensor([0.5, 1.5]).view(1, 2, 1, 1) if with_views else None
    config = LinearGridConfig(steps=40, batch_size=5, eval_every=15, v_init=v_init, lr_milestones=(0.5,),
                              step_kind=step_kind)
    data = linear_data(feats, labels, domains, (0, 1), views)
    groups = []
    for e, s in [(0, 0), (2, 1), (1, 1)]:
        rows_of = domain_split_rows(domains, NDOM, s)
        groups.append(Group(e, s, [torch.from_numpy(rows_of[(d, "in")]) for d in range(NDOM) if d != e], POINTS))
    seen = {}
    v, V, b = train_linear_grid(data, groups, config, on_eval=lambda ev: seen.__setitem__(ev.step, ev))
    assert sorted(seen) == [0, 15, 30, 39]

    # The engine's parameters after each evaluation step: the same engine stopped right after that step, with the
    # lr milestone kept at the same step. Same code path and random streams, so the same numbers as the full run.
    at_step = {39: (v, V, b, seen[39])}
    for step in (0, 15, 30):
        stopped = LinearGridConfig(steps=step + 1, batch_size=5, eval_every=15, v_init=v_init, step_kind=step_kind,
                                   lr_milestones=config.milestone_steps())  # step numbers (> 1): step 20
        assert stopped.milestone_steps() == config.milestone_steps()
        last = {}
        params = train_linear_grid(data, groups, stopped, on_eval=lambda ev: last.__setitem__(ev.step, ev))
        np.testing.assert_array_equal(last[step].correct, seen[step].correct)
        at_step[step] = (*params, seen[step])

    X, Y = torch.from_numpy(feats), torch.from_numpy(labels)
    near_ties = 0
    for gi, g in enumerate(groups):
        rows_of = domain_split_rows(domains, NDOM, g.seed)
        for hi, p in enumerate(POINTS):
            _, _, _, snapshots, _ = plain_sgd_run(feats, labels, rows_of, C, g.test_domain, g.seed, p, config,
                                                     views)
            assert sorted(snapshots) == sorted(at_step)
            for step, (ev, eV, eb, point) in at_step.items():
                sv, sV, sb = snapshots[step]
                where = (gi, hi, step)
                torch.testing.assert_close(ev[gi, hi], sv, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where} v: {m}")
                torch.testing.assert_close(eV[gi, hi], sV, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where} V: {m}")
                torch.testing.assert_close(eb[gi, hi], sb, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where} b: {m}")
                right, tie = reference_counts(X, Y, sv, sV, sb)
                near_ties += int(tie.sum())
                assert_counts_agree(point.correct[gi, hi], rows_of, right, tie, where)
                assert point.total[gi].tolist() == [len(rows_of[(d, part)]) for d in range(NDOM)
                                                    for part in ("in", "out")]
    # the tolerance excludes few examples, so the counts are really compared (12 runs x 4 steps x 120 examples)
    assert near_ties <= 0.01 * len(groups) * len(POINTS) * len(at_step) * len(labels)


#: gentler grid points for long runs: at lr 0.05, dropout 0.9 and D = 6 the trajectory is chaotic, and float32
#: rounding alone (any two code paths) moves it by more than the tolerance after a few hundred steps
LONG_POINTS = [GridPoint(0.05, 1e-3, 0.0), GridPoint(0.02, 1e-2, 0.5), GridPoint(0.01, 1e-4, 0.9),
               GridPoint(0.05, 1e-3, 0.0, True)]


@pytest.mark.parametrize("step_kind", STEP_KINDS)
def test_engine_equals_plain_sgd_over_hundreds_of_steps_with_an_lr_drop(step_kind):
    """400 steps, lr ÷10 at step 200: every run's parameters and final counts against the plain torch.optim.SGD loop
    fed the same rows and masks (measured: at most 8% of the tolerance on this machine)."""
    feats, labels, domains = synthetic()
    config = LinearGridConfig(steps=400, batch_size=5, eval_every=400, v_init="normal", step_kind=step_kind)
    assert config.milestone_steps() == (200,)
    groups = []
    for e, s in [(0, 0), (2, 1)]:
        rows_of = domain_split_rows(domains, NDOM, s)
        groups.append(Group(e, s, [torch.from_numpy(rows_of[(d, "in")]) for d in range(NDOM) if d != e], LONG_POINTS))
    seen = {}
    v, V, b = train_linear_grid(linear_data(feats, labels, domains, (0, 1)), groups, config,
                                on_eval=lambda ev: seen.__setitem__(ev.step, ev))
    X, Y = torch.from_numpy(feats), torch.from_numpy(labels)
    for gi, g in enumerate(groups):
        rows_of = domain_split_rows(domains, NDOM, g.seed)
        for hi, p in enumerate(LONG_POINTS):
            sv, sV, sb, _, _ = plain_sgd_run(feats, labels, rows_of, C, g.test_domain, g.seed, p, config)
            for got, want in ((v, sv), (V, sV), (b, sb)):
                torch.testing.assert_close(got[gi, hi], want, rtol=RTOL, atol=ATOL)
            right, tie = reference_counts(X, Y, sv, sV, sb)
            assert_counts_agree(seen[399].correct[gi, hi], rows_of, right, tie, (gi, hi))


def feature_grid(dtype, views=False, n_per_domain=60, dim=64, classes=C, lr_scales=(1.0,), blocks=K):
    """Wider float16/float32 features (D = 64) and a grid of every kind of run, for the two step kinds."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, classes, NDOM * n_per_domain)
    domains = np.repeat(np.arange(NDOM), n_per_domain)
    feats = (rng.normal(size=(classes, blocks, dim))[labels]
             + rng.normal(size=(len(labels), blocks, dim))).astype(np.float32)
    X = torch.from_numpy(feats).to(dtype)
    data = LinearData(X, torch.from_numpy(labels), {s: split_ids(domains, s) for s in (0,)}, 2 * NDOM, classes,
                      views=torch.stack([X, (X.float() * 0.5).to(dtype)], 1) if views else None)
    points = [GridPoint(f * lr, wd, p, probe) for f in lr_scales for lr, wd, p, probe in
              [(0.005, 1e-3, 0.9, False), (0.01, 1e-4, 0.5, False), (0.002, 0.0, 0.95, False),
               (0.01, 1e-3, 0.0, False), (0.01, 1e-3, 0.0, True), (0.002, 1e-3, 0.9, False)]]
    groups = []
    for e in range(NDOM):
        rows_of = domain_split_rows(domains, NDOM, 0)
        groups.append(Group(e, 0, [torch.from_numpy(rows_of[(d, "in")]) for d in range(NDOM) if d != e], points))
    return data, groups


@pytest.mark.skipif(load_kernel()[0] is None, reason="no compiled kernel")
@pytest.mark.parametrize("dtype,views,classes,lr_scales,blocks,dim,batch", [
    (torch.float16, False, C, (1.0,), K, 64, 8), (torch.float32, True, C, (1.0,), K, 64, 8),
    (torch.float16, True, C, (1.0,), K, 64, 8), (torch.float32, False, 10, (1.0,), K, 64, 8),
    (torch.float32, False, 20, (1.0,), K, 64, 8), (torch.float32, False, C, (1.0, 0.5, 0.25), K, 64, 8),
    (torch.float16, False, C, (1.0,), 2, 64, 8), (torch.float16, False, C, (1.0,), K, 600, 10),
    (torch.float32, False, C, (1.0,), K, 300, 10)])
def test_sparse_step_equals_torch_step(dtype, views, classes, lr_scales, blocks, dim, batch):
    """The compiled sparse step and the pure-torch fallback: two code paths, the same runs to the tolerance
    (float16 features and views are read by the kernel itself; 10 classes take its 16-class path, 20 its path for
    any number of classes; 12 dropout runs per group fill two chunks of 8 lanes; K = 2 blocks its path for any K;
    600 float16 or 300 float32 units span two blocks of its feature buffer, the second partial, and 20 batch rows
    a full and a partial vector of rows), and the same evaluation counts but near-ties, which are few (the
    tolerance leaves the counts compared)."""
    data, groups = feature_grid(dtype, views, classes=classes, lr_scales=lr_scales, blocks=blocks, dim=dim)
    out = {}
    for kind in ("sparse", "torch"):
        seen = {}
        params = train_linear_grid(data, groups, LinearGridConfig(steps=150, batch_size=batch, eval_every=75,
                                                                  v_init="normal", step_kind=kind),
                                   on_eval=lambda ev: seen.__setitem__(ev.step, ev))
        out[kind] = params, seen
    for a, b in zip(out["sparse"][0], out["torch"][0]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    X = data.features.float()
    v, V, b = out["torch"][0]
    ties = compared = 0
    for gi in range(len(groups)):
        for hi in range(len(groups[0].points)):
            _, tie = reference_counts(X, data.labels, v[gi, hi], V[gi, hi], b[gi, hi])
            got = out["sparse"][1][149].correct[gi, hi] - out["torch"][1][149].correct[gi, hi]
            assert np.abs(got).sum() <= tie.sum()
            ties += int(tie.sum())
            compared += len(tie)
    assert ties <= 0.01 * compared


@pytest.mark.parametrize("step_kind", STEP_KINDS)
def test_same_seed_same_runs_bit_for_bit(step_kind):
    """The same code path twice: identical parameters and records (the draws are a function of (group, step))."""
    data, groups = feature_grid(torch.float16)
    config = LinearGridConfig(steps=30, batch_size=4, eval_every=10, step_kind=step_kind)
    runs = []
    for _ in range(2):
        seen = []
        runs.append((train_linear_grid(data, groups, config, on_eval=seen.append), seen))
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a, b)
    assert [(e.correct.tolist(), e.loss.tolist()) for e in runs[0][1]] == \
        [(e.correct.tolist(), e.loss.tolist()) for e in runs[1][1]]


def test_step_kinds_and_the_fallback(monkeypatch):
    """``sparse`` is refused in one line where the kernel cannot serve; ``auto`` then trains with the torch step."""
    data, groups = feature_grid(torch.bfloat16)
    with pytest.raises(LinftError, match="compiled sparse step is not available"):
        train_linear_grid(data, groups, LinearGridConfig(steps=2, step_kind="sparse"))
    auto = train_linear_grid(data, groups, LinearGridConfig(steps=3, step_kind="auto"))
    torch_only = train_linear_grid(data, groups, LinearGridConfig(steps=3, step_kind="torch"))
    assert all(torch.equal(a, b) for a, b in zip(auto, torch_only))  # the same code path
    load_kernel.cache_clear()
    try:
        monkeypatch.setenv("LINFT_SPARSE_KERNEL", "0")
        assert load_kernel() == (None, "disabled by LINFT_SPARSE_KERNEL=0")
        monkeypatch.setenv("LINFT_SPARSE_KERNEL", "1")
        monkeypatch.setenv("CXX", "/nonexistent/c++")
        load_kernel.cache_clear()
        kernel, why = load_kernel()
        assert kernel is None and why
    finally:
        load_kernel.cache_clear()
    with refused("step_kind"):
        LinearGridConfig(step_kind="fast").check()


def test_near_ties_are_the_only_examples_that_may_flip():
    """The near-tie rule of the test above: parameters moved within the tolerance change no decided prediction,
    and a prediction sitting exactly on a tie is flagged."""
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(500, K, D, generator=g)
    v, V, b = torch.randn(K, D, generator=g), torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    labels = torch.randint(C, (500,), generator=g)
    right, tie = reference_counts(phi, labels, v, V, b)
    for _ in range(20):
        moved = [t + (ATOL + RTOL * t.abs()) * (2 * torch.rand(t.shape, generator=g) - 1) for t in (v, V, b)]
        pred = linear_ft_logits(phi, *moved).argmax(1)
        assert ((pred == labels).numpy() == right)[~tie].all()
    W = torch.zeros(C, D)  # all logits equal to b: classes 0 and 1 tie exactly
    _, tie = reference_counts(phi[:3], labels[:3], v, W, torch.tensor([1.0, 1.0, 0.0]))
    assert tie.all()


def test_probe_touches_only_V_and_b():
    feats, labels, domains = synthetic()
    rows_of = domain_split_rows(domains, NDOM, 0)
    group = Group(0, 0, [torch.from_numpy(rows_of[(d, "in")]) for d in (1, 2)], [GridPoint(0.1, 1e-2, 0.0, True)])
    v, V, b = train_linear_grid(linear_data(feats, labels, domains, (0,)), [group],
                                LinearGridConfig(steps=20, batch_size=4, eval_every=10, v_init="normal"))
    expected_v = torch.zeros(K, D)
    expected_v[-1] = 1
    assert torch.equal(v[0, 0], expected_v)  # a probe's v is never updated: exact by construction
    v0, V0, b0 = initial_parameters(K, D, C, group_generator(0, 0, "init", "cpu"), "normal", True)
    assert not torch.allclose(V[0, 0], V0) and not torch.allclose(b[0, 0], b0)


def test_lr_schedule_and_eval_steps():
    assert lr_at(4999, 1e-3, (5000,)) == 1e-3 and lr_at(5000, 1e-3, (5000,)) == pytest.approx(1e-4)
    assert lr_at(25000, 1.0, (15000, 25000)) == pytest.approx(0.01)
    assert eval_steps(10_000, 300)[:3] == [0, 300, 600] and eval_steps(10_000, 300)[-2:] == [9900, 9999]
    assert LinearGridConfig(steps=40, lr_milestones=(0.5,)).milestone_steps() == (20,)


@pytest.mark.skipif(load_kernel()[0] is None, reason="no compiled kernel")
def test_sparse_step_does_not_depend_on_the_thread_count():
    """Groups run in parallel threads, each group in one thread: the dropout runs come out bit for bit the same;
    the compiled evaluation splits rows over threads, each row computed alike: the same counts."""
    data, groups = feature_grid(torch.float16, n_per_domain=150)
    sparse = [h for h, p in enumerate(groups[0].points) if p.dropout > 0 and not p.probe]
    before = torch.get_num_threads()
    out, counts = [], []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            seen = []
            out.append(train_linear_grid(data, groups, LinearGridConfig(steps=20, batch_size=4, eval_every=10,
                                                                        step_kind="sparse"), on_eval=seen.append))
            counts.append([ev.correct for ev in seen])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*out):
        assert torch.equal(a[:, sparse], b[:, sparse])
    assert len(counts[0]) == 3 and all(np.array_equal(x[:, sparse], y[:, sparse]) for x, y in zip(*counts))


@pytest.mark.skipif(load_kernel()[0] is None, reason="no compiled kernel")
@pytest.mark.parametrize("flags", ["-march=native -mno-avx512f", "-march=x86-64"])
def test_portable_builds_of_the_kernel_train_the_same_runs(flags, monkeypatch):
    """The kernel's paths for other CPUs (noise drawn 8 rows at a time with AVX2; or one at a time, halves converted
    without F16C and no FMA on a baseline x86-64) against the default build: the same runs to the tolerance, and
    the same evaluation counts but near-ties."""
    data, groups = feature_grid(torch.float16)
    config = LinearGridConfig(steps=100, batch_size=8, eval_every=50, v_init="normal", step_kind="sparse")
    out = []
    try:
        for env in (None, flags):
            if env is not None:
                monkeypatch.setenv("LINFT_KERNEL_FLAGS", env)
            load_kernel.cache_clear()
            seen = {}
            params = train_linear_grid(data, groups, config, on_eval=lambda ev: seen.__setitem__(ev.step, ev))
            out.append((params, seen[99].correct))
    finally:
        monkeypatch.delenv("LINFT_KERNEL_FLAGS", raising=False)
        load_kernel.cache_clear()
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    X = data.features.float()
    v, V, b = out[0][0]
    for gi in range(len(groups)):
        for hi in range(len(groups[0].points)):
            _, tie = reference_counts(X, data.labels, v[gi, hi], V[gi, hi], b[gi, hi])
            assert np.abs(out[0][1][gi, hi] - out[1][1][gi, hi]).sum() <= tie.sum()


@pytest.mark.skipif(load_kernel()[0] is None, reason="no compiled kernel")
def test_a_compiled_run_does_not_see_the_other_runs_of_its_grid():
    """Two things that touch only some lanes of the compiled step: a run that diverges (its lane is marked dead,
    the others go on), and a non-finite feature (kept by some lanes, dropped by others: the lanes that drop it add
    nothing, not 0·inf). A run's parameters and evaluations are the same bits alone and in the grid."""
    data, groups = feature_grid(torch.float16)
    feats = data.features.clone()
    feats[::50, 0, 5] = float("inf")  # one unit of a few rows overflowed float16
    data = LinearData(feats, data.labels, data.split_rows, data.num_splits, data.num_classes)
    alone = GridPoint(0.01, 1e-4, 0.95)
    grid = [GridPoint(1e4, 0.0, 0.9), alone, GridPoint(0.01, 1e-4, 0.1)]  # the first diverges
    config = LinearGridConfig(steps=40, batch_size=8, eval_every=20, step_kind="sparse")
    out = []
    for points in ([alone], grid):
        seen = []
        gs = [Group(g.test_domain, g.seed, g.train_pools, points) for g in groups]
        params = train_linear_grid(data, gs, config, on_eval=seen.append)
        h = points.index(alone)
        out.append(([t[:, h] for t in params], [(ev.correct[:, h], ev.diverged[:, h]) for ev in seen]))
        if len(points) > 1:  # the lr-1e4 run and the dropout-0.1 run (it keeps the inf units) diverge
            assert seen[-1].diverged[:, 0].all() and seen[-1].diverged[:, 2].all()
        else:  # the precondition of the comparison: alone, the 0.95 run lives on in some group
            assert not seen[-1].diverged[:, 0].all()
    for a, b in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for (c0, d0), (c1, d1) in zip(out[0][1], out[1][1]):
        assert np.array_equal(c0, c1) and np.array_equal(d0, d1)

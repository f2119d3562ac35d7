"""The engine's counter-based draws (rows, views, nested dropout masks) and its two evaluation forms."""

import numpy as np
import pytest
import torch

from linft.train.linear.draws import (NOISE, ROWS, draw_rows, draw_views, keep_mask, keep_threshold, lowbias32,
                                      padded_pools, row_words, unit_noise)
from linft.train.linear.evaluate import evaluate_grid
from linft._kernels.sparse_step import load_kernel

from helpers import refused, NEAR_TIE


def test_lowbias32_is_the_published_mixer():
    """Hand-computed from Wellons' lowbias32 (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b;
    x ^= x >> 16) with Python's unbounded integers."""
    def ref(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    assert lowbias32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]


@pytest.mark.skipif(load_kernel()[0] is None, reason="no compiled kernel")
def test_the_kernel_draws_the_same_noise():
    words = row_words(torch.tensor([7, 2**31 - 5]), 123, NOISE, 3)
    noise = unit_noise(words, 300)
    dll = load_kernel()[0]
    assert all(dll.linft_unit_noise(int(words[g, i]), d) == int(noise[g, i, d])
               for g in range(2) for i in range(3) for d in range(300))


def test_masks_are_nested_keep_the_right_share_and_differ_by_step():
    words = row_words(torch.tensor([3, 4]), 0, NOISE, 200)
    m5, m9, m95 = (keep_mask(words, 512, r) for r in (0.5, 0.9, 0.95))
    assert (m9 <= m5).all() and (m95 <= m9).all()  # a unit kept at 0.95 is kept at 0.9 and 0.5
    assert keep_mask(words, 512, 0.0).all() and keep_threshold(0.0) == 0
    n = m9.numel()  # 204,800 Bernoulli(0.1) draws: the share is within 4.5 standard errors of 0.1
    assert abs(m9.float().mean().item() - 0.1) < 4.5 * (0.1 * 0.9 / n) ** 0.5
    other_step = keep_mask(row_words(torch.tensor([3, 4]), 1, NOISE, 200), 512, 0.9)
    assert (other_step != m9).float().mean() > 0.1  # independent masks differ on about 18% of the units


def test_rows_come_from_each_training_pool_uniformly():
    pools = [[torch.arange(0, 5), torch.arange(100, 103)], [torch.arange(50, 57), torch.arange(200, 201)]]
    padded, sizes = padded_pools(pools, "cpu")
    keys = torch.tensor([11, 12])
    counts = torch.zeros(300, dtype=torch.long)
    for step in range(400):
        rows = draw_rows(padded, sizes, row_words(keys, step, ROWS, 2 * 8), 8)  # (2 groups, 2 pools x 8 rows)
        for g in range(2):
            for t in range(2):
                assert set(rows[g, 8 * t:8 * (t + 1)].tolist()) <= set(pools[g][t].tolist())
        counts += torch.bincount(rows.flatten(), minlength=300)
    # 400 x 8 draws per pool: each of n rows expects 3200/n, within 5 standard errors
    for pool in (pools[0][0], pools[0][1], pools[1][0]):
        n = len(pool)
        expected = 3200 / n
        assert (counts[pool] - expected).abs().max() < 5 * (expected * (1 - 1 / n)) ** 0.5
    assert counts[200] == 3200
    views = draw_views(row_words(keys, 0, 2, 1000), 3)
    assert set(views.flatten().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("C, D, G, H", [(40, 32, 2, 3), (7, 200, 2, 3), (13, 300, 2, 5)])
def test_evaluation_forms_count_the_same_but_near_ties(C, D, G, H):
    """folded, factored and (up to 16 classes, with the compiled kernel) compiled: 6 runs fill one chunk of 8
    lanes, 10 runs two; D = 200 and 300 end in a partial tile of units."""
    g = torch.Generator().manual_seed(0)
    N, K, S = 400, 3, 4
    phi, labels = torch.randn(N, K, D, generator=g).half(), torch.randint(C, (N,), generator=g)
    v, Vt, b = (torch.randn(G, H, K, D, generator=g), torch.randn(G, H, D, C, generator=g),
                torch.randn(G, H, C, generator=g))
    split = torch.randint(-1, S, (G, N), generator=g)
    folded = evaluate_grid(phi, labels, split, v, Vt, b, S, 64, "folded")
    factored = evaluate_grid(phi, labels, split, v, Vt, b, S, 64, "factored")
    forms = [folded, factored]
    if C <= 16 and load_kernel()[0] is not None:
        forms.append(evaluate_grid(phi, labels, split, v, Vt, b, S, 64, "compiled"))
        assert np.array_equal(evaluate_grid(phi, labels, split, v, Vt, b, S, 64, "auto"), forms[-1])
    ties = 0
    for gi in range(G):
        for hi in range(H):
            # the logits in float64: the two forms round differently only far below NEAR_TIE
            logits = torch.einsum("nkd,kd,dc->nc", phi.double(), v[gi, hi].double(), Vt[gi, hi].double()) + b[gi, hi]
            top2 = logits.topk(2, dim=1)
            right = (top2.indices[:, 0] == labels).numpy()
            tie = (top2.values[:, 0] - top2.values[:, 1] < NEAR_TIE).numpy()
            for s in range(S):
                rows = (split[gi] == s).numpy()
                decided = int((right & ~tie & rows).sum())
                for counts in forms:
                    assert decided <= counts[gi, hi, s] <= decided + int((tie & rows).sum())
                ties += int((tie & rows).sum())
    assert ties <= 0.01 * G * H * N  # the comparison is not vacuous
    with refused("form"):
        evaluate_grid(phi, labels, split, v, Vt, b, S, 64, "fast")


def test_draws_of_many_steps_at_once_equal_the_draws_of_each_step():
    """The engine makes a CPU run's draws many steps at a time; they must be the draws of each step."""
    from linft.train.linear.draws import draw_rows, padded_pools, row_words
    keys = torch.tensor([5, 1234567, 2**31 - 1])
    pools, sizes = padded_pools([[torch.arange(7), torch.arange(10, 13)] for _ in range(3)], "cpu")
    steps = torch.arange(3, 9)[:, None]
    many = row_words(keys, steps, 1, 8)
    rows = draw_rows(pools, sizes, many, 4)
    for j, step in enumerate(range(3, 9)):
        assert torch.equal(many[j], row_words(keys, step, 1, 8))
        assert torch.equal(rows[j], draw_rows(pools, sizes, row_words(keys, step, 1, 8), 4))


def test_a_memory_budget_makes_evaluation_chunks_smaller_not_counts_different(monkeypatch):
    """max_bytes bounds a chunk's rows (and their float32 copy and logits), down to MIN_BUDGET_CHUNK rows; the
    counts do not change (the compiled form computes each row alike in any chunk; the folded GEMM may round
    otherwise only at near-ties, which this precondition rules out: no top-2 margin below NEAR_TIE)."""
    import linft.train.linear.evaluate as le
    g = torch.Generator().manual_seed(3)
    N, K, D, C, G, H, S = 700, 3, 40, 5, 2, 3, 3
    phi, labels = torch.randn(N, K, D, generator=g).half(), torch.randint(C, (N,), generator=g)
    v, Vt, b = (torch.randn(G, H, K, D, generator=g), torch.randn(G, H, D, C, generator=g),
                torch.randn(G, H, C, generator=g))
    split = torch.randint(-1, S, (G, N), generator=g)
    logits = torch.einsum("nkd,ghkd,ghdc->nghc", phi.double(), v.double(), Vt.double()) + b.double()
    top2 = logits.topk(2, dim=-1).values
    keep = ((top2[..., 0] - top2[..., 1]) >= NEAR_TIE).all(-1).all(-1)  # rows with no near-tie in any run
    phi, labels, split = phi[keep].contiguous(), labels[keep], split[:, keep]
    sizes = []
    counts = le.split_counts
    monkeypatch.setattr(le, "split_counts", lambda right, *a: (sizes.append(len(right)), counts(right, *a))[1])
    forms = ["folded"] + (["compiled"] if load_kernel()[0] is not None else [])
    # bytes per row: the float16 row, its float32 copy and the logits (folded); the row and a prediction (compiled)
    # (and the int64 argmax and float64 "right" table of split_counts; the kernel pads its predictions to 8 runs)
    per_row = {"folded": K * D * 6 + G * H * C * 4 + 16 * G * H, "compiled": K * D * 2 + 4 * 8 + 8 * G * H}
    for form in forms:
        whole = evaluate_grid(phi, labels, split, v, Vt, b, S, 4096, form)
        sizes.clear()
        small = evaluate_grid(phi, labels, split, v, Vt, b, S, 4096, form, max_bytes=100 * per_row[form])
        assert np.array_equal(whole, small)
        n = len(phi)
        assert sizes == [100] * (n // 100) + [n % 100] * (n % 100 > 0) and n > 200
        sizes.clear()
        evaluate_grid(phi, labels, split, v, Vt, b, S, 4096, form, max_bytes=1)
        assert sizes[0] == le.MIN_BUDGET_CHUNK

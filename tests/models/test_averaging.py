"""Weight averages, interpolation, running means and greedy soups (linft.models.averaging) match their formulas."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from linft.errors import LinftError
from linft.models.averaging import (
    RunningAverage, average_state_dicts, greedy_soup, interpolate_state_dicts,
)
from helpers import refused

BIG = 2**53 + 1  # float64 cannot hold it: a float round-trip gives 2**53


class Tiny(nn.Module):
    """Conv → BN → pool → Linear, plus buffers of the other dtypes a state_dict can hold."""

    def __init__(self, classes=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(4, classes)
        self.register_buffer("half_buf", torch.randn(5, generator=g).half())
        self.register_buffer("double_buf", torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.register_buffer("mask", torch.rand(6, generator=g) > 0.5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            bn = self.body[1]
            bn.running_mean.copy_(torch.randn(4, generator=g))
            bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            bn.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=g)))

    def forward(self, x):
        return self.fc(self.body(x))


def sds(n, classes=3):
    return [Tiny(classes, seed=s).state_dict() for s in range(n)]


def clone_sd(sd):
    return {k: v.clone() for k, v in sd.items()}


def assert_sd_equal(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


#: One rounding of each dtype, relative (values here are of order 1).
ROUNDING = {torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-14}


def assert_sd_close(a, b):
    """Two code paths computing the same average: the same keys in the same order and dtypes; integer and bool
    entries equal exactly (maxima, never a float round-trip); float entries, both accumulated in float64 and cast
    back once, agree to one rounding of their own dtype (the float64 sums may be taken in another order)."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].is_floating_point():
            tol = ROUNDING[a[k].dtype]
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- average_state_dicts

def test_weighted_average_matches_numpy_on_every_float_key_and_keeps_dtypes_order_and_inputs():
    inputs = sds(3)
    before = [clone_sd(sd) for sd in inputs]
    weights = [1.0, 2.0, 5.0]
    avg = average_state_dicts(inputs, weights)

    assert list(avg) == list(inputs[0])
    tol = ROUNDING  # float64 accumulation (here and in numpy), one cast to the entry's dtype
    float_keys = [k for k, v in inputs[0].items() if v.is_floating_point()]
    assert {"fc.weight", "body.1.running_mean", "body.1.running_var", "half_buf", "double_buf"} <= set(float_keys)
    for k in float_keys:
        stack = np.stack([sd[k].double().numpy() for sd in inputs])
        expected = np.tensordot(np.array(weights) / sum(weights), stack, axes=1)
        assert avg[k].dtype == inputs[0][k].dtype, k
        np.testing.assert_allclose(avg[k].double().numpy(), expected, rtol=tol[avg[k].dtype], atol=tol[avg[k].dtype])
    for sd, b in zip(inputs, before):
        assert_sd_equal(sd, b)


def test_hand_computed_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 4.0]), "h": torch.tensor([1.5], dtype=torch.float16)}
    # every value, product and sum here is a small dyadic rational: exact in float64 and in float16, so the
    # library's result equals the hand-computed one bit for bit by construction, in any summation order
    out = average_state_dicts([a, b], weights=[1, 3])  # normalised to 1/4, 3/4
    assert torch.equal(out["w"], torch.tensor([2.5, 3.5]))
    assert torch.equal(out["h"], torch.tensor([1.25], dtype=torch.float16))
    assert torch.equal(average_state_dicts([a, b])["w"], torch.tensor([2.0, 3.0]))


def test_averaging_identical_models_is_the_identity_and_returns_new_tensors():
    sd = Tiny().state_dict()
    for n in (1, 2, 3):
        out = average_state_dicts([sd] * n)
        assert_sd_equal(out, sd)
        assert all(out[k].data_ptr() != sd[k].data_ptr() for k in sd)
    masks = [{"m": torch.tensor([0.0, -math.inf, 1.0], dtype=torch.float64)},
             {"m": torch.tensor([2.0, -math.inf, 1.0], dtype=torch.float64)}]
    assert torch.equal(average_state_dicts(masks)["m"], torch.tensor([1.0, -math.inf, 1.0], dtype=torch.float64))
    out = average_state_dicts([sd])
    out["fc.weight"].add_(1.0)
    out["body.1.num_batches_tracked"].add_(1)
    assert not torch.equal(out["fc.weight"], sd["fc.weight"])
    assert not torch.equal(out["body.1.num_batches_tracked"], sd["body.1.num_batches_tracked"])


def test_integer_and_bool_entries_are_the_maximum_without_a_float_round_trip():
    assert float(torch.tensor(BIG).double()) == 2.0**53  # the corruption the rule avoids
    a, b, c = sds(3)
    for sd, n in zip((a, b, c), (BIG, BIG, BIG)):
        sd["body.1.num_batches_tracked"] = torch.tensor(n)
    assert average_state_dicts([a, b, c])["body.1.num_batches_tracked"].item() == BIG  # all equal: kept exactly
    b["body.1.num_batches_tracked"] = torch.tensor(BIG + 2)
    c["body.1.num_batches_tracked"] = torch.tensor(5)
    out = average_state_dicts([a, b, c], weights=[0.1, 0.1, 10.0])
    assert out["body.1.num_batches_tracked"].dtype == torch.int64
    assert out["body.1.num_batches_tracked"].item() == BIG + 2  # maximum, whatever the weights
    # a model with weight 0 takes no part
    assert average_state_dicts([a, b, c], weights=[1, 0, 1])["body.1.num_batches_tracked"].item() == BIG
    # bool: maximum = logical or
    assert torch.equal(average_state_dicts([a, b, c])["mask"], a["mask"] | b["mask"] | c["mask"])


def test_average_loads_strictly_into_the_architecture():
    avg = average_state_dicts(sds(3), weights=[0.2, 0.3, 0.5])
    model = Tiny(seed=99)
    model.load_state_dict(avg, strict=True)
    assert_sd_equal({k: v for k, v in model.state_dict().items()}, avg)
    assert model.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_key_mismatch_names_keys_and_what_to_do():
    a, b = sds(2)
    b["extra.weight"] = torch.zeros(1)
    del b["fc.bias"]
    with pytest.raises(LinftError) as e:
        average_state_dicts([a, b])
    msg = str(e.value)
    assert "'fc.bias'" in msg and "'extra.weight'" in msg and "same architecture and class set" in msg
    assert "\n" not in msg


def test_shape_mismatch_different_class_count_names_key_and_both_shapes():
    with pytest.raises(LinftError, match=r"'fc.weight' has shape \(3, 4\) in state_dict 0 but \(5, 4\) "
                                         r"in state_dict 1.*same architecture and class set"):
        average_state_dicts([Tiny(3).state_dict(), Tiny(5).state_dict()])


def test_dtype_mismatch_and_non_tensor_entries_are_errors():
    a, b = sds(2)
    b["double_buf"] = b["double_buf"].float()
    with pytest.raises(LinftError, match="'double_buf' has dtype torch.float64 .* torch.float32"):
        average_state_dicts([a, b])
    with pytest.raises(LinftError, match="'meta' is a str, not a tensor"):
        average_state_dicts([{"meta": "x"}, {"meta": "x"}])


def test_empty_list_and_bad_weights():
    with pytest.raises(LinftError, match="at least one"):
        average_state_dicts([])
    two = sds(2)
    for weights, match in [([1.0], "2 state_dicts"), ([1, 2, 3], "3 weights"), ([1, -1], "non-negative"),
                           ([1, float("nan")], "finite"), ([1, float("inf")], "finite"), ([0, 0], "positive sum"),
                           (["a", 1], "numbers")]:
        with pytest.raises(LinftError, match=match):
            average_state_dicts(two, weights)


# ---------------------------------------------------------------- interpolation

def test_interpolation_end_points_are_exact_and_midpoints_follow_the_formula():
    start, end = sds(2)
    end["body.1.num_batches_tracked"] = start["body.1.num_batches_tracked"] + 7
    # exact by construction: a weight-0 end takes no part, and the one remaining model is kept as it is
    assert_sd_equal(interpolate_state_dicts(start, end, 0.0), start)
    assert_sd_equal(interpolate_state_dicts(start, end, 1), end)
    alpha = 0.25
    mid = interpolate_state_dicts(start, end, alpha)
    for k in ("fc.weight", "body.0.weight", "body.1.running_var", "double_buf"):
        expected = (1 - alpha) * start[k].double() + alpha * end[k].double()
        torch.testing.assert_close(mid[k], expected.to(start[k].dtype), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mid["half_buf"].double(),
                               0.75 * start["half_buf"].double() + 0.25 * end["half_buf"].double(),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), float("inf")])
def test_interpolation_alpha_out_of_range(alpha):
    start, end = sds(2)
    with refused("alpha"):
        interpolate_state_dicts(start, end, alpha)


# ---------------------------------------------------------------- running average

def test_running_average_equals_average_of_the_stream_and_copies_its_inputs():
    model = Tiny(seed=0)
    stream = []
    running = RunningAverage()
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
            model.half_buf.add_(torch.randn(5, generator=g).half())
            model.body[1].num_batches_tracked.add_(BIG if step == 0 else 3)
        running.update(model.state_dict())  # live tensors: the next step changes them in place
        stream.append(clone_sd(model.state_dict()))
    assert running.count == 4
    value = running.value()
    assert_sd_close(value, average_state_dicts(stream))
    assert value["body.1.num_batches_tracked"].item() == stream[-1]["body.1.num_batches_tracked"].item()
    kept = clone_sd(value)
    value["fc.weight"].zero_()  # value() hands out new tensors
    assert_sd_equal(running.value(), kept)  # the same code path twice: bit for bit


def test_running_average_errors():
    with pytest.raises(LinftError, match="empty"):
        RunningAverage().value()
    running = RunningAverage()
    running.update(Tiny(3).state_dict())
    with pytest.raises(LinftError, match="'fc.weight' has shape"):
        running.update(Tiny(5).state_dict())
    assert running.count == 1


# ---------------------------------------------------------------- greedy soup

def test_greedy_soup_on_a_hand_computed_case_with_a_tie():
    # evaluate = -|w - 1|; candidates w = 0, 2, 10, 1, -5 (already "sorted" by their own accuracy)
    values = [0.0, 2.0, 10.0, 1.0, -5.0]
    counts = [4, 9, 100, 7, 50]
    cands = [{"w": torch.tensor([v], dtype=torch.float64), "n": torch.tensor(c)} for v, c in zip(values, counts)]
    seen = []

    def evaluate(sd):
        seen.append(sd["w"].item())
        return -abs(sd["w"].item() - 1.0)

    soup, chosen, scores = greedy_soup(cands, evaluate)
    # {0}: w 0, score -1 | +2: w 1, score 0, kept | +10: w 4, score -3, dropped
    # +1: w (0+2+1)/3 = 1, score 0 = best: tie, kept | -5: w (0+2+1-5)/4 = -0.5, score -1.5, dropped
    assert seen == [0.0, 1.0, 4.0, 1.0, -0.5]
    assert chosen == [0, 1, 3]
    assert scores == [-1.0, 0.0, -3.0, 0.0, -1.5]
    assert soup["w"].item() == 1.0 and soup["w"].dtype == torch.float64
    assert soup["n"].item() == 9  # integer entries: maximum over the chosen ones only
    assert_sd_equal(soup, average_state_dicts([cands[i] for i in chosen]))  # the soup's own computation, run again
    # model-soups' rule (strict improvement): the tie at +1 is dropped; then -5: w (0+2-5)/3 = -1, score -2
    seen.clear()
    soup, chosen, scores = greedy_soup(cands, evaluate, strict=True)
    assert chosen == [0, 1] and scores == [-1.0, 0.0, -3.0, 0.0, -2.0] and soup["w"].item() == 1.0


def test_greedy_soup_of_one_candidate_and_errors():
    sd = Tiny().state_dict()
    soup, chosen, scores = greedy_soup([sd], lambda s: 0.5)
    assert_sd_equal(soup, sd) and chosen == [0] and scores == [0.5]
    with pytest.raises(LinftError, match="at least one"):
        greedy_soup([], lambda s: 0.0)
    calls = []
    with pytest.raises(LinftError, match="'fc.weight' has shape"):
        greedy_soup([Tiny(3).state_dict(), Tiny(5).state_dict()], lambda s: calls.append(1) or 0.0)
    assert calls == []  # incompatible candidates fail before any evaluation
    with pytest.raises(LinftError, match="nan"):
        greedy_soup(sds(2), lambda s: float("nan"))

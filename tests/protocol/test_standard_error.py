"""The standard error's two conventions against hand computations and DomainBed's own expression."""

import math

import numpy as np
import pytest

from linft.errors import LinftError
from linft.protocol.selection import SE_CONVENTIONS, mean_and_se


def test_both_conventions_by_hand():
    # two values a, b: sample std = |a - b| / sqrt(2), so SE = |a - b| / 2; population std = |a - b| / 2, so
    # SE = |a - b| / (2 sqrt(2))
    assert mean_and_se([0.5, 0.6]) == pytest.approx((0.55, 0.05))
    assert mean_and_se([0.5, 0.6], se="sample") == pytest.approx((0.55, 0.05))
    assert mean_and_se([0.5, 0.6], se="domainbed") == pytest.approx((0.55, 0.1 / (2 * math.sqrt(2))))
    # three values 0.5, 0.6, 0.8: mean 1.9 / 3; the squared deviations from it sum to 0.14 / 3
    values, mean, ss = [0.5, 0.6, 0.8], 1.9 / 3, (0.5 - 1.9 / 3) ** 2 + (0.6 - 1.9 / 3) ** 2 + (0.8 - 1.9 / 3) ** 2
    assert ss == pytest.approx(0.14 / 3)
    assert mean_and_se(values) == pytest.approx((mean, math.sqrt(ss / 2) / math.sqrt(3)))
    assert mean_and_se(values, se="domainbed") == pytest.approx((mean, math.sqrt(ss / 3) / math.sqrt(3)))
    # one value: no spread in either convention; no value: no mean
    assert mean_and_se([0.7]) == (0.7, 0.0) and mean_and_se([0.7], se="domainbed") == (0.7, 0.0)
    assert all(math.isnan(x) for x in mean_and_se([], se="domainbed"))
    assert SE_CONVENTIONS == {"sample": 1, "domainbed": 0}


def test_domainbed_convention_is_domainbeds_format_mean():
    data = list(np.random.default_rng(0).random(5))
    # DomainBed's collect_results.format_mean: err = np.std(list(data) / np.sqrt(len(data))) (before its 100x);
    # a different order of operations than ours: equal up to float64 rounding, far inside approx's rel 1e-6
    err = np.std(list(data) / np.sqrt(len(data)))
    assert mean_and_se(data, se="domainbed") == pytest.approx((np.mean(data), err))


def test_unknown_convention_is_refused():
    with pytest.raises(LinftError, match="unknown standard-error convention se='ddof0'; use one of sample, domainbed"):
        mean_and_se([0.1, 0.2], se="ddof0")

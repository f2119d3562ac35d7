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
    # 0, 0, 0.6: mean 0.2, deviations -0.2, -0.2, 0.4, squares summing to 0.24; sample variance 0.24 / 2 = 0.12,
    # SE = sqrt(0.12 / 3) = 0.2; population variance 0.08, SE = sqrt(0.08 / 3)
    assert mean_and_se([0.0, 0.0, 0.6]) == pytest.approx((0.2, 0.2))
    assert mean_and_se([0.0, 0.0, 0.6], se="domainbed") == pytest.approx((0.2, math.sqrt(0.08 / 3)))
    # 0.1, 0.1, 0.9, 0.9: mean 0.5, every deviation 0.4; population variance 0.16, SE = 0.4 / sqrt(4) = 0.2;
    # sample variance 0.64 / 3, SE = sqrt(0.64 / 12) = 0.4 / sqrt(3)
    assert mean_and_se([0.1, 0.1, 0.9, 0.9], se="domainbed") == pytest.approx((0.5, 0.2))
    assert mean_and_se([0.1, 0.1, 0.9, 0.9]) == pytest.approx((0.5, 0.4 / math.sqrt(3)))
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
    with pytest.raises(LinftError) as err:
        mean_and_se([0.1, 0.2], se="ddof0")
    assert err.value.param == "se" and "ddof0" in str(err.value)

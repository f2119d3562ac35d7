"""Accuracies, model selection and mean ± SE on run records, against hand-computed answers."""

import math

import numpy as np
import pytest
import torch

from linft.errors import LinftError
from linft.protocol.selection import (SELECTIONS, group_runs, iid_accuracy, mean_and_se, ood_accuracy,
                                      predicted_classes, select_by_iid, select_oracle, split_counts)

from helpers import rec


def test_accuracies_by_hand():
    r = rec(0, a_out=7, b_out=9, c_in=20, c_out=5)
    assert iid_accuracy(r) == pytest.approx((0.7 + 0.9) / 2)  # mean over the training domains' out splits
    assert ood_accuracy(r) == pytest.approx(25 / 50)  # the held-out domain's in and out splits pooled
    uneven = {**r, "splits": {**r["splits"], "a_out": [1, 4]}}  # a mean of accuracies, not of counts
    assert iid_accuracy(uneven) == pytest.approx((0.25 + 0.9) / 2)
    empty = {**r, "splits": {**r["splits"], "a_out": [0, 0]}}
    assert math.isnan(iid_accuracy(empty))


def test_split_counts_by_hand():
    predictions, labels = [0, 1, 1, 2, 0, 2], [0, 1, 0, 2, 2, 2]
    rows = {(0, "in"): np.array([0, 1]), (0, "out"): np.array([2]), (1, "in"): np.array([3, 4]),
            (1, "out"): np.array([5])}
    assert split_counts(predictions, labels, rows, ["x", "y"]) == {
        "x_in": [2, 2], "x_out": [0, 1], "y_in": [1, 2], "y_out": [1, 1]}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_predict_no_class_and_have_no_accuracy(bad):
    """A row with a NaN or inf logit has no predicted class (-1; torch's argmax would call a NaN the maximum), and
    counts of such predictions are None (no accuracy, never a number), however few the rows."""
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 1.0, 0.0], [0.0, 1.0, 5.0], [1.0, 0.0, 0.0]])
    assert predicted_classes(logits).tolist() == [1, 0, 2, 0]
    logits[2, 0] = bad
    assert predicted_classes(logits).tolist() == [1, 0, -1, 0]
    assert predicted_classes(torch.stack([logits, logits.abs()])).tolist() == [[1, 0, -1, 0], [1, 0, -1, 0]]
    rows = {(0, "in"): np.array([0, 1]), (0, "out"): np.array([2, 3])}
    assert split_counts(predicted_classes(logits), [1, 0, 2, 1], rows, ["x"]) is None
    logits[2, 0] = 0.0
    assert split_counts(predicted_classes(logits), [1, 0, 2, 1], rows, ["x"]) == {"x_in": [2, 2], "x_out": [1, 2]}


def test_selection_best_iid_earliest_on_ties_and_oracle():
    runs = [rec(0, 5, 5, 10, 1), rec(300, 8, 6, 30, 5), rec(600, 6, 8, 40, 10), rec(900, 9, 9, 0, 0)]
    assert select_by_iid(runs[:3])["step"] == 300  # iid 0.7 at 300 and 600: the earlier wins
    assert select_by_iid(list(reversed(runs[:3])))["step"] == 300  # whatever the order of the records
    assert select_by_iid(list(reversed(runs)))["step"] == 900
    assert select_oracle(runs)["step"] == 600
    assert SELECTIONS == {"iid": select_by_iid, "oracle": select_oracle}
    with pytest.raises(LinftError):
        select_by_iid([])


def test_mean_and_standard_error():
    m, se = mean_and_se([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and se == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1) / np.sqrt(3))
    assert mean_and_se([0.4]) == (0.4, 0.0)
    assert all(math.isnan(x) for x in mean_and_se([]))
    assert mean_and_se(x for x in (0.2, 0.4)) == pytest.approx((0.3, 0.1))  # any iterable; SE = |a - b| / 2


def test_group_runs_keeps_the_attempt_that_finished():
    records = [rec(0, 1, 1, 1, 1, attempt="old"),  # an interrupted attempt
               rec(0, 2, 2, 2, 2, attempt="new"), rec(5, 3, 3, 3, 3, attempt="new", final=True),
               rec(9, 1, 1, 1, 1, attempt="old")]
    runs = group_runs(records)
    assert [r["step"] for r in runs["r1"]] == [0, 5] and all(r["attempt"] == "new" for r in runs["r1"])
    # an unfinished run keeps its last attempt, its records sorted by step
    unfinished = group_runs([rec(3, 0, 0, 0, 0, attempt="1", run_id="u"), rec(6, 0, 0, 0, 0, attempt="2", run_id="u"),
                             rec(2, 0, 0, 0, 0, attempt="2", run_id="u")])
    assert [(r["attempt"], r["step"]) for r in unfinished["u"]] == [("2", 2), ("2", 6)]
    assert group_runs([]) == {}

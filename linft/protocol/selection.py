"""Accuracies and model selection on run records: pure functions of the records, never of a model.

A *record* is one JSON object (see :mod:`linft.protocol.records`) with
``splits = {"<domain>_in": [correct, total], "<domain>_out": [...]}``,
``test_domain`` and ``train_domains``.

* i.i.d. accuracy: the mean accuracy over the training domains' "out" splits;
* o.o.d. accuracy: accuracy on the whole held-out domain (its in and out parts pooled);
* selection: per run, the evaluation step with the best i.i.d. accuracy,
  earliest on ties (``select_by_iid``), or the best o.o.d. (``select_oracle``);
* mean ± standard error over seeds (:func:`mean_and_se`, :data:`SE_CONVENTIONS`).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from linft.errors import LinftError


def predicted_classes(logits):
    """The predicted class of each row of a torch tensor of logits (argmax over the last dimension), -1 (no class)
    for a row holding a NaN or inf logit: the accuracy of such logits is not a number (:func:`split_counts`)."""
    return logits.argmax(-1).masked_fill(~logits.isfinite().all(-1), -1)


def split_counts(predictions, labels, split_rows: dict, domain_names: list[str]) -> dict | None:
    """``{"<domain>_in"|"<domain>_out": [correct, total]}`` of predicted classes (N,) against ``labels`` (N,); None
    (no accuracy: a record of it is ``diverged``) when a prediction is -1, a row of non-finite logits
    (:func:`predicted_classes`)."""
    predictions = np.asarray(predictions)
    if (predictions < 0).any():
        return None
    right = predictions == np.asarray(labels)
    return {f"{domain_names[d]}_{part}": [int(right[rows].sum()), int(len(rows))]
            for (d, part), rows in sorted(split_rows.items())}


def split_accuracy(splits: dict, name: str) -> float:
    """Accuracy on one split of a record (nan when the split is empty)."""
    correct, total = splits[name]
    return correct / total if total else float("nan")


def iid_accuracy(record: dict) -> float:
    """Mean accuracy over the training domains' "out" splits."""
    return float(np.mean([split_accuracy(record["splits"], f"{d}_out") for d in record["train_domains"]]))


def ood_accuracy(record: dict) -> float:
    """Accuracy on the whole held-out domain (in and out parts pooled)."""
    d = record["test_domain"]
    c_in, t_in = record["splits"][f"{d}_in"]
    c_out, t_out = record["splits"][f"{d}_out"]
    return (c_in + c_out) / (t_in + t_out)


def select_by_iid(run_records: list[dict]) -> dict:
    """The record of the evaluation step with the best i.i.d. accuracy; the earliest step on ties."""
    return _select(run_records, iid_accuracy)


def select_oracle(run_records: list[dict]) -> dict:
    """The record of the step with the best o.o.d. accuracy (an upper bound, not a fair selection)."""
    return _select(run_records, ood_accuracy)


def _select(run_records, score):
    if not run_records:
        raise LinftError("no evaluation records to select from")
    ordered = sorted(run_records, key=lambda r: r["step"])
    best = ordered[0]
    for r in ordered[1:]:
        if score(r) > score(best):
            best = r
    return best


SELECTIONS = {"iid": select_by_iid, "oracle": select_oracle}


#: Standard-error conventions: name -> ddof of the standard deviation in ``std(values, ddof) / sqrt(n)``.
#: ``sample`` (linft's default) uses the sample standard deviation (ddof=1); ``domainbed`` uses numpy's default
#: population standard deviation (ddof=0), as DomainBed's ``collect_results.format_mean`` does, so that tables
#: compare with published DomainBed tables.
SE_CONVENTIONS = {"sample": 1, "domainbed": 0}
#: Each convention's formula in words (summary.md states the one used).
SE_FORMULAS = {"sample": "SE = std(x, ddof=1) / sqrt(n) over the n seeds (sample standard deviation; 0 for n = 1)",
               "domainbed": "SE = std(x, ddof=0) / sqrt(n) over the n seeds (population standard deviation, "
                            "as DomainBed's format_mean)"}


def check_se(se: str) -> str:
    """``se`` when it names a convention of :data:`SE_CONVENTIONS`; a :class:`LinftError` otherwise."""
    if se not in SE_CONVENTIONS:
        raise LinftError(f"unknown standard-error convention se={se!r}; use one of {', '.join(SE_CONVENTIONS)}",
                         param="se")
    return se


def mean_and_se(values, se: str = "sample") -> tuple[float, float]:
    """Mean and standard error ``std(values, ddof) / sqrt(n)`` with the ddof of :data:`SE_CONVENTIONS` [se].

    ``sample``: ddof=1 (0 for a single value); ``domainbed``: ddof=0. NaN, NaN for no value.
    """
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    ddof = SE_CONVENTIONS[check_se(se)]
    err = float(v.std(ddof=ddof) / math.sqrt(v.size)) if v.size > ddof else 0.0
    return float(v.mean()), err


def group_runs(records: list[dict]) -> dict[str, list[dict]]:
    """Records of each run (by ``run_id``), from the attempt that finished it when there is one.

    An interrupted attempt leaves records without a ``final`` one; they are
    ignored once a later attempt finishes the run, and kept (flagged
    unfinished) otherwise.
    """
    by_run: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_run[r["run_id"]][r.get("attempt", "")].append(r)
    out = {}
    for run_id, attempts in by_run.items():
        finished = [a for a, rs in attempts.items() if any(r.get("final") for r in rs)]
        chosen = finished[-1] if finished else list(attempts)[-1]
        out[run_id] = sorted(attempts[chosen], key=lambda r: r["step"])
    return out

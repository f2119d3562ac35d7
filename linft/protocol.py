"""The leave-one-domain-out protocol on top of run records: splits, accuracies, selection, aggregation.

Pure functions only. A *record* is one JSON object (see :mod:`linft.records`)
with ``splits = {"<domain>_in": [correct, total], "<domain>_out": [...]}``,
``test_domain`` and ``train_domains``.

* i.i.d. accuracy: the mean accuracy over the training domains' "out" splits;
* o.o.d. accuracy: accuracy on the whole held-out domain (its in and out parts pooled);
* selection: per run, the evaluation step with the best i.i.d. accuracy,
  earliest on ties (``select_by_iid``), or the best o.o.d. (``select_oracle``);
* the "1296" cloud: per held-out domain and grid point, average the seeds;
  every way of choosing one grid point per domain gives one point
  ``(mean_e iid, mean_e ood)`` (:func:`cloud_points`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from itertools import product

import numpy as np

from linft.data import split_indices
from linft.errors import LinftError

#: Up to this many combinations the cloud is enumerated exactly; above it is sampled.
CLOUD_EXACT_LIMIT = 1_000_000


def domain_split_rows(domain_ids: np.ndarray, num_domains: int, trial_seed: int, valid: np.ndarray | None = None,
                      holdout_fraction: float = 0.2) -> dict[tuple[int, str], np.ndarray]:
    """Global row indices of every ``(domain, "in"|"out")`` split for one trial seed.

    Uses DomainBed's rule (:func:`linft.data.split_indices`) on each domain's
    rows in their own order; rows marked invalid in ``valid`` are then dropped.
    """
    out = {}
    for d in range(num_domains):
        rows = np.flatnonzero(domain_ids == d)
        in_idx, out_idx = split_indices(len(rows), trial_seed, d, holdout_fraction)
        for part, idx in (("in", in_idx), ("out", out_idx)):
            sel = rows[idx]
            if valid is not None:
                sel = sel[valid[sel]]
            out[(d, part)] = sel
    return out


def split_accuracy(splits: dict, name: str) -> float:
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


def mean_and_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); 0 for a single value)."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def cloud_points(table: dict, max_exact: int = CLOUD_EXACT_LIMIT, samples: int = 200_000,
                 seed: int = 0) -> tuple[np.ndarray, bool]:
    """The paper's cloud: ``table[e][h] = (iid, ood)`` (seed-averaged) -> points (M, 2) and whether exact.

    Each way of choosing one grid point ``h`` per held-out domain ``e`` gives
    the point ``(mean_e iid, mean_e ood)``. With up to ``max_exact``
    combinations all are enumerated (6 grid points and 4 domains: 1296);
    above, ``samples`` combinations are drawn uniformly with ``seed``.
    """
    domains = sorted(table)
    if not domains:
        return np.zeros((0, 2)), True
    values = [np.array([table[e][h] for h in sorted(table[e])], dtype=float) for e in domains]  # (H_e, 2)
    count = math.prod(len(v) for v in values)
    if count <= max_exact:
        total = np.zeros((1, 2))
        for v in values:  # outer sum, domain by domain, in itertools.product order
            total = (total[:, None, :] + v[None, :, :]).reshape(-1, 2)
        return total / len(values), True
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(v), size=samples) for v in values]
    total = sum(v[p] for v, p in zip(values, picks))
    return total / len(values), False


def cloud_points_brute_force(table: dict) -> np.ndarray:
    """Reference implementation of :func:`cloud_points` with itertools.product (for tests)."""
    domains = sorted(table)
    keys = [sorted(table[e]) for e in domains]
    pts = []
    for combo in product(*keys):
        pts.append(np.mean([table[e][h] for e, h in zip(domains, combo)], axis=0))
    return np.array(pts)


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

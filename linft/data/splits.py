"""DomainBed's in/out split of every domain, exactly as DomainBed draws it.

Each domain is split 80% "in" / 20% "out": ``range(N)`` is shuffled with
``numpy.random.RandomState(seed_hash(trial_seed, env_index))`` and the first
``int(0.2 * N)`` shuffled indices are "out". Indices are positions inside the
domain, in the order of :meth:`linft.data.MultiDomainDataset.domain_indices`.
"""

from __future__ import annotations

import hashlib

import numpy as np

from linft.errors import LinftError


def seed_hash(*args) -> int:
    """DomainBed's ``misc.seed_hash``: an int seed in [0, 2**31) from any printable arguments."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def split_indices(
    num_examples: int, trial_seed: int, env_index: int, holdout_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """DomainBed's in/out split of one domain: ``(in_indices, out_indices)``.

    ``range(num_examples)`` is shuffled with
    ``numpy.random.RandomState(seed_hash(trial_seed, env_index))``; the first
    ``int(num_examples * holdout_fraction)`` shuffled indices are "out", the rest
    "in". Both are returned in that shuffled order, as DomainBed uses them.
    """
    if num_examples < 0:
        raise LinftError(f"num_examples must be >= 0, got {num_examples}", param="num_examples")
    if not 0.0 <= holdout_fraction <= 1.0:
        raise LinftError(f"holdout_fraction must lie in [0, 1], got {holdout_fraction}",
                         param="holdout_fraction")
    keys = list(range(num_examples))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_out = int(num_examples * holdout_fraction)
    keys = np.asarray(keys, dtype=np.int64)
    return keys[n_out:], keys[:n_out]


def domain_split_rows(domain_ids: np.ndarray, num_domains: int, trial_seed: int, valid: np.ndarray | None = None,
                      holdout_fraction: float = 0.2) -> dict[tuple[int, str], np.ndarray]:
    """Global row indices of every ``(domain, "in"|"out")`` split for one trial seed.

    Uses DomainBed's rule (:func:`split_indices`) on each domain's rows in
    their own order; rows marked invalid in ``valid`` are then dropped.
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


def split_seed(seed: int, hparams: dict | None = None) -> int:
    """The trial seed that splits a run's data: its own ``seed`` (DomainBed, linft's default), or the fixed
    ``split_seed`` of its hyper-parameters (``split_seed: 0`` is the official code's one split for all seeds)."""
    fixed = (hparams or {}).get("split_seed")
    return seed if fixed is None else int(fixed)


def check_split_seed(value: int | None) -> None:
    """A fixed split seed must be a non-negative integer (None: each seed its own split)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise LinftError(f"split_seed must be 0 or more, got {value}", param="split_seed")


def check_training_splits(split_rows: dict, train_domains, domain_names) -> None:
    """The one check that every training domain has rows in both its "in" and "out" split (20% held out: 5
    usable images at least; a cache's invalid rows do not count)."""
    empty = [domain_names[d] for d in train_domains
             if len(split_rows[(d, "in")]) == 0 or len(split_rows[(d, "out")]) == 0]
    if empty:
        raise LinftError(f"domain {', '.join(empty)} has an empty 'in' or 'out' split (20% held out); "
                         f"each training domain needs at least 5 usable images")


def split_names(domain_names) -> list[str]:
    """``["<domain>_in", "<domain>_out", ...]``: the split names of records, in domain order."""
    return [f"{d}_{part}" for d in domain_names for part in ("in", "out")]

"""linft.data.splits: DomainBed's seed_hash and in/out split, pinned and against the rule computed independently."""

import hashlib

import numpy as np
import pytest

from linft.data.splits import seed_hash, split_indices
from linft.errors import LinftError


def test_seed_hash_pins_domainbed_values():
    assert seed_hash(0, 0) == 894182419
    assert seed_hash(0, 1) == 1514274641
    # the rule itself, computed independently
    assert seed_hash(3, 2) == int(hashlib.md5(b"(3, 2)").hexdigest(), 16) % 2**31


def test_split_indices_pinned():
    in_idx, out_idx = split_indices(10, 0, 0)
    assert out_idx.tolist() == [2, 3]
    assert in_idx.tolist() == [8, 1, 4, 5, 0, 9, 6, 7]
    in_idx, out_idx = split_indices(9991, 0, 1)  # PACS-sized
    assert len(out_idx) == 1998 and len(in_idx) == 7993
    assert out_idx[:5].tolist() == [6136, 6908, 8655, 4834, 5639]
    assert in_idx[:5].tolist() == [8428, 1150, 6236, 2355, 1244]


@pytest.mark.parametrize("n,seed,env,frac,n_out", [(0, 0, 0, 0.2, 0), (1, 1, 0, 0.2, 0), (4, 0, 0, 0.2, 0),
                                                   (5, 0, 0, 0.2, 1), (57, 2, 3, 0.2, 11), (100, 0, 1, 0.5, 50)])
def test_split_indices_partition_with_domainbeds_count(n, seed, env, frac, n_out):
    """"out" holds int(n * frac) indices, counted by hand (DomainBed rounds down: 4 images keep none out)."""
    in_idx, out_idx = split_indices(n, seed, env, frac)
    assert len(out_idx) == n_out and len(in_idx) == n - n_out
    assert sorted(in_idx.tolist() + out_idx.tolist()) == list(range(n))


def test_split_indices_is_one_shuffle_cut_at_the_fraction():
    """One permutation per (trial seed, domain), whatever the fraction: "out" is its head, "in" its tail; another
    domain or seed is another permutation."""
    cuts = [split_indices(50, 3, 1, frac) for frac in (0.0, 0.2, 0.5, 1.0)]
    orders = [np.concatenate([out_idx, in_idx]).tolist() for in_idx, out_idx in cuts]
    assert all(order == orders[0] for order in orders) and orders[0] != list(range(50))
    assert [len(out_idx) for _, out_idx in cuts] == [0, 10, 25, 50]
    assert split_indices(50, 3, 2)[1].tolist() != cuts[1][1].tolist()
    assert split_indices(50, 4, 1)[1].tolist() != cuts[1][1].tolist()
    np.testing.assert_array_equal(split_indices(50, 3, 1)[1], cuts[1][1])  # the same arguments, the same split


def test_split_indices_rejects_bad_fraction():
    with pytest.raises(LinftError) as err:
        split_indices(10, 0, 0, 1.5)
    assert err.value.param == "holdout_fraction"

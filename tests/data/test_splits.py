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


@pytest.mark.parametrize("n,seed,env,frac", [(0, 0, 0, 0.2), (1, 1, 0, 0.2), (57, 2, 3, 0.2), (100, 0, 1, 0.5)])
def test_split_indices_partition_and_independent_rule(n, seed, env, frac):
    in_idx, out_idx = split_indices(n, seed, env, frac)
    assert len(out_idx) == int(n * frac)
    assert sorted(in_idx.tolist() + out_idx.tolist()) == list(range(n))
    keys = list(range(n))
    np.random.RandomState(seed_hash(seed, env)).shuffle(keys)
    assert out_idx.tolist() == keys[: int(n * frac)]


def test_split_indices_rejects_bad_fraction():
    with pytest.raises(LinftError, match="holdout_fraction"):
        split_indices(10, 0, 0, 1.5)

"""The random draws of the linear engine: counter-based, so a step's draws are a pure function of (group, step).

Every draw hashes its coordinates with the 32-bit mixer ``lowbias32`` (a
bijection on 32-bit words), so nothing carries a generator state from step to
step: the draws of all groups of a step come from a fixed number of tensor
calls (no host synchronisation: the step can be captured by CUDA graphs), and
the compiled sparse step (:mod:`linft._kernels.sparse_step`) draws the same masks
inside its loop, bit for bit.

* :func:`row_words` — one 32-bit word per (group, step, purpose, batch row);
* :func:`draw_rows` — the batch: ``batch_size`` rows per training domain, uniformly with replacement
  (Lemire's multiply-shift ``(word · n) >> 32``), concatenated in domain order;
* :func:`unit_noise` — the dropout noise ``u`` of every (row, unit) as a 24-bit integer,
  ``lowbias32(unit XOR row word) >> 8``; a unit is kept at rate λ when ``u >= keep_threshold(λ)``,
  so masks are nested across rates (a unit kept at λ' is kept at every λ < λ') and shared by a group's runs.
"""

from __future__ import annotations

import math

import torch

from linft.data.splits import seed_hash

MASK32 = 0xFFFFFFFF
#: purposes of :func:`row_words` (one independent stream each)
ROWS, VIEWS, NOISE = 1, 2, 3
#: noise resolution: ``u`` is uniform on the integers [0, 2^24)
NOISE_BITS = 24


def group_key(seed: int, test_domain: int) -> int:
    """The 31-bit key of a group's draws (DomainBed's seed_hash of the seed and held-out domain)."""
    return seed_hash("linft-linear", "draws", seed, test_domain)


def _signed32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int32 tensors: int32 products wrap modulo 2^32 (two's complement, as C's uint32 products do);
    a masked arithmetic shift is the logical shift."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _signed32(0x7FEB352D)
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _signed32(0x846CA68B)
    return x ^ ((x >> 16) & 0xFFFF)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' 32-bit integer mixer (the C kernel's ``mix``): int64 tensors of 32-bit words in and out."""
    return _mix32(x.to(torch.int32)).long() & MASK32


def row_words(keys: torch.Tensor, step: int | torch.Tensor, purpose: int, num_rows: int) -> torch.Tensor:
    """(G, num_rows) int64 words in [0, 2^32): ``mix(mix(mix(mix(key) ^ step) ^ purpose) ^ row)``; ``step`` an int,
    a 0-dim tensor, or a (S, 1) tensor of steps for (S, G, num_rows) words."""
    h = lowbias32(lowbias32(lowbias32(keys.long()) ^ step) ^ purpose)
    rows = torch.arange(num_rows, device=keys.device)
    return lowbias32(h[..., None] ^ rows)


def keep_threshold(rate: float) -> int:
    """The integer noise threshold of dropout ``rate``: kept iff ``u >= ceil(rate · 2^24)``."""
    return math.ceil(rate * (1 << NOISE_BITS))


def unit_noise(words: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., dim) int32 noise in [0, 2^24) of every unit of every row (``words`` from :func:`row_words` NOISE)."""
    units = torch.arange(dim, device=words.device, dtype=torch.int32)
    return (_mix32(words.to(torch.int32)[..., None] ^ units) >> (32 - NOISE_BITS)) & ((1 << NOISE_BITS) - 1)


def keep_mask(words: torch.Tensor, dim: int, rate: float) -> torch.Tensor:
    """(..., dim) bool: the units dropout ``rate`` keeps."""
    return unit_noise(words, dim) >= keep_threshold(rate)


def draw_rows(pools: torch.Tensor, pool_sizes: torch.Tensor, words: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(G, T·batch_size) global rows: slot ``j`` of domain ``t`` is ``pools[g, t, (word · n_t) >> 32]``.

    ``pools`` (G, T, P) holds each group's T training pools padded to P, ``pool_sizes`` (G, T) their lengths;
    ``words`` (G, T·batch_size), or (S, G, T·batch_size) for S steps at once.
    """
    G, T, _ = pools.shape
    n = pool_sizes.repeat_interleave(batch_size, dim=1)  # (G, T·batch)
    pick = (words * n) >> 32
    which = torch.arange(T, device=pools.device).repeat_interleave(batch_size)
    return pools[torch.arange(G, device=pools.device)[:, None], which, pick]


def draw_views(words: torch.Tensor, num_views: int) -> torch.Tensor:
    """Which cached augmented view each batch row uses this step (uniform)."""
    return (words * num_views) >> 32


def padded_pools(pools_per_group: list[list[torch.Tensor]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pools of every group as one padded tensor (G, T, P) and their sizes (G, T)."""
    size = max(len(p) for ps in pools_per_group for p in ps)
    out = torch.zeros(len(pools_per_group), len(pools_per_group[0]), size, dtype=torch.long, device=device)
    for g, ps in enumerate(pools_per_group):
        for t, p in enumerate(ps):
            out[g, t, :len(p)] = p
    sizes = torch.tensor([[len(p) for p in ps] for ps in pools_per_group], dtype=torch.long, device=device)
    return out, sizes

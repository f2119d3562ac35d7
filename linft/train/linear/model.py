"""The paper's linear fine-tuning model (Section 4.3) as pure functions, and the initial parameters of a run.

Per φ block k a vector ``v_k`` in R^D, a head ``V`` (C x D) and ``b``::

    Φ̃ = Σ_k v_k ⊙ φ_k                       (the adapted representation)
    logits = V · dropout_λ(Φ̃) + b            (inverted dropout, identity at evaluation)

Linear probing is the same model with ``v`` fixed to ``v_l = 1`` on the last
block and 0 elsewhere, and only ``V, b`` trained. :mod:`linft.train.linear.engine`
trains it over a whole grid; the tests' plain ``torch.optim.SGD`` reference uses
these functions as they are.
"""

from __future__ import annotations

import torch

from linft.data.splits import seed_hash
from linft.errors import LinftError

V_INITS = ("normal", "last")


def adapted_representation(phi: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_k v_k ⊙ φ_k``: phi (..., K, D), v (K, D) -> (..., D)."""
    return (phi * v).sum(-2)


def inverted_dropout(x: torch.Tensor, keep: torch.Tensor, rate: float | torch.Tensor) -> torch.Tensor:
    """Kept units scaled by ``1/(1-rate)``, the others zeroed (``keep`` is a boolean mask)."""
    return x * keep / (1.0 - rate)


def linear_ft_logits(phi, v, V, b, keep=None, rate=0.0) -> torch.Tensor:
    """Logits of the linear fine-tuning model; ``keep=None`` is evaluation (no dropout)."""
    rep = adapted_representation(phi, v)
    if keep is not None:
        rep = inverted_dropout(rep, keep, rate)
    return rep @ V.T + b


def initial_parameters(num_blocks: int, dim: int, num_classes: int, generator: torch.Generator,
                       v_init: str = "last", probe: bool = False, device="cpu"):
    """``(v, V, b)`` of one run: V, b as ``nn.Linear`` initialises them (U(±1/√D));
    v ~ N(0, 1) (``normal``, the official code) or the last block's ``1`` (``last``, and always for a probe)."""
    if v_init not in V_INITS:
        raise LinftError(f"unknown v init '{v_init}'; use one of {', '.join(V_INITS)}")
    bound = 1.0 / dim**0.5
    V = (torch.rand(num_classes, dim, generator=generator, device=device) * 2 - 1) * bound
    b = (torch.rand(num_classes, generator=generator, device=device) * 2 - 1) * bound
    normal = torch.randn(num_blocks, dim, generator=generator, device=device)
    if v_init == "last" or probe:
        v = torch.zeros(num_blocks, dim, device=device)
        v[-1] = 1.0
    else:
        v = normal
    return v, V, b


def group_generator(seed: int, test_domain: int, purpose: str, device) -> torch.Generator:
    """The initialisation stream of a group (``purpose`` ``init``), seeded by DomainBed's seed_hash."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_hash("linft-linear", purpose, seed, test_domain))
    return g

"""Reference implementations the linear engine is compared with: the plain torch.optim.SGD loop and the near-tie rule.

The engine trains a whole grid as stacked tensors with differently factored
matmuls (``Σ_k (V ⊙ v_k) · φ_k`` batched over runs); :func:`plain_sgd_run` is
the loop people write (``(Σ_k v_k ⊙ φ_k) · Vᵀ``, one run at a time). The two
are different code paths, so they agree to (RTOL, ATOL), and their correct
counts agree on every example that is not a near-tie of the reference
(:func:`reference_counts`).

Importable as ``reference`` from every test file (pytest puts ``tests/`` on ``sys.path`` for ``conftest.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linft.protocol.schedule import eval_steps, lr_at
from linft.train.linear.draws import (NOISE, ROWS, VIEWS, draw_rows, draw_views, group_key, keep_mask, padded_pools,
                                      row_words)
from linft.train.linear.model import group_generator, initial_parameters, linear_ft_logits

#: How far the batched engine's parameters may be from the one-by-one loop's. Both are float32 SGD of the same
#: batches from the same initialisation; they differ only by the rounding of differently factored (and differently
#: stacked) matmuls (and by which BLAS kernel a CPU picks: AVX2, AVX-512, AMX). Measured after 40 steps
#: (tests/train/test_linear_engine.py): at most 2e-6 absolute, a tenth of this tolerance (the dropout-0.9 runs; the
#: others 1/100), on 1 and 2 threads. Any protocol error (another batch, lr, momentum, weight decay or dropout mask)
#: moves the parameters by orders of magnitude more.
RTOL, ATOL = 1e-4, 1e-5


def plain_sgd_run(features, labels, rows_of, num_classes, test_domain, seed, point, config, views=None):
    """One run as people write it: plain tensors as parameters, torch.optim.SGD, one run, a loop over steps.

    ``features`` (N, K, D) and ``labels`` (N,) are numpy arrays, ``rows_of`` the run's split rows
    (:func:`linft.data.splits.domain_split_rows`): the training pools are the "in" splits of every domain but
    ``test_domain``. ``views``, a tensor (N, V, K, D), trains on one sampled view per example instead of the features.

    Returns the final ``(v, V, b)``, a copy of ``(v, V, b)`` after every evaluation step and the training loss at
    every evaluation step: ``v, V, b, {step: (v, V, b)}, {step: loss}``.
    """
    K, D = features.shape[1:]
    init = initial_parameters(K, D, num_classes, group_generator(seed, test_domain, "init", "cpu"), config.v_init,
                              point.probe)
    v, V, b = (t.clone().requires_grad_(True) for t in init)
    params = [V, b] if point.probe else [v, V, b]
    opt = torch.optim.SGD(params, lr=point.lr, momentum=config.momentum, weight_decay=point.weight_decay)
    domains = sorted({d for d, _ in rows_of})
    pools, sizes = padded_pools([[torch.from_numpy(rows_of[(d, "in")]) for d in domains if d != test_domain]], "cpu")
    key, B = torch.tensor([group_key(seed, test_domain)]), pools.shape[1] * config.batch_size
    X, Y = torch.from_numpy(features), torch.from_numpy(labels)
    snapshots, losses = {}, {}
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, point.lr, config.milestone_steps())
        rows = draw_rows(pools, sizes, row_words(key, step, ROWS, B), config.batch_size)[0]
        phi = X[rows] if views is None else views[rows, draw_views(row_words(key, step, VIEWS, B), views.shape[1])[0]]
        keep = keep_mask(row_words(key, step, NOISE, B), D, point.dropout)[0]
        loss = F.cross_entropy(linear_ft_logits(phi, v, V, b, keep, point.dropout), Y[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in eval_steps(config.steps, config.eval_every):
            snapshots[step] = tuple(t.detach().clone() for t in (v, V, b))
            losses[step] = loss.item()
    return v.detach(), V.detach(), b.detach(), snapshots, losses


def logit_error_bound(phi, v, V, b, rtol=RTOL, atol=ATOL):
    """(N, C): how far each logit can move when every parameter moves by at most ``atol + rtol·|p|``.

    ``logit_c = Σ_kd φ_kd v_kd V_cd + b_c`` and ``|Δ(v V)| ≤ |Δv||V| + |v||ΔV| + |Δv||ΔV|``.
    """
    dv, dV, db = (atol + rtol * t.abs() for t in (v, V, b))
    dW = dv[:, None, :] * V.abs()[None] + v.abs()[:, None, :] * dV[None] + dv[:, None, :] * dV[None]  # (K, C, D)
    return torch.einsum("nkd,kcd->nc", phi.abs(), dW) + db


def reference_counts(phi, labels, v, V, b):
    """Per example: whether the reference predicts the label, and whether it is a near-tie.

    A near-tie is an example whose top-2 logit margin is at most twice the largest logit move that parameters
    within (RTOL, ATOL) allow (the top logit may fall and the runner-up rise by that much), times 2 for the float32
    rounding of the two evaluations (about 1e-6 of the logits' scale, far below the bound). On every other example
    any parameters within the tolerance predict the same class as the reference.
    """
    logits = linear_ft_logits(phi, v, V, b)
    top2 = logits.topk(2, dim=1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    tie = margin <= 2 * 2 * logit_error_bound(phi, v, V, b).max(1).values
    return (top2.indices[:, 0] == labels).numpy(), tie.numpy()


def decided_and_ties(phi, labels, v, V, b):
    """Per example: the reference predicts the label and the example is not a near-tie (so any parameters within
    the tolerance predict it right too), and the example is a near-tie (:func:`reference_counts`)."""
    right, tie = reference_counts(phi, labels, v, V, b)
    return right & ~tie, tie

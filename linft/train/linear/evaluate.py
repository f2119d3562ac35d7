"""Evaluation of every run of a linear grid: correct counts per split, in row chunks, without dropout.

Two forms of the same logits ``Σ_k (v_k ⊙ φ_k) · Vᵀ + b``:

* ``factored`` — Φ̃ = Σ_k v_k ⊙ φ_k per run, then the head: 2·(K + C)·D FLOPs per (row, run);
* ``folded`` — ``Σ_k φ_k (V ⊙ v_k)ᵀ``: one GEMM of (rows, K·D) by (K·D, runs·C) per chunk, 2·K·C·D FLOPs per
  (row, run), K·C/(K + C) times more, but all of it in one large GEMM.

* ``compiled`` — the factored form in the compiled kernel of :mod:`linft._kernels.sparse_step` (CPU, up to
  :data:`~linft._kernels.sparse_step.EVAL_MAX_CLASSES` classes): runs as SIMD lanes, float16 features read as they
  are, no float32 copy of a chunk; 1.7 times as fast as the folded GEMM on the 72-run protocol
  (benchmarks/linear_grid.py).

``auto`` takes ``compiled`` where it is available, else ``folded`` while ``C <= FOLDED_MAX_CLASSES`` (a few
classes: the GEMM's speed wins on a CPU) and ``factored`` beyond (DomainNet's 345 classes: K = 3 times fewer
FLOPs). The forms round differently, so their counts agree except at near-ties (tests/train/test_linear_engine.py,
tests/train/test_linear_draws_eval.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from linft.errors import LinftError
from linft._kernels.sparse_step import EVAL_MAX_CLASSES, eval_lanes, load_kernel, run_compiled_eval

EVAL_FORMS = ("auto", "compiled", "factored", "folded")
#: ``auto`` evaluates in the folded form up to this many classes
FOLDED_MAX_CLASSES = 16
#: a memory budget makes evaluation chunks no smaller than this many rows
MIN_BUDGET_CHUNK = 64
#: the factored form's Φ̃ chunk (runs × rows × D float32) stays under this many bytes
FACTORED_CHUNK_BYTES = 32 * 2**20


def split_counts(right: torch.Tensor, split: torch.Tensor, num_splits: int) -> torch.Tensor:
    """(G, H, S) float64: ``right`` (n, G, H) summed per split of ``split`` (G, n) (-1: no split)."""
    onehot = F.one_hot(split.clamp(min=0), num_splits).double() * (split >= 0)[..., None]  # (G, n, S)
    return torch.einsum("ngh,gns->ghs", right.double(), onehot)


def _folded_logits(phi, v, Vt, b):
    G, H, K, D = v.shape
    C = Vt.shape[-1]
    W = (Vt.transpose(-1, -2)[:, :, None, :, :] * v[:, :, :, None, :])  # (G, H, K, C, D)
    W = W.permute(2, 4, 0, 1, 3).reshape(K * D, G * H * C)
    return (phi.reshape(len(phi), K * D) @ W).view(-1, G, H, C) + b  # (n, G, H, C)


def _factored_logits(phi, v, Vt, b):
    G, H, K, D = v.shape
    C = Vt.shape[-1]
    rep = phi[None, :, 0] * v.reshape(G * H, 1, K, D)[:, :, 0]
    for k in range(1, K):
        rep.addcmul_(phi[None, :, k], v.reshape(G * H, 1, K, D)[:, :, k])
    logits = torch.baddbmm(b.reshape(G * H, 1, C), rep, Vt.reshape(G * H, D, C))  # (G·H, n, C)
    return logits.view(G, H, -1, C).permute(2, 0, 1, 3)


def evaluate_grid(features, labels, seed_split, v, Vt, b, num_splits: int, chunk: int, form: str = "auto",
                  max_bytes: int | None = None):
    """Correct counts (G, H, S) int64 numpy of every run (v (G, H, K, D), Vt (G, H, D, C), b (G, H, C)) on every
    split of ``seed_split`` (G, N), reading ``features`` (N, K, D) ``chunk`` rows at a time (fewer in the factored
    form, whose Φ̃ chunk stays under :data:`FACTORED_CHUNK_BYTES`, and fewer when a chunk's rows, their float32
    copy and logits would take more than ``max_bytes``: a memory budget, None for none; never fewer than
    :data:`MIN_BUDGET_CHUNK` rows for it)."""
    if form not in EVAL_FORMS:
        raise LinftError(f"unknown evaluation form {form!r}; use one of {', '.join(EVAL_FORMS)}", param="form")
    G, H, K, D = v.shape
    C = Vt.shape[-1]
    kernel = compiled_eval_kernel(features, v.device, C) if form in ("auto", "compiled") else None
    if form == "compiled" and kernel is None:
        raise LinftError("the compiled evaluation is not available here (CPU, float16 or float32 features, at most "
                         f"{EVAL_MAX_CLASSES} classes and a C++ compiler needed); use evaluation form auto")
    if form == "auto":
        form = "compiled" if kernel is not None else "folded" if C <= FOLDED_MAX_CLASSES else "factored"
    if form == "factored":
        chunk = max(1, min(chunk, FACTORED_CHUNK_BYTES // (4 * G * H * D)))
    if max_bytes is not None:
        itemsize = features.dtype.itemsize  # a torch or a numpy dtype
        # the rows as read, their float32 copy (not in the compiled form), the logits (or the kernel's int32
        # predictions, padded to 8 runs), the int64 argmax and the float64 "right" table of split_counts
        preds = 4 * (-(-G * H // 8) * 8) if form == "compiled" else 4 * G * H * C + 8 * G * H
        per_row = K * D * (itemsize + (0 if form == "compiled" else 4)) + preds + 8 * G * H
        chunk = min(chunk, max(MIN_BUDGET_CHUNK, max_bytes // per_row))
    if form == "compiled":
        lanes = eval_lanes(v.reshape(G * H, K, D), Vt.reshape(G * H, D, C), b.reshape(G * H, C))
        logits_of = None
    else:
        logits_of = _folded_logits if form == "folded" else _factored_logits
    correct = torch.zeros(G, H, num_splits, device=v.device, dtype=torch.float64)
    for a in range(0, features.shape[0], chunk):
        y = torch.as_tensor(labels[a:a + chunk]).to(v.device)
        if logits_of is None:
            phi = torch.as_tensor(features[a:a + chunk]).contiguous()
            pred = run_compiled_eval(kernel, phi, lanes, G * H, C).view(-1, G, H)
        else:
            pred = logits_of(torch.as_tensor(features[a:a + chunk]).to(v.device).float(), v, Vt, b).argmax(-1)
        right = pred == y[:, None, None]  # (n, G, H)
        correct += split_counts(right, seed_split[:, a:a + chunk], num_splits)
    return correct.round().long().cpu().numpy()


def compiled_eval_kernel(features, device, num_classes: int):
    """The compiled kernel when the ``compiled`` form can evaluate these features on ``device``, else None."""
    if torch.device(device).type != "cpu" or num_classes > EVAL_MAX_CLASSES:
        return None
    if getattr(features, "dtype", None) not in (torch.float16, torch.float32, np.float16, np.float32):
        return None
    return load_kernel()[0]

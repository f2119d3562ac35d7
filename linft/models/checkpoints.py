"""State dicts on disk and their checks: the one checkpoint loader and the one strict state_dict check.

* :func:`load_checkpoint` — ``torch.load(weights_only=True)`` on the CPU; any bad file is one
  :class:`LinftError` naming it (never a pickled module, never a traceback).
* :func:`read_state_dict` — a bare state_dict, or the ``state_dict`` entry of linft's
  ``{"state_dict": ..., "metadata": ...}`` format; :func:`checkpoint_metadata` reads the other half.
* :func:`check_state_dict` — keys, tensor entries, shapes (and optionally dtypes) of a state_dict
  against a reference, with a one-line error that names the first differences. Every strict load,
  every weight average and the first-order model go through it.
* :func:`load_state_dict_strict` — the check, then ``model.load_state_dict(strict=True)``.
* :func:`state_dict_sha256` — the weights' identity.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from linft.errors import LinftError

SAVE_HINT = "save it with torch.save(model.state_dict(), path)"


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over a state_dict's sorted keys, dtypes, shapes and raw bytes: the weights' identity."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", fix: str = "re-create it") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing or unreadable file is one LinftError."""
    path = Path(path)
    if not path.is_file():
        raise LinftError(f"{what} {path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several unrelated types for a bad file
        raise LinftError(f"cannot read {what} {path} ({exc.__class__.__name__}); {fix}") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict in a weights file: a bare state_dict, or linft's ``{"state_dict": ..., "metadata": ...}``."""
    obj = load_checkpoint(path, "weights file", SAVE_HINT)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LinftError(f"weights file {path} holds no state_dict; {SAVE_HINT}")
    return obj


def checkpoint_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` dict of a checkpoint in linft's format (empty for a bare state_dict)."""
    obj = load_checkpoint(path)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _few(names: Sequence[str], n: int = 3) -> str:
    names = list(names)
    shown = ", ".join(repr(k) for k in names[:n])
    return shown + (f" (and {len(names) - n} more)" if len(names) > n else "")


def check_state_dict(state, reference: Mapping[str, torch.Tensor], what: str, reference_what: str, fix: str, *,
                     required: Sequence[str] | None = None, dtypes: bool = False) -> None:
    """Raise one :class:`LinftError` unless ``state`` fits ``reference``.

    ``state`` must be a mapping of tensors holding every key of ``required``
    (default: every key of ``reference``) and no key foreign to ``reference``,
    each with the reference's shape (and dtype, with ``dtypes``). The message
    names ``what`` and ``reference_what``, the first differing entries, and ends
    with ``fix``.
    """
    if not isinstance(state, Mapping):
        raise LinftError(f"{what} is a {type(state).__name__}, not a state_dict; {fix}")
    required = list(reference) if required is None else list(required)
    missing = [k for k in required if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        parts = ([f"lacks {_few(missing)}"] if missing else []) + ([f"has extra {_few(extra)}"] if extra else [])
        raise LinftError(f"{what} does not fit {reference_what}: it {' and '.join(parts)}; {fix}")
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise LinftError(f"{what} entry {key!r} is a {type(t).__name__}, not a tensor; {fix}")
        ref = reference[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise LinftError(f"entry {key!r} has shape {tuple(ref.shape)} in {reference_what} but {tuple(t.shape)} "
                             f"in {what}; {fix}")
        if dtypes and t.dtype != ref.dtype:
            raise LinftError(f"entry {key!r} has dtype {ref.dtype} in {reference_what} but {t.dtype} in {what}; "
                             "convert the checkpoints to one dtype first")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str, model_what: str,
                           fix: str) -> nn.Module:
    """:func:`check_state_dict` against ``model.state_dict()``, then ``load_state_dict(strict=True)``."""
    check_state_dict(state, model.state_dict(), what, model_what, fix)
    model.load_state_dict(state, strict=True)
    return model

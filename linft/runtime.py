"""What every layer needs from the machine: the device, the precision and autocast, determinism.

* :func:`resolve_device` — ``auto`` / ``cpu`` / ``cuda[:N]`` checked against what exists.
* :func:`autocast` — autocast to a ``precision`` (:data:`PRECISIONS`) on CUDA only (the CPU computes in float32).
* :func:`deterministic_cuda`, :func:`denormals_flushed` — scoped numeric settings, restored on exit.
* :func:`atomic_save` — ``torch.save`` through :func:`linft.output.atomic_write`.

Files, JSON and progress output are :mod:`linft.output` (no torch there).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from linft.errors import LinftError
from linft.output import atomic_write


# --------------------------------------------------------------------------- device and numerics


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; other values as torch understands them."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LinftError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N", param="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LinftError(f"device {device} asked for but CUDA is not available; use device='cpu'", param="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LinftError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs); use cuda:0 or auto")
    return dev


#: ``precision`` -> the autocast dtype on CUDA (None: no autocast). The CPU always computes in float32.
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The one default of extraction, fine-tuning and interpolation (``--precision``).
DEFAULT_PRECISION = "bfloat16"


def check_precision(precision: str) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else one LinftError naming the choices."""
    if precision not in PRECISIONS:
        raise LinftError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}", param="precision")
    return precision


def effective_precision(dev: torch.device, precision: str) -> str:
    """What a computation on ``dev`` runs in: ``precision`` on CUDA, ``float32`` elsewhere."""
    check_precision(precision)
    return precision if dev.type == "cuda" else "float32"


def autocast(dev: torch.device, precision: str = "float32"):
    """Autocast to ``precision`` (:data:`PRECISIONS`) on CUDA; a no-op for float32 and off CUDA (float32 on the CPU)."""
    dtype = PRECISIONS[effective_precision(dev, precision)]
    return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()


@contextmanager
def deterministic_cuda(dev: torch.device):
    """On CUDA, deterministic kernels inside the block (cuDNN deterministic, no autotuning, cuBLAS workspace
    fixed), so the same command gives the same weights on the same GPU and software; the previous settings
    are restored. Nothing changes on the CPU, which is deterministic already."""
    if dev.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
             torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[4])
        if saved[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@contextmanager
def denormals_flushed():
    """Flush denormal floats to zero inside the block, on the calling thread (torch has no getter: the default,
    off, is restored).

    ``torch.set_flush_denormal`` sets the calling thread's floating-point control register only; intra-op
    threads that already exist keep theirs (measured: with 2 threads about half of an op's output was
    flushed). Results stay deterministic for a given thread count, which is what pretraining records."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` through :func:`atomic_write` (save tensors and plain values only).

    torch reports a failed write (a full disk) as a RuntimeError of its stream writer: it is one LinftError, as
    any other failed write, and no ``.partial`` file is left.
    """
    def save(fh) -> None:
        try:
            torch.save(obj, fh)
        except RuntimeError as exc:
            cause = exc.__context__
            if isinstance(cause, OSError):  # the file's write failed; torch's zip writer then fails on its own
                raise cause from None
            if "failed writing" not in str(exc):  # not a write failure: a bug, shown as such
                raise
            raise OSError(errno.EIO, str(exc).strip().splitlines()[0]) from None
    return atomic_write(path, save)

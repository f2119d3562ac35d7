"""What every layer needs from the machine: the device, autocast, determinism, atomic files, progress.

* :func:`resolve_device` — ``auto`` / ``cpu`` / ``cuda[:N]`` checked against what exists.
* :func:`autocast` — reduced-precision autocast on CUDA only (the CPU computes in float32).
* :func:`deterministic_cuda`, :func:`denormals_flushed` — scoped numeric settings, restored on exit.
* :func:`atomic_write` — the one way linft writes a file that must never be seen half-written:
  write ``<path>.partial``, flush, fsync, rename over ``path``, fsync the folder.
  :func:`atomic_save` (``torch.save``) and :func:`atomic_write_text` are thin uses of it.
* :func:`default_workers` — DataLoader processes decoding images when the caller does not say.
* :func:`progress_bar` — one progress bar for every long loop (click's, on stderr, with a rate).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO, Callable

import click
import torch

from linft.errors import LinftError

PARTIAL_SUFFIX = ".partial"


# --------------------------------------------------------------------------- device and numerics


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; other values as torch understands them."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LinftError(f"unknown device '{device}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LinftError(f"device {device} asked for but CUDA is not available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LinftError(f"device {device} does not exist ({torch.cuda.device_count()} GPUs); use cuda:0 or auto")
    return dev


def autocast(dev: torch.device, enabled: bool = True, dtype: torch.dtype = torch.bfloat16):
    """``dtype`` autocast on CUDA when ``enabled``; a no-op elsewhere (float32 on the CPU)."""
    return torch.autocast("cuda", dtype=dtype) if (enabled and dev.type == "cuda") else nullcontext()


@contextmanager
def deterministic_cuda(dev: torch.device):
    """On CUDA, deterministic kernels inside the block (cuDNN deterministic, no autotuning, cuBLAS workspace
    fixed), so the same command gives the same weights on the same GPU and software; the previous settings
    are restored. Nothing changes on the CPU, which is deterministic already."""
    if dev.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2])
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


def default_workers(workers: int | None = None) -> int:
    """DataLoader processes that decode images: ``workers`` when given, else one per spare core (at most 8)."""
    if workers is not None:
        if workers < 0:
            raise LinftError(f"workers must be 0 or more, got {workers}")
        return workers
    return min(8, max(1, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------------- files


def partial_path(path: str | os.PathLike) -> Path:
    """``<path>.partial``: where a file is written before it takes its name."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder``, created when missing; a folder that cannot be created or written is one LinftError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LinftError(f"cannot create folder {folder} ({exc.strerror}); choose another --out") from None
    if not os.access(folder, os.W_OK):
        raise LinftError(f"cannot write to {folder} (permission denied); choose another --out")
    return folder


def commit_partial(partial: Path, path: Path) -> None:
    """fsync ``partial``, rename it over ``path`` and fsync the folder, so a crash leaves the old or the new file."""
    with open(partial, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is done all the same
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that readers see the old file or the whole new one, never a part.

    A failure (full disk, permissions) is one :class:`LinftError` naming the file; the partial file is removed
    and an existing ``path`` is left as it was.
    """
    path = Path(path)
    partial = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as fh:
            write(fh)
            fh.flush()
        commit_partial(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LinftError(f"cannot write {path} ({exc.strerror or exc}); free space or choose another "
                         f"location") from None
    return path


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` through :func:`atomic_write` (save tensors and plain values only)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text through :func:`atomic_write`."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


# --------------------------------------------------------------------------- progress


@contextmanager
def progress_bar(total: int, label: str, unit: str = "it", enabled: bool = True, initial: int = 0):
    """Yield ``update(n)``; shows done/total, ``unit``/s and ETA on stderr when ``enabled``.

    ``initial`` counts work done before (a resumed run): it fills the bar but not the rate.
    """
    if not enabled:
        yield lambda n: None
        return
    start = time.perf_counter()
    counted = [0]

    def show(_item):
        elapsed = time.perf_counter() - start
        rate = counted[0] / elapsed if elapsed > 0 else 0.0
        return f"{rate:,.1f} {unit}/s"

    with click.progressbar(length=total, label=label, file=sys.stderr, item_show_func=show,
                           show_pos=True, width=24) as bar:
        if initial:
            bar.update(initial)

        def update(n: int) -> None:
            counted[0] += n
            bar.update(n, current_item=True)

        yield update

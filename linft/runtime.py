"""What every layer needs from the machine: the device, autocast, determinism, atomic files, progress.

* :func:`resolve_device` — ``auto`` / ``cpu`` / ``cuda[:N]`` checked against what exists.
* :func:`autocast` — autocast to a ``precision`` (:data:`PRECISIONS`) on CUDA only (the CPU computes in float32).
* :func:`deterministic_cuda`, :func:`denormals_flushed` — scoped numeric settings, restored on exit.
* :func:`atomic_write` — the one way linft writes a file that must never be seen half-written:
  write ``<path>.partial``, flush, fsync, rename over ``path``, fsync the folder.
  :func:`atomic_save` (``torch.save``) and :func:`atomic_write_text` are thin uses of it.
* :func:`json_text` — strict JSON (NaN and ±inf written as ``null``) for every ``--json`` output and summary.
* :func:`default_workers` — DataLoader processes decoding images when the caller does not say.
* :func:`progress_bar` — one progress bar for every long loop (click's, on stderr, with a rate); when stderr
  is not a terminal (Slurm logs, CI, ``| tee``) it prints plain lines instead (done/total, rate, ETA).
* :func:`say_line` — one line of news on stderr that does not collide with a progress bar.
"""

from __future__ import annotations

import json
import math
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


#: ``precision`` -> the autocast dtype on CUDA (None: no autocast). The CPU always computes in float32.
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: The one default of extraction, fine-tuning and interpolation (``--precision``).
DEFAULT_PRECISION = "bfloat16"


def check_precision(precision: str) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`, else one LinftError naming the choices."""
    if precision not in PRECISIONS:
        raise LinftError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
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


def finite_or_none(obj):
    """``obj`` with every NaN or ±inf float (nested in dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def json_text(obj, **kwargs) -> str:
    """THE JSON linft prints or writes (``--json``, summaries): strict RFC 8259, NaN and ±inf as ``null``.

    ``kwargs`` go to :func:`json.dumps` (``indent``, ``sort_keys``, ...); tuples become lists.
    """
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


# --------------------------------------------------------------------------- progress


#: Without a terminal, :func:`progress_bar` prints a line every PLAIN_EVERY_SECONDS or every PLAIN_EVERY_FRACTION
#: of the work, whichever comes first, and one when the loop ends.
PLAIN_EVERY_SECONDS = 30.0
PLAIN_EVERY_FRACTION = 0.1


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed or odd streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def say_line(line: str) -> None:
    """Write ``line`` to stderr; in a terminal, first erase a progress bar drawn on the current line."""
    sys.stderr.write(("\r\x1b[K" if is_terminal(sys.stderr) else "") + line + "\n")
    sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _PlainProgress:
    """Progress as plain lines: ``label: done/total unit (pct%), rate unit/s, ETA m:ss``."""

    def __init__(self, total: int, label: str, unit: str, initial: int):
        self.total, self.label, self.unit, self.done = total, label, unit, initial
        self.start = self.last_time = time.perf_counter()
        self.counted = 0
        self.step = max(1, math.ceil(total * PLAIN_EVERY_FRACTION))
        self.next_mark = (initial // self.step + 1) * self.step

    def line(self, now: float, ending: bool = False) -> str:
        elapsed = now - self.start
        rate = self.counted / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        if ending:
            tail = f"in {_duration(elapsed)}"
        else:
            tail = f"ETA {_duration((self.total - self.done) / rate)}" if rate > 0 else "ETA ?"
        return f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, {rate:,.1f} {self.unit}/s, {tail}"

    def update(self, n: int) -> None:
        self.done += n
        self.counted += n
        now = time.perf_counter()
        if self.done >= self.next_mark or now - self.last_time >= PLAIN_EVERY_SECONDS:
            if self.done < self.total:
                say_line(self.line(now))
            self.last_time = now
            self.next_mark = (self.done // self.step + 1) * self.step


@contextmanager
def progress_bar(total: int, label: str, unit: str = "it", enabled: bool = True, initial: int = 0):
    """Yield ``update(n)``; shows done/total, ``unit``/s and ETA on stderr when ``enabled``.

    ``initial`` counts work done before (a resumed run): it fills the bar but not the rate. When stderr is not a
    terminal, the bar becomes a plain line every :data:`PLAIN_EVERY_SECONDS` or :data:`PLAIN_EVERY_FRACTION` of
    ``total`` (whichever comes first) and one line when the loop ends (with the time it took).
    """
    if not enabled:
        yield lambda n: None
        return
    if not is_terminal(sys.stderr):
        plain = _PlainProgress(total, label, unit, initial)
        yield plain.update
        if plain.counted:
            say_line(plain.line(time.perf_counter(), ending=True))
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

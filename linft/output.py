"""Files and console output, without torch: atomic writes, strict JSON, progress, news lines.

* :func:`atomic_write` — the one way linft writes a file that must never be seen half-written:
  write ``<path>.partial``, flush, fsync, rename over ``path``, fsync the folder.
  :func:`atomic_write_text` is a thin use of it (``linft.runtime.atomic_save`` another, for torch objects).
* :func:`writable_folder` — a folder created when missing and checked writable (a read-only file system is named
  as such). :func:`human_bytes` — sizes in messages (``12.3 MiB``, never ``0.00 GiB``).
* :func:`json_text` — strict JSON (NaN and ±inf written as ``null``) for every ``--json`` output and summary;
  :func:`is_count` — the check of a count read back from JSON.
* :func:`progress_bar` — one progress bar for every long loop (click's, on stderr, with a rate); when stderr
  is not a terminal (Slurm logs, CI, ``| tee``) it prints plain lines instead (done/total, rate, ETA).
* :func:`say_line` — one line of news on stderr that does not collide with a progress bar.

This module imports no torch, so the commands that only read records (``report``, ``status``) start at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

import click

from linft.errors import LinftError

PARTIAL_SUFFIX = ".partial"


# --------------------------------------------------------------------------- files


#: The longest file name (bytes) of common file systems (ext4, xfs, btrfs, tmpfs, NFS).
NAME_MAX = 255


def sibling_path(path: str | os.PathLike, suffix: str) -> Path:
    """``<path><suffix>``: a file beside ``path`` named after it. When that name would pass :data:`NAME_MAX`
    (a legal ``path`` with a long name), ``path``'s name is cut and a digest of it keeps the name unique (its
    extension is kept): ``<cut>~<digest><ext><suffix>``."""
    path = Path(path)
    if len((path.name + suffix).encode()) <= NAME_MAX:
        return path.with_name(path.name + suffix)
    digest = hashlib.sha256(path.name.encode()).hexdigest()[:16]
    ext = path.suffix if len(path.suffix) <= 16 else ""
    keep = NAME_MAX - len(f"~{digest}{ext}{suffix}".encode())
    cut = path.name[:len(path.name) - len(ext)].encode()[:max(keep, 0)].decode(errors="ignore")
    return path.with_name(f"{cut}~{digest}{ext}{suffix}")


def partial_path(path: str | os.PathLike) -> Path:
    """``<path>.partial``: where a file is written before it takes its name (:func:`sibling_path`)."""
    return sibling_path(path, PARTIAL_SUFFIX)


def human_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``3.4 KiB``, ``12.3 MiB``, ``1.50 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def read_only_file_system(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` lies on a file system mounted read-only."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def write_failure(exc: OSError) -> str:
    """Why a write failed, in words that say what to do (``read-only file system``, ``disk full``, ...)."""
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device or quota exceeded; free space"
    if exc.errno == errno.EFBIG:
        return "file too large for this file system or process limit"
    return exc.strerror or str(exc) or type(exc).__name__


def writable_folder(folder: str | os.PathLike) -> Path:
    """``folder``, created when missing; a folder that cannot be created or written is one LinftError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LinftError(f"cannot create folder {folder} ({write_failure(exc)}); choose another out_dir",
                         param="out_dir") from None
    if not os.access(folder, os.W_OK):
        why = "read-only file system" if read_only_file_system(folder) else "permission denied"
        raise LinftError(f"cannot write to {folder} ({why}); choose another out_dir", param="out_dir")
    return folder


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, whichever ``path`` is (nothing when absent; errors ignored)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass


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


class WriteError(LinftError):
    """A file that could not be written: ``path`` and ``reason`` (:func:`write_failure`), for callers that name the
    output in their own words (a report folder rather than one of its files)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot write {path} ({reason}); free space or choose another location")
        self.path, self.reason = path, reason


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
        raise WriteError(path, write_failure(exc)) from None
    except BaseException:  # e.g. an object torch cannot save, or an interrupt: no .partial left behind
        partial.unlink(missing_ok=True)
        raise
    return path


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


def is_count(value, least: int = 0) -> bool:
    """Whether a value read from JSON is an integer count ``>= least`` (``True`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


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

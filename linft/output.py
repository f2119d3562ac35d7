"""Files and console output, without torch: atomic writes, strict JSON, progress, news lines.

* :func:`atomic_write` — the one way linft writes a file that must never be seen half-written:
  write ``<path>.partial``, flush, fsync, rename over ``path``, fsync the folder.
  :func:`atomic_write_text` is a thin use of it (``linft.runtime.atomic_save`` another, for torch objects).
* :func:`writable_folder` — a folder created when missing and checked writable (a read-only file system is named
  as such). :func:`human_bytes` — sizes in messages (``12.3 MiB``, never ``0.00 GiB``).
* :func:`output_lock` — the one lock of an output (a folder or a file) while a command writes it: owner pid, host
  and command in the lock file; a second command refuses in one line; a lock left by a dead process on this host
  is taken over.
* :func:`json_text` — strict JSON (NaN and ±inf written as ``null``) for every ``--json`` output and summary;
  :func:`is_count` — the check of a count read back from JSON.
* :func:`progress_bar` — one progress bar for every long loop (click's, on stderr, with a rate); when stderr
  is not a terminal (Slurm logs, CI, ``| tee``) it prints plain lines instead (done/total, rate, ETA).
* :func:`say_line` — one line of news on stderr that does not collide with a progress bar.

This module imports no torch, so the commands that only read records (``report``, ``status``) start at once.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable

import click

from linft.errors import LinftError

PARTIAL_SUFFIX = ".partial"


# --------------------------------------------------------------------------- files


def partial_path(path: str | os.PathLike) -> Path:
    """``<path>.partial``: where a file is written before it takes its name."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


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
        raise LinftError(f"cannot create folder {folder} ({write_failure(exc)}); choose another --out") from None
    if not os.access(folder, os.W_OK):
        why = "read-only file system" if read_only_file_system(folder) else "permission denied"
        raise LinftError(f"cannot write to {folder} ({why}); choose another --out")
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


#: The lock file of an output folder; a file output ``x`` is locked by ``x.lock``.
LOCK_NAME = ".linft.lock"

_held_locks: dict[Path, int] = {}  # lock file -> depth, for the locks this process holds


def lock_path(target: str | os.PathLike, folder: bool = False) -> Path:
    """The lock file of an output: ``<target>/.linft.lock`` for a folder, ``<target>.lock`` for a file."""
    target = Path(target)
    return target / LOCK_NAME if folder else target.with_name(target.name + ".lock")


def _process_start(pid: int) -> str | None:
    """A process's start time (Linux ``/proc``), to tell a live owner from a new process that reuses its pid."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool | None:
    """True/False for an owner on this host; None when it runs elsewhere (cannot be checked from here)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    started = owner.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


#: ``link`` errors of file systems without hard links (some FUSE and SMB mounts): locks are then made with O_EXCL.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS}


def _try_lock(path: Path, owner: dict) -> bool:
    """Create the lock file with ``owner`` in it, atomically (written aside, then linked: a complete file or none;
    where hard links do not exist, an exclusive create). False when it exists."""
    text = json.dumps(owner)
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    try:
        aside.write_text(text, encoding="utf-8")
        try:
            os.link(aside, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return True
    finally:
        aside.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict | None) -> None:
    """Remove a dead owner's lock, but only if the file still is that owner's: another process may have taken it
    over since it was read. The file is moved aside first and put back when it is someone else's."""
    aside = path.with_name(f"{path.name}.stale.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_owner(aside) != stale:  # a live lock taken since: put it back
        try:
            os.link(aside, path)
        except OSError:
            pass  # the name was taken meanwhile by a third process: its lock stands
    aside.unlink(missing_ok=True)


@contextmanager
def output_lock(target: str | os.PathLike, *, folder: bool = False):
    """Hold linft's lock on ``target`` (a file, or a folder when ``folder``: created when missing) while the body
    writes it.

    A second linft process on the same output gets one LinftError naming the owner (pid, host, command, start);
    a lock whose owner died on this host (killed, power loss) is taken over. Locks are plain files made with an
    atomic link, so they work where HDF5's own file locking is off (``HDF5_USE_FILE_LOCKING=FALSE``) and on shared
    file systems across hosts. The same process may take a lock it already holds (nested calls).
    """
    path = lock_path(target, folder)
    key = Path(os.path.realpath(path))  # one key however the path is spelled
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield path
        finally:
            _held_locks[key] -= 1
        return
    writable_folder(path.parent)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid()),
             "command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        try:
            if _try_lock(path, owner):
                break
        except OSError as exc:
            raise LinftError(f"cannot lock {target} ({write_failure(exc)}); choose another --out") from None
        held = _read_owner(path)
        if held is not None and _owner_alive(held) is not False:
            raise LinftError(
                f"{target} is being written by another linft process (pid {held.get('pid')} on {held.get('host')}, "
                f"since {held.get('started')}: {held.get('command')}); wait for it to finish, or if it is no longer "
                f"running, delete {path}")
        try:
            young = held is None and time.time() - path.stat().st_mtime < 10
        except FileNotFoundError:
            continue  # released meanwhile: try again
        if young:
            time.sleep(0.5)  # a lock file being written right now (O_EXCL locks); look again
            continue
        _take_over(path, held)  # its owner is dead
    else:
        raise LinftError(f"cannot take the lock {path}; if no linft process writes {target}, delete it")
    _held_locks[key] = 1
    try:
        yield path
    finally:
        del _held_locks[key]
        path.unlink(missing_ok=True)


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

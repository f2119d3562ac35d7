"""The lock of an output while a linft command writes it: one lock file per output folder or file.

* :func:`output_lock` — the one lock of an output (a folder or a file) while a command writes it: owner pid, host
  and command in the lock file; a second command refuses in one line; a lock left by a dead process on this host
  is taken over. :func:`lock_path` — where that lock file is.

This module imports no torch.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from linft.errors import LinftError
from linft.output import sibling_path, writable_folder, write_failure


#: The lock file of an output folder; a file output ``x`` is locked by ``x.lock``.
LOCK_NAME = ".linft.lock"

_held_locks: dict[Path, int] = {}  # lock file -> depth, for the locks this process holds


def lock_path(target: str | os.PathLike, folder: bool = False) -> Path:
    """The lock file of an output: ``<target>/.linft.lock`` for a folder, ``<target>.lock`` for a file (its name
    cut, with a digest, where a long legal name would pass the file name limit: :func:`linft.output.sibling_path`)."""
    target = Path(target)
    return target / LOCK_NAME if folder else sibling_path(target, ".lock")


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
    if not isinstance(pid, int) or not 0 < pid < 2**31:  # no process has a pid out of that range
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
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
    aside = path.with_name(f".linft-lock.{uuid.uuid4().hex}")  # short: the lock's own name may be long
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


def take_over_stale(path: Path, stale: dict | None) -> None:
    """Remove a dead owner's lock, but only if the file still is that owner's: another process may have taken it
    over since it was read. The file is moved aside first and put back when it is someone else's."""
    aside = path.with_name(f".linft-lock.stale.{uuid.uuid4().hex}")
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
            raise LinftError(f"cannot lock {target} ({write_failure(exc)}); choose another out_dir",
                             param="out_dir") from None
        if path.is_dir() and not path.is_symlink():  # never a lock of linft's: never moved aside
            raise LinftError(f"{path} is a folder, where linft keeps the lock of {target}; move that folder away "
                             f"or choose another out_dir", param="out_dir")
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
        take_over_stale(path, held)  # its owner is dead
    else:
        raise LinftError(f"cannot take the lock {path}; if no linft process writes {target}, delete it")
    _held_locks[key] = 1
    try:
        yield path
    finally:
        del _held_locks[key]
        path.unlink(missing_ok=True)

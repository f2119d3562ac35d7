"""Building the compiled kernel into its cache, and using a cached library only once it has proved itself.

The library is built with the system C++ compiler into :func:`kernel_cache_dir` (``$LINFT_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/linft/kernels``, else ``~/.cache/linft/kernels``), one file per (source, flags, compiler
version, CPU flags). A library is used only after it proved itself:

* a new or unrecorded library is loaded in a child process (``python abi.py LIB``), which checks the struct layout
  and calls every entry point on known answers (:mod:`linft._kernels.abi`); a truncated file (SIGBUS), flags for
  another CPU (SIGILL), a "successful" build that is not a shared library (``-c``, ``-E``, ``-fsyntax-only``), an
  empty, garbage or wrong-symbol file end or fail the child, never the caller;
* its SHA-256 is then recorded beside it (``.sha256``), and a later process loads it once the digest matches.

A library that fails is deleted and built again once; when that fails too, the next flag set is tried, and then
:func:`built_kernel` gives the reason. A build writes under a temporary name (``<name>.tmp.<pid>.<random>``)
renamed into place when complete; the temporary file is removed when the build fails or is interrupted, and one
left by a killed process (whose pid is gone) is removed by the next build.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("sparse_step.cpp")
CHECKER = Path(__file__).with_name("abi.py")
#: flag sets tried in order: the first that builds and proves itself is used (``$LINFT_KERNEL_FLAGS``: only ``-O3``
#: and those flags, e.g. ``-march=native -mno-avx512f``, to build and test the kernel's portable paths)
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
#: seconds the child process may take to load and check a library
CHECK_TIMEOUT = 120
#: a temporary file older than this (seconds) is removed even when its pid is alive (a pid reused, another host)
STALE_AFTER = 24 * 3600


def flag_sets() -> tuple[list[str], ...]:
    extra = os.environ.get("LINFT_KERNEL_FLAGS")
    return (["-O3", *extra.split()],) if extra else FLAG_SETS


def kernel_cache_dir() -> Path:
    if os.environ.get("LINFT_KERNEL_CACHE"):
        return Path(os.environ["LINFT_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "linft" / "kernels"


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def _one_line(text: str, default: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else default


def artifact(compiler: str, flags: list[str]) -> Path:
    """The cached library's path for ``flags`` with ``compiler`` (keyed by the source, the flags, the compiler's
    version and the CPU's flags)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + repr((flags, version, _cpu_flags())).encode()).hexdigest()[:16]
    return kernel_cache_dir() / f"sparse_step-{key}.so"


def built_kernel(compiler: str) -> tuple[Path | None, str]:
    """A library that proved itself (cached, or built now), or None and why not (OSError: the cache is unusable)."""
    why = ""
    for flags in flag_sets():
        lib = artifact(compiler, flags)
        lib.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(lib.parent)
        if lib.exists():
            if not prove(lib):
                return lib, ""
            discard(lib)  # and build it again, once
        why = build(compiler, flags, lib) or prove(lib)
        if not why:
            return lib, ""
        discard(lib)
        why = f"{why} (flags {' '.join(flags)})"
    return None, why


def build(compiler: str, flags: list[str], lib: Path) -> str:
    """Compile the source into ``lib`` (through a temporary file, removed whatever happens); ``""`` or why not."""
    tmp = temporary(lib)
    cmd = [compiler, *flags, "-std=c++17", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return f"{Path(compiler).name} could not build {SOURCE.name}: {_one_line(done.stderr, 'failed')}"
        if not tmp.is_file():
            return f"{Path(compiler).name} wrote no library"
        os.replace(tmp, lib)
        return ""
    finally:
        tmp.unlink(missing_ok=True)


def prove(lib: Path) -> str:
    """``""`` when ``lib`` is the recorded library, or loads and answers right in a child process (its digest is
    then recorded); else why not."""
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    record = lib.with_suffix(".sha256")
    if record.is_file() and record.read_text().strip() == digest:
        return ""
    why = check_in_child(lib)
    if not why:
        write_atomically(record, digest + "\n")
    return why


def check_in_child(lib: Path) -> str:
    """Load ``lib`` in a child process and run :mod:`linft._kernels.abi`'s checks: ``""`` or why it failed."""
    try:
        done = subprocess.run([sys.executable, str(CHECKER), str(lib)], capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"the built kernel did not answer its check within {CHECK_TIMEOUT} s"
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        hint = " (an instruction this CPU lacks: flags for another CPU?)" if name == "SIGILL" else ""
        return f"the built kernel died of {name} when loaded and called{hint}"
    if done.returncode != 0:
        return f"the built kernel failed its check: {_one_line(done.stdout + done.stderr, 'no reason given')}"
    return ""


def discard(lib: Path) -> None:
    """Remove ``lib`` and its recorded digest."""
    lib.unlink(missing_ok=True)
    lib.with_suffix(".sha256").unlink(missing_ok=True)


def temporary(path: Path) -> Path:
    """A temporary name beside ``path`` that names this process (see :func:`remove_stale_temporaries`)."""
    return path.with_name(f"{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


def write_atomically(path: Path, text: str) -> None:
    tmp = temporary(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files of builds whose process is gone (killed mid-build) or that are a day old."""
    for tmp in folder.glob("*.tmp.*.*"):
        try:
            pid, old = int(tmp.name.split(".tmp.")[-1].split(".")[0]), time.time() - tmp.stat().st_mtime > STALE_AFTER
        except (ValueError, OSError):
            continue
        if pid > 0 and (old or not _alive(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True

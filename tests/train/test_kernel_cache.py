"""The compiled kernel's calling convention and cache: the ctypes structs checked against the library's own layout,
a cached library used only once it proved itself, bad ones discarded and rebuilt once, else the torch step with one
warning; no temporary file outlives its build."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linft._kernels import abi, build, sparse_step
from linft._kernels.sparse_step import load_kernel
from linft.train.linear.engine import LinearGridConfig, train_linear_grid

from test_linear_engine import feature_grid

REAL_CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_compiler = pytest.mark.skipif(REAL_CXX is None or shutil.which("bash") is None,
                                    reason="no C++ compiler (or no bash for the stand-in compilers)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache of the test's own, the default flags, and a fresh load_kernel and warning memory."""
    monkeypatch.setenv("LINFT_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("LINFT_KERNEL_FLAGS", raising=False)
    monkeypatch.delenv("LINFT_SPARSE_KERNEL", raising=False)
    monkeypatch.setattr(sparse_step, "_warned", set())
    load_kernel.cache_clear()
    yield tmp_path / "kernels"
    load_kernel.cache_clear()


@pytest.fixture(scope="module")
def good_library(tmp_path_factory) -> Path:
    """The kernel built once by the real compiler with the first default flag set (it proves itself)."""
    if REAL_CXX is None:
        pytest.skip("no C++ compiler")
    lib = tmp_path_factory.mktemp("good") / "sparse_step.so"
    assert build.build(REAL_CXX, build.FLAG_SETS[0], lib) == "" and build.check_in_child(lib) == ""
    return lib


def stand_in_compiler(folder: Path, action: str) -> str:
    """A compiler that answers ``--version`` as the real one (so the cache key is the same) and else runs the bash
    ``action`` with ``$out`` the -o file."""
    script = folder / "cxx"
    script.write_text(f"""#!/usr/bin/env bash
for a in "$@"; do [ "$a" = --version ] && exec {REAL_CXX} --version; done
out=""; prev=""; for a in "$@"; do [ "$prev" = -o ] && out="$a"; prev="$a"; done
{action}
""")
    script.chmod(0o755)
    return str(script)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- the calling convention


@needs_compiler
def test_the_ctypes_structs_match_the_library_layout(good_library):
    dll = abi.declare(ctypes.CDLL(str(good_library)))
    rows = abi.library_layout(dll)
    assert rows == abi.declared_layout() and abi.check_layout(dll) == ""
    assert ("Args", "momentum", abi.Args.momentum.offset, 4) in rows and ("EvalArgs", "", 0, 88) in rows

    class Swapped(ctypes.Structure):  # two fields of EvalArgs in the other order
        _fields_ = [(n, t) for n, t in abi.EvalArgs._fields_[:1] + abi.EvalArgs._fields_[2:3]
                    + abi.EvalArgs._fields_[1:2] + abi.EvalArgs._fields_[3:]]

    class Short(ctypes.Structure):  # one field missing at the end
        _fields_ = abi.Args._fields_[:-1]

    assert "EvalArgs.n at 8" in abi.check_layout(dll, {"Args": abi.Args, "EvalArgs": Swapped})
    assert "Args.<size> at 0, 184 bytes" in abi.check_layout(dll, {"Args": Short, "EvalArgs": abi.EvalArgs})


@needs_compiler
def test_known_answers_pass_and_can_fail(good_library):
    dll = abi.declare(ctypes.CDLL(str(good_library)))
    assert abi.known_answers(dll) == ""

    class Wrong:  # the real entry points, but a hash that differs
        linft_sparse_step, linft_eval = dll.linft_sparse_step, dll.linft_eval
        linft_unit_noise = staticmethod(lambda word, unit: 1)

    assert "linft_unit_noise(0, 0) is 1" in abi.known_answers(Wrong)


# --------------------------------------------------------------------------- the fallback says so once


def test_the_fallback_is_said_once_with_its_reason(cache, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    data, groups = feature_grid(torch.float16)
    for _ in range(3):
        train_linear_grid(data, groups, LinearGridConfig(steps=2, batch_size=4, eval_every=2))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "compiled kernel is not used" in lines[0] and "/nonexistent/c++" in lines[0]
    monkeypatch.setenv("LINFT_SPARSE_KERNEL", "0")  # a choice, not a failure: nothing said
    load_kernel.cache_clear()
    train_linear_grid(data, groups, LinearGridConfig(steps=2, batch_size=4, eval_every=2))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- bad cached libraries


@needs_compiler
@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "wrong symbols"])
@pytest.mark.parametrize("recorded", [True, False], ids=["digest recorded", "no digest"])
def test_a_bad_cached_library_is_discarded_and_rebuilt(damage, recorded, good_library, cache, tmp_path, monkeypatch):
    """The cached file is damaged (a truncated one killed the process with SIGBUS when loaded); with its digest
    recorded or not (an older cache), it is rebuilt (here by a stand-in compiler that writes the good library)."""
    lib = build.artifact(REAL_CXX, build.FLAG_SETS[0])
    lib.parent.mkdir(parents=True)
    good = good_library.read_bytes()
    if recorded:
        shutil.copy(good_library, lib)
        assert build.prove(lib) == "" and lib.with_suffix(".sha256").exists()
    other = tmp_path / "other.so"
    if damage == "wrong symbols":
        subprocess.run(["bash", "-c", f"echo 'int f() {{ return 1; }}' | {REAL_CXX} -x c++ -shared -fPIC - -o {other}"],
                       check=True)
    lib.write_bytes({"empty": b"", "garbage": os.urandom(len(good)), "truncated": good[:len(good) // 2],
                     "wrong symbols": other.read_bytes() if other.exists() else b""}[damage])
    monkeypatch.setenv("CXX", stand_in_compiler(tmp_path, f'cp {good_library} "$out"'))
    kernel, why = load_kernel()
    assert kernel is not None and why == "" and lib.read_bytes() == good
    assert files(cache) == sorted([lib.name, lib.with_suffix(".sha256").name])


@needs_compiler
def test_a_truncated_library_is_rebuilt_by_the_compiler(good_library, cache):
    lib = build.artifact(REAL_CXX, build.FLAG_SETS[0])
    lib.parent.mkdir(parents=True)
    lib.write_bytes(good_library.read_bytes()[:4096])
    path, why = build.built_kernel(REAL_CXX)
    assert path == lib and why == "" and build.check_in_child(lib) == ""


@needs_compiler
@pytest.mark.parametrize("flags", ["-fsyntax-only", "-c", "-E"])
def test_flags_that_build_no_shared_library_fall_back(flags, cache, monkeypatch, capsys):
    """The compiler exits 0 but writes nothing, an object file or preprocessed text: nothing is cached, the torch
    step is used, with one line naming the reason; the next process does the same (no broken library cached)."""
    monkeypatch.setenv("LINFT_KERNEL_FLAGS", flags)
    for _ in range(2):
        load_kernel.cache_clear()
        kernel, why = load_kernel()
        assert kernel is None and flags in why and files(cache) == []
    data, groups = feature_grid(torch.float16)
    train_linear_grid(data, groups, LinearGridConfig(steps=2, batch_size=4, eval_every=2))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and why in err[0]


@needs_compiler
def test_a_library_with_illegal_instructions_falls_back(cache, tmp_path, monkeypatch):
    """Flags for another CPU give SIGILL at the first call: here every entry point executes ud2 (the same signal on
    any x86-64). The child process dies, the caller goes on with the reason, and nothing stays cached."""
    trap = tmp_path / "trap.cpp"
    trap.write_text("\n".join(f'extern "C" long {name}() {{ __builtin_trap(); }}' for name in abi.SIGNATURES))
    monkeypatch.setenv("CXX", stand_in_compiler(tmp_path, f'exec {REAL_CXX} -shared -fPIC {trap} -o "$out"'))
    kernel, why = load_kernel()
    assert kernel is None and "SIGILL" in why and files(cache) == []
    with pytest.raises(Exception, match="SIGILL"):
        train_linear_grid(*feature_grid(torch.float16), LinearGridConfig(steps=2, step_kind="sparse"))


# --------------------------------------------------------------------------- temporary files


BUILD_IN_CHILD = "from linft._kernels.build import built_kernel; import sys; print(built_kernel(sys.argv[1]))"


@needs_compiler
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_build_leaves_no_temporary_file(sig, cache, tmp_path, good_library, monkeypatch):
    """A build interrupted while the compiler has written part of its output (Ctrl-C: the process group gets SIGINT;
    or the process killed): no temporary file stays, at once or (SIGKILL) after the next build."""
    started = tmp_path / "started"
    cxx = stand_in_compiler(tmp_path, f': > "$out"; touch {started}; sleep 60')
    # SIGINT back to its default in the child: a shell's background job (`... &`) inherits it ignored
    child = subprocess.Popen([sys.executable, "-c", BUILD_IN_CHILD, cxx], start_new_session=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(600):
            if started.exists() or child.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists() and len(files(cache)) == 1  # the compiler's partial output
        os.killpg(child.pid, signal.SIGINT) if sig == signal.SIGINT else child.send_signal(sig)
        child.wait(timeout=60)
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # the stand-in compiler, still asleep after a SIGKILL of its parent
        except ProcessLookupError:  # the whole group is gone already
            pass
    if sig == signal.SIGINT:
        assert files(cache) == []
    stand_in = stand_in_compiler(tmp_path, f'cp {good_library} "$out"')
    lib, why = build.built_kernel(stand_in)
    assert why == "" and files(cache) == sorted([lib.name, lib.with_suffix(".sha256").name])


def test_only_the_temporaries_of_dead_builds_are_removed(tmp_path):
    ours = build.temporary(tmp_path / "a.so")
    ours.write_bytes(b"")  # a build of this (live) process under way
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    gone = tmp_path / f"b.so.tmp.{dead.pid}.0123abcd"
    gone.write_bytes(b"")
    other = tmp_path / "c.so"
    other.write_bytes(b"")
    build.remove_stale_temporaries(tmp_path)
    assert files(tmp_path) == sorted([ours.name, other.name])


@needs_compiler
def test_a_recorded_library_is_not_checked_again(good_library, tmp_path, monkeypatch):
    lib = tmp_path / "k.so"
    shutil.copy(good_library, lib)
    assert build.prove(lib) == ""
    monkeypatch.setattr(build, "check_in_child", lambda path: "checked again")
    assert build.prove(lib) == ""
    data = lib.read_bytes()
    lib.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one byte changed: the digest differs, the check runs
    assert build.prove(lib) == "checked again"

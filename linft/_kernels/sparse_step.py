"""The compiled kernels of the linear engine, loaded by ctypes: the sparse dropout step and the grid evaluation.

``sparse_step.cpp`` (next to this file) computes, for the dropout runs of every
group, only the (row, unit) pairs that dropout keeps, and fuses forward,
backward and the SGD update (see its header); it also evaluates a grid's runs
(:func:`run_compiled_eval`, the ``compiled`` form of :mod:`linft.train.linear.evaluate`).
It is plain C++ (no Python or torch headers, no OpenMP), so it builds in a few
seconds with ``g++ -O3 -march=native``; :mod:`linft._kernels.build` builds and
caches it and uses a cached library only once it has proved itself, and
:mod:`linft._kernels.abi` declares its calling convention, checked against the
library's own struct layout when it is loaded. Groups run in parallel in
``torch.get_num_threads()`` Python threads (a ctypes call releases the GIL),
each group in one thread, so the results do not depend on the thread count.

:func:`load_kernel` returns the loaded kernel, or None and the reason when it
cannot be had (no compiler, a failed build, a library that fails its checks, or
``LINFT_SPARSE_KERNEL=0``): the engine then uses its pure-torch step, which
computes the same functions densely (:mod:`linft.train.linear.step`), as it
does on a GPU, and says so once per process on stderr (:func:`warn_fallback`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
import torch.nn.functional as F

from linft._kernels.abi import Args, EvalArgs, check_layout, declare
from linft._kernels.build import built_kernel, discard

#: the reason :func:`load_kernel` gives when ``LINFT_SPARSE_KERNEL=0`` (a choice: no warning)
DISABLED = "disabled by LINFT_SPARSE_KERNEL=0"
_warned: set[str] = set()


@lru_cache(maxsize=None)
def load_kernel() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernel and ``""``, or None and the reason (built or checked at the first call of a process)."""
    if os.environ.get("LINFT_SPARSE_KERNEL", "1") == "0":
        return None, DISABLED
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        return None, "no C++ compiler (g++, c++ or clang++; or set CXX)"
    try:
        lib, why = built_kernel(compiler)
    except OSError as exc:
        return None, f"cannot build the kernel ({exc})"
    if lib is None:
        return None, why
    try:
        dll = declare(ctypes.CDLL(str(lib)))
        why = check_layout(dll)
    except (OSError, AttributeError) as exc:  # changed on disk since it proved itself
        why = " ".join(str(exc).split())
    if why:
        discard(lib)
        return None, why
    return dll, ""


def warn_fallback(why: str) -> None:
    """Say on stderr, once per process and reason, that the torch step replaces the compiled kernel, and why (not
    when the kernel was disabled on purpose)."""
    if why and why != DISABLED and why not in _warned:
        _warned.add(why)
        print(f"linft: the compiled kernel is not used ({why}); the torch step trains instead", file=sys.stderr)


def padded(n: int, multiple: int = 8) -> int:
    """``n`` rounded up to a multiple of ``multiple``: the kernel's runs (one SIMD lane each, 8 per register) and
    classes (8 or 16 are held in registers) are zero-padded to multiples of 8."""
    return -(-n // multiple) * multiple


def _ptr(t: torch.Tensor) -> int:
    assert t.is_contiguous()
    return t.data_ptr()


def run_sparse_step(dll: ctypes.CDLL, feats: torch.Tensor, offs, labels, words, params, bufs,
                    thr, scale, lr, wd, momentum: float, live, loss, num_classes: int) -> None:
    """One fused step of every sparse run in place. Runs are lanes: params and bufs ``v`` (G, Q, D, K, 8),
    ``Vt`` (G, Q, D, Cp, 8), ``b`` (G, Q, Cp, 8) for Q chunks of 8 runs (lane = run, runs and classes zero-padded
    by :func:`padded`); ``offs``, ``labels``, ``words`` (G, B); ``live`` bool and ``loss`` float32 (G, 8·Q);
    ``thr`` int64 (ascending, >= 1) and ``scale``, ``lr``, ``wd`` float32 (8·Q,)."""
    G, Q, D, K, _ = params[0].shape
    Cp = params[1].shape[3]
    a = Args(_ptr(feats), _ptr(offs), _ptr(labels), _ptr(words), G, offs.shape[1], K, D, num_classes, Cp, 8 * Q,
             *(_ptr(t) for t in (*params, *bufs)), _ptr(thr), _ptr(scale), _ptr(lr), _ptr(wd),
             momentum, _ptr(live), _ptr(loss))
    half, threads = int(feats.dtype == torch.float16), min(torch.get_num_threads(), G)
    if threads == 1:
        dll.linft_sparse_step(ctypes.byref(a), half, 0, G)
        return
    bounds = [G * i // threads for i in range(threads + 1)]
    list(_pool(threads).map(lambda i: dll.linft_sparse_step(ctypes.byref(a), half, bounds[i], bounds[i + 1]),
                            range(threads)))


@lru_cache(maxsize=None)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="linft-sparse")


#: the most units per φ block the sparse step handles (its noise hash drops a shift that units below 2^16 allow)
MAX_KERNEL_DIM = 1 << 16

#: class counts the compiled evaluation handles (held in registers): padded to 8 or 16
EVAL_MAX_CLASSES = 16


def eval_lanes(v: torch.Tensor, Vt: torch.Tensor, b: torch.Tensor):
    """Runs ``v`` (R, K, D), ``Vt`` (R, D, C), ``b`` (R, C) as the evaluation kernel's lanes: chunks of 8 runs
    (R and C zero-padded to multiples of 8), ``(R8, D, K, 8)``, ``(R8, D, Cp, 8)``, ``(R8, Cp, 8)``."""
    R, C = b.shape
    Rp, Cp = padded(R), padded(C)
    v, Vt, b = v.float(), Vt.float(), b.float()  # the kernel reads float32
    v = F.pad(v, (0, 0, 0, 0, 0, Rp - R))
    Vt = F.pad(Vt, (0, Cp - C, 0, 0, 0, Rp - R))
    b = F.pad(b, (0, Cp - C, 0, Rp - R))
    R8 = Rp // 8
    return (v.reshape(R8, 8, *v.shape[1:]).permute(0, 3, 2, 1).contiguous(),
            Vt.reshape(R8, 8, *Vt.shape[1:]).permute(0, 2, 3, 1).contiguous(),
            b.reshape(R8, 8, Cp).permute(0, 2, 1).contiguous())


def run_compiled_eval(dll: ctypes.CDLL, feats: torch.Tensor, lanes, num_runs: int, num_classes: int) -> torch.Tensor:
    """The predicted class (n, num_runs) int32 of every run on the rows ``feats`` (n, K, D) float16 or float32
    (contiguous), for runs given as :func:`eval_lanes`; rows split over ``torch.get_num_threads()`` threads (each
    row's arithmetic is the same whatever the split)."""
    v, Vt, b = lanes
    if feats.dtype not in (torch.float16, torch.float32) or not all(t.dtype == torch.float32 for t in lanes):
        raise TypeError("the compiled evaluation reads float16 or float32 rows and float32 lanes (eval_lanes)")
    n, K, D = feats.shape
    R8, Cp = b.shape[0], b.shape[1]
    pred = torch.empty(n, 8 * R8, dtype=torch.int32)
    a = EvalArgs(_ptr(feats), n, K, D, num_classes, Cp, R8, _ptr(v), _ptr(Vt), _ptr(b), _ptr(pred))
    half, threads = int(feats.dtype == torch.float16), max(1, min(torch.get_num_threads(), n // 64))
    bounds = [n * i // threads for i in range(threads + 1)]
    call = lambda i: dll.linft_eval(ctypes.byref(a), half, bounds[i], bounds[i + 1])
    codes = [call(0)] if threads == 1 else list(_pool(threads).map(call, range(threads)))
    if any(codes):
        raise ValueError(f"the compiled evaluation takes {EVAL_MAX_CLASSES} classes at most (padded: {Cp})")
    return pred[:, :num_runs]

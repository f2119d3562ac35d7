"""The compiled kernel's calling convention, checked against the library itself, and its known-answer test.

``struct Args`` and ``struct EvalArgs`` are declared once, in ``sparse_step.cpp``; the library exports their
layout as the compiler laid it out (``linft_layout``: struct, field, offset, size, and each struct's size), and
:func:`check_layout` compares the ctypes declarations below with it, so a field added, moved or resized on one side
only is refused before any call. :func:`known_answers` calls every entry point on a tiny case and compares with
numpy (the hash, a step's loss and bias update on uniform and mixed dropout lanes, an evaluation's argmax, float32
and float16 rows): it exercises the instructions that the build's flags chose.

Run as a script (``python abi.py LIB``, numpy and ctypes only: no torch, no linft import), it loads ``LIB`` and runs
both checks; it exits 0 when the library answers right, else prints one line and exits 1. The build loads every new
or unrecorded library this way in a child process, so a truncated file (SIGBUS) or flags for another CPU (SIGILL)
end the child, never the caller.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

_P = ctypes.c_void_p
_I = ctypes.c_int64


class Args(ctypes.Structure):
    """The kernel's argument block (``struct Args`` of sparse_step.cpp; checked by :func:`check_layout`)."""

    _fields_ = [("feats", _P), ("offs", _P), ("labels", _P), ("words", _P),
                ("G", _I), ("B", _I), ("K", _I), ("D", _I), ("C", _I), ("Cp", _I), ("H", _I),
                ("v", _P), ("Vt", _P), ("b", _P), ("bv", _P), ("bVt", _P), ("bb", _P),
                ("thr", _P), ("scale", _P), ("lr", _P), ("wd", _P), ("momentum", ctypes.c_float),
                ("live", _P), ("loss", _P)]


class EvalArgs(ctypes.Structure):
    """The evaluation kernel's argument block (``struct EvalArgs`` of sparse_step.cpp; checked by
    :func:`check_layout`)."""

    _fields_ = [("feats", _P), ("n", _I), ("K", _I), ("D", _I), ("C", _I), ("Cp", _I), ("R8", _I),
                ("v", _P), ("Vt", _P), ("b", _P), ("pred", _P)]


STRUCTS = {"Args": Args, "EvalArgs": EvalArgs}

#: the entry points: (result type, argument types)
SIGNATURES = {
    "linft_sparse_step": (ctypes.c_int, [ctypes.POINTER(Args), ctypes.c_int, _I, _I]),
    "linft_eval": (ctypes.c_int, [ctypes.POINTER(EvalArgs), ctypes.c_int, _I, _I]),
    "linft_unit_noise": (ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_uint32]),
    "linft_layout": (ctypes.c_int, [_I, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p),
                                    ctypes.POINTER(_I), ctypes.POINTER(_I)]),
}


def declare(dll: ctypes.CDLL) -> ctypes.CDLL:
    """``dll`` with the argument and result types of every entry point set (AttributeError: a symbol is missing)."""
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = restype, argtypes
    return dll


def library_layout(dll: ctypes.CDLL) -> list[tuple[str, str, int, int]]:
    """The library's own table: (struct, field, offset, size) rows; a struct's size has the field ``""``."""
    rows, i = [], 0
    t, n, o, s = ctypes.c_char_p(), ctypes.c_char_p(), _I(), _I()
    while dll.linft_layout(i, ctypes.byref(t), ctypes.byref(n), ctypes.byref(o), ctypes.byref(s)):
        rows.append((t.value.decode(), n.value.decode(), o.value, s.value))
        i += 1
    return rows


def declared_layout(structs=None) -> list[tuple[str, str, int, int]]:
    """The same table from the ctypes declarations ``structs`` (name -> Structure; default :data:`STRUCTS`)."""
    rows = []
    for name, cls in (structs or STRUCTS).items():
        rows += [(name, f, getattr(cls, f).offset, getattr(cls, f).size) for f, _ in cls._fields_]
        rows.append((name, "", 0, ctypes.sizeof(cls)))
    return rows


def check_layout(dll: ctypes.CDLL, structs=None) -> str:
    """``""`` when the ctypes declarations match the library's structs, else the first difference, in words."""
    ours, theirs = declared_layout(structs), library_layout(dll)
    for a, b in zip(ours + [None] * len(theirs), theirs + [None] * len(ours)):
        if a != b:
            show = lambda r: "nothing" if r is None else f"{r[0]}.{r[1] or '<size>'} at {r[2]}, {r[3]} bytes"
            return f"struct layout differs: the library has {show(b)}, the ctypes declaration {show(a)}"
    return ""


# --------------------------------------------------------------------------- known answers

def _mix(x: np.ndarray) -> np.ndarray:
    """The kernel's 32-bit hash (lowbias32), on uint32 arrays."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _step_case(dll, half: bool, rng) -> str:
    """One step of 8 lanes (two thresholds per lane pair, so both the uniform and the per-pair paths) on 16 rows."""
    B, K, D, C, Cp = 16, 3, 8, 3, 8
    x = rng.standard_normal((B, K, D)).astype(np.float16 if half else np.float32)
    feats = x.view(np.uint16) if half else x
    words = rng.integers(0, 2**32, (1, B), dtype=np.int64)
    labels = rng.integers(0, C, (1, B), dtype=np.int64)
    offs = (np.arange(B, dtype=np.int64) * K * D)[None]
    v = rng.standard_normal((1, 1, D, K, 8)).astype(np.float32)
    Vt = np.zeros((1, 1, D, Cp, 8), np.float32)
    Vt[..., :C, :] = rng.standard_normal((1, 1, D, C, 8))
    b = np.zeros((1, 1, Cp, 8), np.float32)
    b[..., :C, :] = rng.standard_normal((1, 1, C, 8))
    v0, Vt0, b0 = v[0, 0].astype(np.float64), Vt[0, 0, :, :C].astype(np.float64), b[0, 0, :C].copy()
    bufs = [np.zeros_like(t) for t in (v, Vt, b)]
    thr = np.repeat(np.array([1, 1 << 22, 1 << 23, 3 << 22], np.int64), 2)
    scale = (2.0**24 / (2.0**24 - thr)).astype(np.float32)
    lr, wd = np.full(8, 0.1, np.float32), np.full(8, 0.01, np.float32)
    live, loss = np.ones((1, 8), np.uint8), np.zeros((1, 8), np.float32)
    a = Args(_ptr(feats), _ptr(offs), _ptr(labels), _ptr(words), 1, B, K, D, C, Cp, 8,
             *(_ptr(t) for t in (v, Vt, b, *bufs)), _ptr(thr), _ptr(scale), _ptr(lr), _ptr(wd), 0.9,
             _ptr(live), _ptr(loss))
    dll.linft_sparse_step(ctypes.byref(a), int(half), 0, 1)
    u = _mix(np.arange(D, dtype=np.uint32)[None] ^ words[0].astype(np.uint32)[:, None]) >> np.uint32(8)  # (B, D)
    keep = (u[..., None] >= thr) * scale.astype(np.float64)  # (B, D, 8)
    r = np.einsum("dkj,bkd->bdj", v0, x.astype(np.float64)) * keep  # (before the step updated v, Vt, b in place)
    z = b0.astype(np.float64)[None] + np.einsum("bdj,dcj->bcj", r, Vt0)
    z -= z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    rows = np.arange(B)
    want_loss = (np.log(np.exp(z).sum(1)) - z[rows, labels[0]]).mean(0)
    p[rows, labels[0]] -= 1
    want_b = b0 - lr * (p.sum(0) / B + wd * b0)
    if not live.all() or not np.allclose(loss[0], want_loss, rtol=1e-4, atol=1e-5):
        return f"the step's loss is {loss[0].tolist()}, expected {want_loss.tolist()}"
    if not np.allclose(b[0, 0, :C], want_b, rtol=1e-4, atol=1e-5) or not all(np.isfinite(t).all() for t in (v, Vt)):
        return "the step's update differs from the expected one"
    return ""


def _eval_case(dll, half: bool, rng) -> str:
    """The argmax of 8 runs on 6 rows against numpy (rows whose two best logits are close are not compared)."""
    n, K, D, C, Cp = 6, 3, 20, 5, 8
    x = rng.standard_normal((n, K, D)).astype(np.float16 if half else np.float32)
    v = rng.standard_normal((1, D, K, 8)).astype(np.float32)
    Vt = rng.standard_normal((1, D, Cp, 8)).astype(np.float32)
    b = rng.standard_normal((1, Cp, 8)).astype(np.float32)
    pred = np.full((n, 8), -1, np.int32)
    a = EvalArgs(_ptr(x.view(np.uint16) if half else x), n, K, D, C, Cp, 1, _ptr(v), _ptr(Vt), _ptr(b), _ptr(pred))
    if dll.linft_eval(ctypes.byref(a), int(half), 0, n) != 0:
        return "the evaluation refused 8 padded classes"
    r = np.einsum("dkj,nkd->ndj", v[0].astype(np.float64), x.astype(np.float64))
    z = b[0, :C].astype(np.float64)[None] + np.einsum("ndj,dcj->ncj", r, Vt[0, :, :C].astype(np.float64))
    top2 = np.sort(z, 1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3 * (1 + np.abs(top2[:, 1]))
    if not (pred == z.argmax(1))[clear].all():
        return f"the evaluation predicts {pred.tolist()}, expected {z.argmax(1).tolist()}"
    return ""


def known_answers(dll: ctypes.CDLL) -> str:
    """``""`` when every entry point of ``dll`` (declared by :func:`declare`) gives the expected answers, else the
    first wrong one, in words."""
    for word, unit in ((0, 0), (0xDEADBEEF, 7), (123456789, 65535)):
        want = int(_mix(np.array([unit ^ word], np.uint32))[0] >> 8)
        if dll.linft_unit_noise(word, unit) != want:
            return f"linft_unit_noise({word}, {unit}) is {dll.linft_unit_noise(word, unit)}, expected {want}"
    rng = np.random.default_rng(0)
    for half in (False, True):
        why = _step_case(dll, half, rng) or _eval_case(dll, half, rng)
        if why:
            return why + (" (float16 rows)" if half else " (float32 rows)")
    return ""


def main(argv: list[str]) -> int:
    """``abi.py LIB``: load LIB, check its layout and answers; one line on stdout and exit 1 when one fails."""
    try:
        dll = declare(ctypes.CDLL(argv[1]))
    except (OSError, AttributeError) as exc:
        print(" ".join(str(exc).split()))
        return 1
    why = check_layout(dll) or known_answers(dll)
    if why:
        print(why)
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

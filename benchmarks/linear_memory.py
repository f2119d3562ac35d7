"""Peak memory of ``linft train-linear`` on a DomainNet-shaped cache: measured on scaled caches, extrapolated.

    python benchmarks/linear_memory.py                     # 1/64 and 1/32 of DomainNet's 586,575 rows
    python benchmarks/linear_memory.py --scales 0.01,0.02 --json

For each scale, a synthetic cache of DomainNet's shape (6 domains in DomainBed's proportions, 345 classes, K = 3
blocks, D = 2048, float16) is written to a temporary folder, and ``linft train-linear`` runs on it in a child
process (one held-out domain, one seed, lr, weight decay and dropout 0.9: the parameters are small next to the
features; a few steps and evaluations), twice: with the features in memory, and with ``--memory-gib`` at a quarter
of their size (features and training rows read from the file in chunks). The peak resident memory is the child's
``ru_maxrss``; a line ``a + b·N`` through the scales gives the estimate for the whole of DomainNet (and for
``--views 4``, whose views take four times the features' bytes when they are held in memory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from linft.cache.format import CACHE_FORMAT_VERSION, IDENTITY_ATTRS, provenance_sha256, write_attrs

#: DomainBed's DomainNet: rows per domain (586,575 in all), 345 classes
DOMAINS = {"clipart": 48_129, "infograph": 51_605, "painting": 72_266, "quickdraw": 172_500, "real": 172_947,
           "sketch": 69_128}
CLASSES, K, D = 345, 3, 2048
FULL = sum(DOMAINS.values())


def write_cache(path: Path, scale: float, seed: int = 0) -> int:
    """A complete synthetic cache of DomainNet's shape with ``scale`` of its rows; returns the row count."""
    rng = np.random.default_rng(seed)
    counts = [max(8, round(n * scale)) for n in DOMAINS.values()]
    n = sum(counts)
    domains = np.repeat(np.arange(len(counts)), counts)
    labels = rng.integers(0, CLASSES, n)
    names = list(DOMAINS)
    with h5py.File(path, "w") as f:
        feats = f.create_dataset("features", (n, K, D), np.float16, chunks=(64, K, D))
        for a in range(0, n, 8192):
            b = min(n, a + 8192)
            feats[a:b] = np.abs(rng.standard_normal((b - a, K, D), dtype=np.float32)).astype(np.float16)
        f["labels"], f["domains"], f["valid"] = labels, domains, np.ones(n, bool)
        f.create_dataset("paths", data=[f"{names[d]}/c{y}/{i}.jpg" for i, (d, y) in enumerate(zip(domains, labels))],
                         dtype=h5py.string_dtype())
        attrs = {"format_version": CACHE_FORMAT_VERSION, "backbone": "synthetic", "weights_sha256": "0" * 64,
                 "blocks": ["b1", "b2", "b3"], "image_size": 224, "transform": "none", "dtype": "float16",
                 "compute": "none", "domain_names": names, "class_names": [f"c{i}" for i in range(CLASSES)],
                 "num_examples": n, "file_list_sha256": hashlib.sha256(str((scale, seed)).encode()).hexdigest()}
        assert set(attrs) == set(IDENTITY_ATTRS)
        attrs.update(provenance_sha256=provenance_sha256(attrs), feature_dim=D, complete=True, weights="none",
                     weights_label="synthetic", dataset_name="domainnet-shaped", dataset_root="none",
                     linft_version="benchmark", torch_version="none", torchvision_version="none", device="cpu",
                     created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     per_domain={name: {"count": c} for name, c in zip(names, counts)})
        write_attrs(f, attrs)
    return n


def peak_rss_gib(cache: Path, out: Path, memory_gib: float | None, steps: int) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one ``linft train-linear`` child process."""
    cmd = [sys.executable, "-m", "linft.cli.main", "train-linear", str(cache), "--out", str(out), "--seeds", "1",
           "--lr", "1e-3", "--weight-decay", "1e-4", "--dropout", "0.9", "--steps", str(steps),
           "--eval-every", str(max(1, steps // 2)), "--test-domains", "sketch", "--device", "cpu", "--quiet"]
    if memory_gib is not None:
        cmd += ["--memory-gib", str(memory_gib)]
    code = ("import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, r.returncode)")
    done = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    rss_kib, wall, rc = done.stdout.split()[-3:]
    if rc != "0":
        raise SystemExit(f"train-linear failed ({rc}): {done.stderr[-2000:]}")
    return int(rss_kib) / 2**20, float(wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default=f"{1 / 64},{1 / 32}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in map(float, args.scales.split(",")):
            cache = Path(tmp) / f"domainnet_{scale:g}.h5"
            n = write_cache(cache, scale)
            feature_gib = n * K * D * 2 / 2**30
            ram, wall = peak_rss_gib(cache, Path(tmp) / f"runs_{scale:g}", None, args.steps)
            streamed, wall_s = peak_rss_gib(cache, Path(tmp) / f"runs_s_{scale:g}", feature_gib / 4, args.steps)
            rows.append({"scale": scale, "rows": n, "features_gib": feature_gib, "peak_rss_gib": ram, "wall_s": wall,
                         "memory_gib": feature_gib / 4, "peak_rss_streamed_gib": streamed, "wall_streamed_s": wall_s})
            cache.unlink()
    (n0, r0), (n1, r1) = [(r["rows"], r["peak_rss_gib"]) for r in rows[:2]]
    per_row = (r1 - r0) / (n1 - n0)
    base = r0 - per_row * n0
    views4 = FULL * 4 * K * D * 2 / 2**30
    out = {"runs": rows, "per_row_bytes": per_row * 2**30, "base_gib": base,
           "domainnet_estimate_gib": base + per_row * FULL,
           "domainnet_views4_estimate_gib": base + per_row * FULL + views4}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in rows:
        print(f"scale {r['scale']:.4f}: {r['rows']:,} rows, features {r['features_gib']:.2f} GiB; peak RSS "
              f"{r['peak_rss_gib']:.2f} GiB in memory ({r['wall_s']:.0f} s), {r['peak_rss_streamed_gib']:.2f} GiB "
              f"with --memory-gib {r['memory_gib']:.2f} ({r['wall_streamed_s']:.0f} s)")
    print(f"per row {out['per_row_bytes']:,.0f} bytes (the features: {K * D * 2:,}); DomainNet ({FULL:,} rows): "
          f"{out['domainnet_estimate_gib']:.1f} GiB, with --views 4 held in memory "
          f"{out['domainnet_views4_estimate_gib']:.1f} GiB")


if __name__ == "__main__":
    main()

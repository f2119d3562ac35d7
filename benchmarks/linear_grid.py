"""Speed of the linear engine against the same runs trained one by one, and against the machine's floors.

    python benchmarks/linear_grid.py                 # CPU, 1 thread, CPU time, 3 interleaved repeats
    python benchmarks/linear_grid.py --device cuda   # wall time with synchronisation
    python benchmarks/linear_grid.py --json

A PACS-sized synthetic cache (N = 10,000, K = 3, D = 2048, C = 7, 4 domains, float16 features, batch 3 × 32 rows).
Grids: ``0.9`` (6 points per (held-out domain, seed): lr × weight decay at dropout 0.9; 12, 72 and 288 runs are
2, 12 and 48 groups) and ``mixed`` (24 points: dropout 0, 0.5, 0.9 and the probe; 24, 72 and 288 runs are 1, 3
and 12 groups). Variants, interleaved in one process and repeated ``--repeats`` times (the median is reported):

* ``one by one`` — one run with a plain ``torch.optim.SGD`` loop, rows and masks from torch's generator (ms per
  run-step, times the runs; each kind of grid point timed);
* ``engine`` — :func:`train_linear_grid` as linft runs it (the compiled sparse step for the dropout runs on a CPU);
* ``torch step`` — the same with ``step_kind="torch"``: the pure-torch fallback (dense, masked).

Per step: the median of the CPU time between consecutive steps (setup excluded). Floors: the measured float32
GEMM rate and copy bandwidth of this machine, the FLOPs of a step (dense: every (row, unit); sparse: only the
kept ones) and the bytes of its feature rows. Evaluation: one evaluation of all runs on the N rows, in the folded,
the factored and (CPU, up to 16 classes) the compiled form, for C = 7 and for C = 345 (DomainNet's classes, on 2,000
rows); the protocol estimate uses the form that ``auto`` takes. The protocol estimate is
10,000 steps and 35 evaluations (``--steps`` steps are timed per variant; the printout says so).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from linft.protocol.schedule import PAPER, eval_steps
from linft.runtime import resolve_device
from linft.train.linear.driver import LinearGrid
from linft.train.linear.engine import GridPoint, Group, LinearData, LinearGridConfig, train_linear_grid
from linft.train.linear.model import group_generator, initial_parameters, linear_ft_logits
from linft.train.linear.evaluate import _folded_logits, evaluate_grid
from linft._kernels.sparse_step import EVAL_MAX_CLASSES, load_kernel

N, K, D, C, NDOM, BATCH = 10_000, 3, 2048, 7, 4, 32
FULL_STEPS, EVAL_EVERY = PAPER.steps, PAPER.eval_every
FULL_EVALS = len(eval_steps(FULL_STEPS, EVAL_EVERY))
#: the benchmarked grids: the protocol's lr x weight decay at dropout 0.9, and at 0, 0.5, 0.9 plus the probe
GRIDS = {"0.9": LinearGrid(dropouts=(0.9,)), "mixed": LinearGrid(dropouts=(0.0, 0.5, 0.9), probe=True)}
SIZES = {"0.9": (12, 72, 288), "mixed": (24, 72, 288)}


def points_of(grid: str) -> list[GridPoint]:
    return GRIDS[grid].points()


def synthetic(dev):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N)
    domains = np.sort(rng.integers(0, NDOM, N))
    feats = np.abs(rng.standard_normal(size=(N, K, D), dtype=np.float32)).astype(np.float16)
    return torch.from_numpy(feats).to(dev), torch.from_numpy(labels).to(dev), domains


def groups_of(domains, points, runs, dev) -> list[Group]:
    pools = [torch.from_numpy(np.flatnonzero(domains == d)).to(dev) for d in range(NDOM)]
    n = runs // len(points)
    return [Group(i % NDOM, i // NDOM, [p for d, p in enumerate(pools) if d != i % NDOM], points) for i in range(n)]


def clock(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return time.perf_counter()
    return time.process_time()


def engine_ms(data, groups, step_kind, steps, dev) -> float:
    """Median time between consecutive steps of the engine (ms), all runs of ``groups``."""
    marks = []
    train_linear_grid(data, groups, LinearGridConfig(steps=steps, eval_every=10 * steps, step_kind=step_kind),
                      on_step=lambda s: marks.append(clock(dev)))
    return 1000 * float(np.median(np.diff(marks)))


def plain_ms(feats, labels, domains, point, steps, dev) -> float:
    """One run written the ordinary way (parameters, torch.optim.SGD, a Python loop): median ms per step."""
    v, V, b = (t.clone().requires_grad_(True) for t in initial_parameters(K, D, C, group_generator(0, 0, "init", dev),
                                                                         "last", point.probe, dev))
    opt = torch.optim.SGD([V, b] if point.probe else [v, V, b], lr=point.lr, momentum=0.9,
                          weight_decay=point.weight_decay)
    pools = [torch.from_numpy(np.flatnonzero(domains == d)).to(dev) for d in range(1, NDOM)]
    gen = torch.Generator(device=dev).manual_seed(0)
    marks = []
    for step in range(steps):  # rows and masks drawn as people write it, with torch's generator
        rows = torch.cat([p[torch.randint(len(p), (BATCH,), generator=gen, device=dev)] for p in pools])
        keep = torch.rand(len(rows), D, generator=gen, device=dev) >= point.dropout
        loss = F.cross_entropy(linear_ft_logits(feats[rows].float(), v, V, b, keep, point.dropout), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        marks.append(clock(dev))
    return 1000 * float(np.median(np.diff(marks)))


def eval_ms(rows, classes, runs, form, dev) -> float:
    g = torch.Generator(device=dev).manual_seed(0)
    feats = torch.rand(rows, K, D, generator=g, device=dev).half()
    labels = torch.randint(classes, (rows,), generator=g, device=dev)
    G = runs // 6
    v, Vt, b = (torch.randn(G, 6, K, D, device=dev), torch.randn(G, 6, D, classes, device=dev),
                torch.zeros(G, 6, classes, device=dev))
    split = torch.zeros(G, rows, dtype=torch.long, device=dev)
    t = clock(dev)
    evaluate_grid(feats, labels, split, v, Vt, b, 1, 4096, form)
    return 1000 * (clock(dev) - t)


def floors(dev) -> dict:
    """Measured float32 GEMM rate (GFLOP/s) and copy bandwidth (GB/s, bytes read + written)."""
    a = torch.randn(2048, 2048, device=dev)
    a @ a
    t = clock(dev)
    for _ in range(3):
        a @ a
    gemm = 3 * 2 * 2048**3 / (clock(dev) - t) / 1e9
    x, y = torch.ones(64 * 2**20, device=dev), torch.empty(64 * 2**20, device=dev)
    y.copy_(x)
    t = clock(dev)
    for _ in range(3):
        y.copy_(x)
    bandwidth = 3 * 2 * x.numel() * 4 / (clock(dev) - t) / 1e9
    return {"gemm_gflops": gemm, "bandwidth_gbs": bandwidth}


def step_costs(points, runs) -> dict:
    """FLOPs of one step (dense and sparse) and bytes of its feature rows (float16), for ``runs`` runs."""
    B, groups = (NDOM - 1) * BATCH, runs // len(points)
    per_pair = 4 * K + 6 * C  # Φ̃, logits, dV, dΦ̃, dv: multiply-adds per (row, unit) of one run, ×2 FLOPs
    dense = groups * sum(B * D * per_pair for _ in points)
    sparse = groups * sum(B * D * per_pair * (1 - p.dropout if not p.probe else 1) for p in points)
    return {"dense_mflop": dense / 1e6, "sparse_mflop": sparse / 1e6, "row_mbytes": groups * B * K * D * 2 / 1e6}


def graph_check(data, domains, dev, steps: int) -> dict:
    """The 72-run grid of dropout 0.9 with the step captured as a CUDA graph and eager: per-step time of each and
    the largest parameter difference (the same kernels replayed: expected 0)."""
    groups = groups_of(domains, points_of("0.9"), 72, dev)
    out = {}
    for graph in (True, False):
        marks = []
        params = train_linear_grid(data, groups, LinearGridConfig(steps=steps, eval_every=10 * steps, cuda_graph=graph),
                                   on_step=lambda s: marks.append(clock(dev)))
        out["graph" if graph else "eager"] = (1000 * float(np.median(np.diff(marks[5:]))), params)
    diff = max(float((a - b).abs().max()) for a, b in zip(out["graph"][1], out["eager"][1]))
    return {"graph_ms_per_step": out["graph"][0], "eager_ms_per_step": out["eager"][0], "max_param_diff": diff}


def protocol_run(data, domains, dev, steps: int, profile: bool) -> dict:
    """The 72-run grid of dropout 0.9 trained for ``steps`` steps with an evaluation every 300 and at the end (the
    whole protocol at 10,000): wall seconds, evaluations included; with ``profile`` the top operators of 20 steps
    (torch.profiler, sorted by device time on CUDA, CPU time otherwise)."""
    groups = groups_of(domains, points_of("0.9"), 72, dev)
    config = LinearGridConfig(steps=steps, eval_every=EVAL_EVERY)
    evals = []
    start = clock(dev) if dev.type == "cuda" else time.perf_counter()
    train_linear_grid(data, groups, config, on_eval=lambda ev: evals.append(ev.step))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out = {"steps": steps, "evaluations": len(evals), "wall_s": time.perf_counter() - start}
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            train_linear_grid(data, groups, LinearGridConfig(steps=20, eval_every=10))
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        out["profile"] = prof.key_averages().table(sort_by=key, row_limit=15)
    return out


def tensor_core_check(dev, rows: int = N, runs: int = 72) -> dict:
    """Evaluation logits of 72 runs (C = 7) in float32 and with TF32 tensor cores (CUDA): predictions that differ,
    how many of them are near-ties of the float32 logits (top-2 margin below 1e-3 of the logits' scale), and the
    time of each. Evaluation stays float32 unless every difference is a near-tie."""
    g = torch.Generator(device=dev).manual_seed(0)
    feats = torch.rand(rows, K, D, generator=g, device=dev).half()
    G = runs // 6
    v, Vt = torch.randn(G, 6, K, D, device=dev, generator=g), torch.randn(G, 6, D, C, device=dev, generator=g)
    b = torch.zeros(G, 6, C, device=dev)
    out, before = {}, torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            t = clock(dev)
            logits = _folded_logits(feats.float(), v, Vt, b)
            out[tf32] = (logits, 1000 * (clock(dev) - t))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    exact = out[False][0]
    top2 = exact.topk(2, dim=-1).values
    near = (top2[..., 0] - top2[..., 1]) < 1e-3 * exact.abs().amax()
    differ = exact.argmax(-1) != out[True][0].argmax(-1)
    return {"predictions": int(differ.numel()), "differ": int(differ.sum()), "differ_not_near_tie":
            int((differ & ~near).sum()), "near_ties": int(near.sum()), "float32_ms": out[False][1],
            "tf32_ms": out[True][1]}


def print_table(out: dict, results: list[dict], evals: dict, machine: dict, steps: int, repeats: int,
                compiled: bool) -> None:
    """The text report of :func:`main`: the step times per grid, the evaluations and the protocol estimate."""
    print(f"{out['device']}, {out['threads']} thread(s), {out['timer']}, median of {repeats} interleaved "
          f"repeats of {steps} steps; GEMM {machine['gemm_gflops']:.0f} GFLOP/s, "
          f"copy {machine['bandwidth_gbs']:.1f} GB/s")
    print(f"{'grid':>6} {'runs':>5} {'one by one':>11} {'engine':>8} {'torch step':>10} {'speed-up':>9} "
          f"{'floor sparse':>12} {'x floor':>8} {'floor dense':>11}  (ms per step, all runs)")
    for r in results:
        print(f"{r['grid']:>6} {r['runs']:>5} {r['one by one_ms']:>11.1f} {r['engine_ms']:>8.2f} "
              f"{r['torch step_ms']:>10.1f} {r['one by one_ms'] / r['engine_ms']:>8.1f}x "
              f"{r['floor_sparse_ms']:>12.2f} {r['engine_ms'] / r['floor_sparse_ms']:>7.1f}x "
              f"{r['floor_dense_ms']:>11.2f}")
    for name, ms in evals.items():
        print(f"evaluation {name}: {ms:.0f} ms")
    r72 = next(r for r in results if r["runs"] == 72)
    full = lambda step_ms, eval_ms_: (step_ms * FULL_STEPS + eval_ms_ * FULL_EVALS) / 1000
    ev = evals[f"C=7, {N} rows, 72 runs, {'compiled' if compiled else 'folded'}"]  # the form "auto" takes
    print(f"protocol estimate (grid {r72['grid']}, 72 runs, {FULL_STEPS} steps + {FULL_EVALS} evaluations, "
          f"extrapolated from {steps} timed steps): engine {full(r72['engine_ms'], ev):.0f} s, torch step "
          f"{full(r72['torch step_ms'], evals[f'C=7, {N} rows, 72 runs, folded']):.0f} s (folded evaluations), "
          f"one by one {full(r72['one by one_ms'], 0):.0f} s + evaluations")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=25, help="steps timed per variant and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grids", default="0.9,mixed")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--protocol", type=int, default=0, metavar="STEPS",
                    help="only train the 72-run grid for STEPS steps (10000: the whole protocol) with its evaluations, "
                         "wall time")
    ap.add_argument("--profile", action="store_true", help="with --protocol: also the top operators of 20 steps")
    ap.add_argument("--tensor-core-check", action="store_true",
                    help="only compare evaluation predictions in float32 and with TF32 tensor cores (CUDA)")
    ap.add_argument("--graph-check", type=int, default=0, metavar="STEPS",
                    help="only compare the captured (CUDA graph) and the eager step over STEPS steps")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    feats, labels, domains = synthetic(dev)
    data = LinearData(feats, labels, {s: torch.zeros(N, dtype=torch.long, device=dev) for s in range(12)}, 2, C)
    if args.protocol:
        result = protocol_run(data, domains, dev, args.protocol, args.profile)
        table = result.pop("profile", None)
        print(json.dumps(result, indent=2))
        if table:
            print(table)
        return
    if args.tensor_core_check:
        print(json.dumps(tensor_core_check(dev), indent=2))
        return
    if args.graph_check:
        print(json.dumps(graph_check(data, domains, dev, args.graph_check), indent=2))
        return
    machine = floors(dev)
    results = []
    for grid in args.grids.split(","):
        points = points_of(grid)
        kinds = {(p.dropout, p.probe): p for p in points}
        for runs in SIZES[grid]:
            groups = groups_of(domains, points, runs, dev)
            times = {"engine": [], "torch step": [], "one by one": []}
            for _ in range(args.repeats):  # variants interleaved
                times["engine"].append(engine_ms(data, groups, "auto", args.steps, dev))
                times["torch step"].append(engine_ms(data, groups, "torch", args.steps, dev))
                per_kind = {k: plain_ms(feats, labels, domains, p, args.steps, dev) for k, p in kinds.items()}
                times["one by one"].append(sum(per_kind[(p.dropout, p.probe)] for p in points) * len(groups))
            ms = {k: float(np.median(v)) for k, v in times.items()}
            cost = step_costs(points, runs)
            floor_dense = max(cost["dense_mflop"] / machine["gemm_gflops"],
                              cost["row_mbytes"] / machine["bandwidth_gbs"])
            floor_sparse = max(cost["sparse_mflop"] / machine["gemm_gflops"],
                               cost["row_mbytes"] / machine["bandwidth_gbs"])
            results.append({"grid": grid, "runs": runs, **{f"{k}_ms": v for k, v in ms.items()},
                            "spread_ms": {k: [float(min(v)), float(max(v))] for k, v in times.items()}, **cost,
                            "floor_dense_ms": floor_dense, "floor_sparse_ms": floor_sparse})
    compiled = dev.type == "cpu" and load_kernel()[0] is not None
    evals = {f"C={c}, {rows} rows, 72 runs, {form}": eval_ms(rows, c, 72, form, dev)
             for c, rows in ((7, N), (345, 2000)) for form in ("folded", "factored", "compiled")
             if form != "compiled" or (compiled and c <= EVAL_MAX_CLASSES)}
    out = {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
           "threads": torch.get_num_threads(), "timer": "CPU time" if dev.type == "cpu" else "wall time",
           "steps_timed": args.steps, "repeats": args.repeats, **machine, "grids": results, "eval_ms": evals}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print_table(out, results, evals, machine, args.steps, args.repeats, compiled)


if __name__ == "__main__":
    main()

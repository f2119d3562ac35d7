"""Speed of the stacked linear fine-tuning engine against the same runs trained one by one.

    python benchmarks/linear_grid.py                  # CPU: times a slice of steps and extrapolates
    python benchmarks/linear_grid.py --device cuda --steps 10000 --plain-steps 2000

A PACS-sized synthetic cache (N = 10,000, K = 3, D = 2048, C = 7, 4 domains)
and the paper's protocol for one dropout rate: 4 held-out domains x 6 grid
points (lr x weight decay) x 3 seeds = 72 runs x 10,000 steps, evaluated every
300 steps (35 evaluations per run). Both sides are timed on a slice
(``--steps`` engine steps for all 72 runs, ``--plain-steps`` steps of one run
with a plain torch.optim.SGD loop), with the cost of one evaluation timed
apart, and extrapolated to the full protocol (10,000 steps and 35
evaluations per run); the printout says so.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from linft.data.splits import domain_split_rows
from linft.protocol.schedule import eval_steps, lr_at
from linft.runtime import resolve_device
from linft.train.linear_engine import (
    GridPoint, Group, LinearData, LinearGridConfig, _evaluate, draw_batch, draw_noise, group_generator,
    initial_parameters, linear_ft_logits, train_linear_grid,
)

N, K, D, C, NDOM = 10_000, 3, 2048, 7, 4
FULL_STEPS, EVAL_EVERY = 10_000, 300
FULL_EVALS = len(eval_steps(FULL_STEPS, EVAL_EVERY))


def synthetic(dev):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N)
    domains = np.sort(rng.integers(0, NDOM, N))
    feats = np.abs(rng.normal(size=(N, K, D))).astype(np.float16)
    return torch.from_numpy(feats).to(dev), torch.from_numpy(labels).to(dev), domains


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def engine_seconds(feats, labels, domains, points, seeds, steps, dev) -> tuple[float, float]:
    """(seconds per step for all runs, seconds per evaluation of all runs)."""
    split_rows = {}
    groups = []
    for s in range(seeds):
        rows_of = domain_split_rows(domains, NDOM, s)
        ids = np.full(N, -1)
        for (d, part), rows in rows_of.items():
            ids[rows] = 2 * d + (part == "out")
        split_rows[s] = torch.from_numpy(ids).to(dev)
        for e in range(NDOM):
            pools = [torch.from_numpy(rows_of[(d, "in")]).to(dev) for d in range(NDOM) if d != e]
            groups.append(Group(e, s, pools, points))
    config = LinearGridConfig(steps=steps, eval_every=steps)  # evaluations at steps 0 and steps-1
    sync(dev)
    t = time.perf_counter()
    v, V, b = train_linear_grid(LinearData(feats, labels, split_rows, 2 * NDOM, C), groups, config)
    sync(dev)
    total = time.perf_counter() - t
    seed_split = torch.stack([split_rows[g.seed] for g in groups])
    t = time.perf_counter()
    _evaluate(feats, labels, seed_split, v, V, b, 2 * NDOM, config.eval_chunk)
    sync(dev)
    one_eval = time.perf_counter() - t
    return (total - 2 * one_eval) / steps, one_eval


def plain_seconds(feats, labels, domains, point, steps, dev) -> tuple[float, float]:
    """One run written the ordinary way (parameters, torch.optim.SGD, a Python loop):
    (seconds per step, seconds per evaluation on every example)."""
    gen = group_generator(0, 0, "init", dev)
    v, V, b = (t.clone().requires_grad_(True) for t in initial_parameters(K, D, C, gen, "last", False, dev))
    opt = torch.optim.SGD([v, V, b], lr=point.lr, momentum=0.9, weight_decay=point.weight_decay)
    rows_of = domain_split_rows(domains, NDOM, 0)
    pools = [torch.from_numpy(rows_of[(d, "in")]).to(dev) for d in range(1, NDOM)]
    gen = group_generator(0, 0, "batches", dev)
    sync(dev)
    t = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, point.lr, (FULL_STEPS // 2,))
        rows = draw_batch(pools, 32, gen)
        keep = draw_noise(len(rows), D, gen, dev) >= point.dropout
        loss = F.cross_entropy(linear_ft_logits(feats[rows].float(), v, V, b, keep, point.dropout), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync(dev)
    per_step = (time.perf_counter() - t) / steps
    t = time.perf_counter()
    with torch.no_grad():
        for a in range(0, N, 4096):
            (linear_ft_logits(feats[a:a + 4096].float(), v, V, b).argmax(1) == labels[a:a + 4096]).sum().item()
    sync(dev)
    return per_step, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=300, help="engine steps timed (all 72 runs)")
    ap.add_argument("--plain-steps", type=int, default=300, help="plain-loop steps timed (one run)")
    ap.add_argument("--dropout", type=float, default=0.9)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    feats, labels, domains = synthetic(dev)
    points = [GridPoint(lr, wd, args.dropout) for lr in (1e-3, 5e-4) for wd in (1e-4, 5e-5, 1e-5)]
    runs = len(points) * 3 * NDOM
    engine_step, engine_eval = engine_seconds(feats, labels, domains, points, 3, args.steps, dev)
    plain_step, plain_eval = plain_seconds(feats, labels, domains, points[0], args.plain_steps, dev)
    engine_full = engine_step * FULL_STEPS + engine_eval * FULL_EVALS
    plain_full = (plain_step * FULL_STEPS + plain_eval * FULL_EVALS) * runs
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "runs": runs, "full_steps": FULL_STEPS, "engine_steps_timed": args.steps, "plain_steps_timed": args.plain_steps,
        "engine_ms_per_step_all_runs": 1000 * engine_step, "engine_ms_per_eval_all_runs": 1000 * engine_eval,
        "plain_ms_per_run_step": 1000 * plain_step, "plain_ms_per_run_eval": 1000 * plain_eval,
        "engine_full_protocol_s": engine_full, "plain_full_protocol_s": plain_full,
        "speedup": plain_full / engine_full,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['device']}: {runs} runs x {FULL_STEPS} steps (N={N}, K={K}, D={D}, C={C}, dropout {args.dropout})")
    print(f"  engine: {1000 * engine_step:.1f} ms per step and {1000 * engine_eval:.0f} ms per evaluation for all "
          f"{runs} runs (timed {args.steps} steps) -> {engine_full:,.0f} s for the protocol (extrapolated)")
    print(f"  plain : {1000 * plain_step:.2f} ms per run-step and {1000 * plain_eval:.0f} ms per evaluation "
          f"(timed {args.plain_steps} steps of one run) -> {plain_full:,.0f} s for the protocol (extrapolated)")
    print(f"  speed-up: {result['speedup']:.1f}x")


if __name__ == "__main__":
    main()

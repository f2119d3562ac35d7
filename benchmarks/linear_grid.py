"""Speed of the stacked linear fine-tuning engine against the same runs trained one by one.

    python benchmarks/linear_grid.py                  # CPU: times a slice of steps and extrapolates
    python benchmarks/linear_grid.py --device cuda --steps 10000 --plain-steps 2000

A PACS-sized synthetic cache (N = 10,000, K = 3, D = 2048, C = 7, 4 domains)
and the paper's protocol for one dropout rate: 4 held-out domains x 6 grid
points (lr x weight decay) x 3 seeds = 72 runs x 10,000 steps, evaluated every
300 steps. Both sides are timed on a slice (``--steps`` engine steps for all
72 runs, ``--plain-steps`` steps of single runs with a plain torch.optim.SGD
loop, each with the evaluations that fall in the slice at the protocol's rate)
and extrapolated to the full protocol; the printout says so.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from linft.features import resolve_device
from linft.linear import (
    GridPoint, Group, LinearGridConfig, draw_batch, draw_noise, group_generator, initial_parameters,
    linear_ft_logits, lr_at, train_linear_grid,
)
from linft.protocol import domain_split_rows

N, K, D, C, NDOM = 10_000, 3, 2048, 7, 4
FULL_STEPS, EVAL_EVERY = 10_000, 300


def synthetic(dev):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, C, N)
    domains = np.sort(rng.integers(0, NDOM, N))
    feats = np.abs(rng.normal(size=(N, K, D))).astype(np.float16)
    return torch.from_numpy(feats).to(dev), torch.from_numpy(labels).to(dev), domains


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def engine_seconds(feats, labels, domains, points, seeds, steps, dev) -> float:
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
    # the slice keeps the protocol's evaluation rate: one evaluation per EVAL_EVERY steps
    config = LinearGridConfig(steps=steps, eval_every=EVAL_EVERY)
    sync(dev)
    t = time.perf_counter()
    train_linear_grid(feats, labels, split_rows, 2 * NDOM, groups, C, config)
    sync(dev)
    return time.perf_counter() - t


def plain_seconds(feats, labels, domains, point, steps, dev) -> float:
    """One run, written the ordinary way: parameters, torch.optim.SGD, a Python loop; evaluation at the protocol's rate."""
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
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                for a in range(0, N, 4096):
                    linear_ft_logits(feats[a:a + 4096].float(), v, V, b).argmax(1)
    sync(dev)
    return time.perf_counter() - t


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
    engine = engine_seconds(feats, labels, domains, points, 3, args.steps, dev)
    plain = plain_seconds(feats, labels, domains, points[0], args.plain_steps, dev)
    engine_full = engine / args.steps * FULL_STEPS
    plain_full = plain / args.plain_steps * FULL_STEPS * runs
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "runs": runs, "full_steps": FULL_STEPS, "engine_steps_timed": args.steps, "plain_steps_timed": args.plain_steps,
        "engine_ms_per_step_all_runs": 1000 * engine / args.steps,
        "plain_ms_per_run_step": 1000 * plain / args.plain_steps,
        "engine_full_protocol_s": engine_full, "plain_full_protocol_s": plain_full,
        "speedup": plain_full / engine_full,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['device']}: {runs} runs x {FULL_STEPS} steps (N={N}, K={K}, D={D}, C={C}, dropout {args.dropout})")
    print(f"  engine: {result['engine_ms_per_step_all_runs']:.1f} ms per step for all {runs} runs "
          f"(timed {args.steps} steps) -> {engine_full:,.0f} s for the protocol (extrapolated)")
    print(f"  plain : {result['plain_ms_per_run_step']:.2f} ms per run-step "
          f"(timed {args.plain_steps} steps of one run) -> {plain_full:,.0f} s for the protocol (extrapolated)")
    print(f"  speed-up: {result['speedup']:.1f}x")


if __name__ == "__main__":
    main()

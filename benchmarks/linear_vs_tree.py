"""The linear protocol with this linft against another checkout of linft, each in its own process.

    git worktree add --detach /tmp/linft-old 5bc9407      # the engine before the compiled kernel
    python benchmarks/linear_vs_tree.py /tmp/linft-old    # alternated twice, 1 thread, CPU time

Both trees train the same synthetic grid (N = 10,000, K = 3, D = 2048, C = 7, float16 features, 8 splits; 72 runs:
4 held-out domains x 3 seeds x 2 lr x 3 weight decays at dropout 0.9) through ``train_linear_grid``, whose API
has not changed: the median time between steps of 60 steps, and one evaluation's time (the difference between
60 steps with 7 evaluations and with 1, over 6). The protocol estimate is 10,000 steps and 35 evaluations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
torch.set_num_threads(1)
import linft
from linft.protocol.grid import PAPER_GRID
from linft.train.linear.engine import GridPoint, Group, LinearData, LinearGridConfig, train_linear_grid
N, K, D, C, NDOM = 10000, 3, 2048, 7, 4
rng = np.random.default_rng(0)
labels = torch.from_numpy(rng.integers(0, C, N))
domains = np.sort(rng.integers(0, NDOM, N))
feats = torch.from_numpy(np.abs(rng.standard_normal(size=(N, K, D), dtype=np.float32)).astype(np.float16))
points = [GridPoint(lr, wd, 0.9) for lr in PAPER_GRID.lrs for wd in PAPER_GRID.weight_decays]
groups = [Group(e, s, [torch.from_numpy(np.flatnonzero(domains == d)) for d in range(NDOM) if d != e], points)
          for s in range(3) for e in range(NDOM)]
data = LinearData(feats, labels, {s: torch.from_numpy(rng.integers(0, 8, N)) for s in range(3)}, 8, C)

def run(steps, every):
    marks, evals = [], []
    t = time.process_time()
    train_linear_grid(data, groups, LinearGridConfig(steps=steps, eval_every=every),
                      on_step=lambda s: marks.append(time.process_time()), on_eval=lambda ev: evals.append(ev.step))
    return time.process_time() - t, marks, evals

t1, marks, e1 = run(60, 1000)
t7, _, e7 = run(60, 10)
step = 1000 * float(np.median(np.diff(marks)))
ev = 1000 * (t7 - t1) / (len(e7) - len(e1))
print(json.dumps({"tree": str(__import__("pathlib").Path(linft.__file__).parents[1]), "step_ms": step, "eval_ms": ev,
                  "protocol_s": (step * 10000 + ev * 35) / 1000}))
"""


def measure(tree: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{tree}: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", type=Path, help="a checkout of another linft (its repository root)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[1]
    rows = [measure(tree) for _ in range(args.repeats) for tree in (args.other, here)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(f"{r['tree']}: step {r['step_ms']:.2f} ms, evaluation {r['eval_ms']:.0f} ms, "
              f"protocol {r['protocol_s']:.0f} s")
    old = [r["protocol_s"] for r in rows[0::2]]
    new = [r["protocol_s"] for r in rows[1::2]]
    print(f"protocol: {min(old) / max(new):.1f}-{max(old) / min(new):.1f}x faster than {args.other}")


if __name__ == "__main__":
    main()

"""``linft train-linear``: the linear fine-tuning protocol from a feature cache."""

from __future__ import annotations

from pathlib import Path

import click

from linft.cli.options import grid_options, print_grid_outcome, repeatable
from linft.output import say_line
from linft.protocol.records import done_summary
from linft.train.linear.driver import LinearGrid, default_linear_out, train_linear
from linft.train.linear.engine import LinearGridConfig
from linft.train.linear.model import V_INITS

#: The library's defaults (the paper's grid and schedule): each option's default is read from them.
GRID, CONFIG = LinearGrid(), LinearGridConfig()


@click.command("train-linear")
@click.argument("cache", type=click.Path(dir_okay=False))
@click.option("--dropout", "dropouts", type=float, multiple=True, default=GRID.dropouts, show_default=True,
              help=repeatable("Dropout rate on the adapted representation.", "--dropout 0 --dropout 0.9"))
@click.option("--probe", is_flag=True, help="Also run linear probing (v fixed to the last block, only V, b trained).")
@click.option("--probe-only", is_flag=True, help="Run only linear probing.")
@grid_options("Trial seeds 0..N-1 (split, batches, masks, init).")
@click.option("--steps", type=int, default=CONFIG.steps, show_default=True, help="SGD steps per run; lr ÷10 at half.")
@click.option("--eval-every", type=int, default=CONFIG.eval_every, show_default=True)
@click.option("--batch-size", type=int, default=CONFIG.batch_size, show_default=True,
              help="Examples per training domain per step.")
@click.option("--v-init", type=click.Choice(V_INITS), default=CONFIG.v_init, show_default=True,
              help="v at the start: 'last' = the pretrained penultimate representation (v_l = 1, others 0); "
                   "'normal' = N(0, 1) per channel, as the official code.")
@click.option("--test-domains", multiple=True,
              help=repeatable("Held-out domains to run (default: every domain).",
                              "--test-domains photo --test-domains sketch"))
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for records.jsonl. Default: runs/linear/<cache name>/")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False), default=None,
              help="Also write the records as TensorBoard event files under this folder (pip install "
                   "'linft[tensorboard]'; then: tensorboard --logdir DIR).")
@click.option("--memory-gib", type=float, default=None,
              help="Keep at most this many GiB of cached features and views in memory; the rest is read from the "
                   "file in chunks, and what is left of the budget also bounds an evaluation's chunk of rows "
                   "(default: everything in memory).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary table as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar and no line per evaluation.")
def train_linear_cmd(cache, dropouts, probe, probe_only, lrs, weight_decays, seeds, split_seed, steps, eval_every,
                     batch_size, v_init, test_domains, device, out, tensorboard_dir, memory_gib, as_json, quiet):
    """Train linear fine-tuning y = V(Σ v_k⊙φ_k) + b with dropout over the whole protocol.

    Every held-out domain x seed x lr x weight decay x dropout rate trains at
    once from CACHE (a file made by `linft extract`). Records are appended to
    OUT/records.jsonl as runs progress; running the same command again skips
    finished runs. Then prints the DomainBed-style table (per seed the grid
    point with the best i.i.d. accuracy, mean ± SE over seeds). While it
    trains, one line per evaluation sums up the grid on stderr. Exits with
    status 1 when every run diverged (nothing to report).

    \b
    Example:
      linft train-linear features_cache/pacs_r50v2.h5 --dropout 0 --dropout 0.9 --probe --out runs/pacs_linear
      linft report runs/pacs_linear
    """
    out = Path(out) if out else default_linear_out(cache)
    config = LinearGridConfig(steps=steps, batch_size=batch_size, eval_every=eval_every, v_init=v_init)
    result = train_linear(cache, out, dropouts=() if probe_only else dropouts, probe=probe or probe_only, lrs=lrs,
                          weight_decays=weight_decays, seeds=seeds, split_seed=split_seed, test_domains=test_domains,
                          config=config, device=device, progress=not quiet, say=None if quiet else say_line,
                          tensorboard_dir=tensorboard_dir,
                          memory_budget=None if memory_gib is None else memory_gib * 2**30)
    click.echo(f"{done_summary(result.trained, result.skipped, diverged=result.diverged)} -> {result.records}",
               err=True)
    print_grid_outcome([result.records], result.divergence, result.usable, as_json)

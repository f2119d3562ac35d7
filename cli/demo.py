"""``linft demo-data`` and ``linft demo``: the built-in procedural benchmark and the end-to-end demo."""

from __future__ import annotations

import click

from linft.demo import run_demo
from linft.data.shapes import DEMO_CLASSES, DEMO_STYLES, write_demo_data
from linft.output import say_line


@click.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
@click.option("--per-class", type=int, default=150, show_default=True, help="Images per domain and class.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels (16 to 64).")
@click.option("--force", is_flag=True, help="Replace a folder that is not empty, whole (refused without it).")
def demo_data(out_dir, seed, per_class, size, force):
    """Write the demo benchmark: 4 style domains x 7 shape classes as PNG files.

    The layout is OUT_DIR/<domain>/<class>/<image>.png, ready for `linft extract`.
    OUT_DIR must be new or empty unless --force, which replaces it whole (then
    re-extract caches made from it with `linft extract --force`).

    \b
    Example:
      linft demo-data data/demo --seed 0
    """
    path = write_demo_data(out_dir, seed=seed, per_class=per_class, size=size, force=force)
    n = per_class * len(DEMO_CLASSES)
    click.echo(f"wrote {len(DEMO_STYLES)} domains ({', '.join(DEMO_STYLES)}) x {n} images to {path}")


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True,
              help="Folder for the demo's data, cache and report.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars, stage lines or lines per evaluation: only the result.")
@click.option("--across-runs", is_flag=True,
              help="Also fine-tune with lr 5e-4 and record ensembles and soups across the two runs of each held-out "
                   "domain (about 4 more minutes on 2 CPU cores).")
def demo(out, seed, quiet, across_runs):
    """Run linft end to end on the built-in benchmark (CPU, under 4 minutes on 2 cores, no download).

    \b
    Examples:
      linft demo --out demo_out
      linft demo --out demo_out --across-runs   # + ensembles and soups across runs (reuses the rest)
    """
    result = run_demo(out, seed=seed, across_runs=across_runs, progress=not quiet,
                      say=(lambda _line: None) if quiet else say_line)
    click.echo((result.report / "summary.md").read_text())
    click.echo(f"demo finished: report in {result.report}/ (summary.md, clouds.png, dropout.png, CSV), "
               f"run records in {result.out / 'runs'}")

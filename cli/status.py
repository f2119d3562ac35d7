"""``linft status``: where a sweep stands, read from its folder while its jobs run."""

from __future__ import annotations

import click

from linft.output import json_text
from linft.train.sweeps.status import DEFAULT_STALE_AFTER, describe_status, sweep_status


@click.command("status")
@click.argument("runs_dir", type=click.Path(file_okay=False))
@click.option("--stale-minutes", type=float, default=DEFAULT_STALE_AFTER / 60, show_default=True,
              help="A run whose files have not changed for this long counts as interrupted, not running (choose "
                   "more than the time between two of its evaluations).")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
def status(runs_dir, stale_minutes, as_json):
    """Show how many runs of a sweep are done, running, interrupted, diverged or still to do.

    RUNS_DIR is the --out folder of `linft finetune` or `linft train-linear`
    (or of `linft demo`): run folders, records files, feature caches. It
    lists the last step of each running run, the interrupted ones, and the
    best i.i.d. accuracy so far per method and held-out domain. Files are only
    read, without locks, so it runs next to the jobs that write them. A run
    is running when its files changed within --stale-minutes, interrupted
    otherwise; runs to do are those of the grid not started yet.

    \b
    Examples:
      linft status runs/pacs_ft
      watch -n 60 linft status runs/pacs_ft
      linft status runs/pacs_linear --json | jq .counts
    """
    report = sweep_status(runs_dir, stale_after=stale_minutes * 60)
    click.echo(json_text(report.to_dict(), indent=2) if as_json else describe_status(report))

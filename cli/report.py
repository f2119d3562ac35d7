"""``linft report``: tables and plots from run records of any method."""

from __future__ import annotations

import json

import click

from linft.analysis.report import write_report


@click.command()
@click.argument("records", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="report", show_default=True)
@click.option("--selection", type=click.Choice(["iid", "oracle"]), default="iid", show_default=True,
              help="Which step of each run counts: best i.i.d. (training-domain validation) or best o.o.d. (oracle).")
@click.option("--json", "as_json", is_flag=True, help="Print the written file paths as JSON.")
def report(records, out, selection, as_json):
    """Tables (markdown, CSV) and plots (PNG) from RECORDS files or folders of any linft method.

    Writes summary.md (DomainBed-style tables, mean ± SE over seeds), table.csv,
    runs.csv, clouds.csv and clouds.png (the paper's i.i.d.-vs-o.o.d. clouds:
    seeds averaged per held-out domain and grid point, every choice of one grid
    point per domain is one point), and dropout.png when several dropout rates exist.

    \b
    Example:
      linft report runs/pacs_linear runs/pacs_finetune --out reports/pacs
    """
    paths = write_report(records, out, selection)
    if as_json:
        click.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        return
    click.echo((paths["summary"]).read_text())
    click.echo(f"report written to {out}/ ({', '.join(p.name for p in paths.values())})")

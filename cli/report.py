"""``linft report``: tables and plots from run records of any method."""

from __future__ import annotations

import click

from linft.analysis.report import write_report
from linft.protocol.selection import SE_CONVENTIONS
from linft.output import json_text


@click.command()
@click.argument("records", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default="report", show_default=True)
@click.option("--selection", type=click.Choice(["iid", "oracle"]), default="iid", show_default=True,
              help="Which step of each run counts: best i.i.d. (training-domain validation) or best o.o.d. (oracle).")
@click.option("--se", type=click.Choice(list(SE_CONVENTIONS)), default="sample", show_default=True,
              help="Standard error over seeds: sample = std(ddof=1)/sqrt(n); domainbed = std(ddof=0)/sqrt(n), "
                   "as DomainBed's tables.")
@click.option("--force", is_flag=True, help="Replace a report already in --out (refused without it).")
@click.option("--json", "as_json", is_flag=True, help="Print the written file paths as JSON.")
def report(records, out, selection, se, force, as_json):
    """Tables (markdown, CSV) and figures (PNG and PDF) from RECORDS files or folders of any linft method.

    Writes summary.md (DomainBed-style tables in percent, mean ± SE over seeds,
    with the selection, tie and SE rules), table.csv, runs.csv and clouds.csv
    (accuracies as fractions in [0, 1]), and each figure with something to draw
    as PNG and PDF: clouds (the paper's Figure 2: seeds averaged per held-out
    domain and grid point, every choice of one grid point per domain is one
    point; ensembles and soups across runs are single points), figure9 (records
    of several pretrained models: naive vs advanced fine-tuning per model),
    dropout (several dropout rates) and interpolation. A folder that already
    holds a report is refused unless --force (the new report then replaces it
    whole, once every file is written).

    \b
    Example:
      linft report runs/pacs_linear runs/pacs_finetune --out reports/pacs
      linft report runs/resnet50_v1 runs/resnet50_v2 --out reports/figure9 --se domainbed
    """
    paths = write_report(records, out, selection, se, force=force)
    if as_json:
        click.echo(json_text({k: str(v) for k, v in paths.items()}, indent=2))
        return
    click.echo((paths["summary"]).read_text())
    click.echo(f"report written to {out}/ ({', '.join(p.name for p in paths.values())})")

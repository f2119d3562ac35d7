"""``linft cache info|verify``: inspect a feature cache."""

from __future__ import annotations

import click

from linft.cache import cache_info, verify_cache
from linft.cache.format import describe_cache
from linft.output import json_text


@click.group()
def cache():
    """Inspect feature caches written by `linft extract`."""


@cache.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print every attribute as one JSON object.")
def info(path, as_json):
    """Show what a cache holds and where it came from.

    \b
    Example:
      linft cache info features_cache/pacs_r50v2.h5 --json | jq .weights_sha256
    """
    meta = cache_info(path)
    if as_json:
        click.echo(json_text(meta, indent=2, sort_keys=True))
        return
    click.echo(describe_cache(meta))


@cache.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(file_okay=False), default=None,
              help="Dataset folder to compare the cached file list with.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def verify(path, data, as_json):
    """Check that a cache is complete and consistent (and, with --data, matches the folder).

    Exits with status 1 when a check fails.

    \b
    Example:
      linft cache verify features_cache/pacs_r50v2.h5 --data ~/data/PACS
    """
    report = verify_cache(path, data)
    if as_json:
        click.echo(json_text({"path": str(report.path), "ok": report.ok,
                              "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in report.checks]}, indent=2))
    else:
        for check, ok, detail in report.checks:
            click.echo(f"{'ok  ' if ok else 'FAIL'}  {check}: {detail}")
        click.echo(f"{report.path}: {'verified' if report.ok else 'verification FAILED'}")
    if not report.ok:
        raise SystemExit(1)

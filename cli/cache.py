"""``linft cache info|verify``: inspect a feature cache."""

from __future__ import annotations

import json

import click

from linft.features import cache_info, verify_cache


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
        click.echo(json.dumps(meta, indent=2, sort_keys=True))
        return
    n, done = meta["num_examples"], meta.get("num_done", 0)
    state = "complete" if meta.get("complete") else f"UNFINISHED ({done} of {n} images)"
    feats = meta["datasets"]["features"]
    rows = [
        ("file", f"{meta['path']} ({meta['file_bytes'] / 2**20:.1f} MiB, {state})"),
        ("dataset", f"{meta['dataset_name']} at {meta['dataset_root']}"),
        ("images", f"{n} in {len(meta['domain_names'])} domains, {len(meta['class_names'])} classes"),
        ("domains", ", ".join(f"{d} ({meta['per_domain'][d]['count']})" for d in meta["domain_names"])),
        ("backbone", f"{meta['backbone']}, weights {meta['weights']} ({meta['weights_label']}), "
                     f"sha256 {meta['weights_sha256'][:16]}"),
        ("blocks", ", ".join(meta["blocks"])),
        ("features", f"{tuple(feats['shape'])} {feats['dtype']}, computed in {meta['compute']}"),
        ("transform", meta["transform"]),
        *([("views", f"{meta['views']} augmented views per image: {meta['views_transform']}, seed {meta['views_seed']}")]
          if meta.get("views") else []),
        ("file list", f"sha256 {meta['file_list_sha256'][:16]}"),
        ("provenance", meta["provenance_sha256"]),
        ("made with", f"linft {meta['linft_version']}, torch {meta['torch_version']}, "
                      f"torchvision {meta['torchvision_version']} on {meta['device']}, {meta['created']}"),
    ]
    skipped = meta.get("skipped_paths") or []
    if skipped:
        rows.append(("skipped", f"{len(skipped)} unreadable images: {', '.join(skipped[:3])}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


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
        click.echo(json.dumps({"path": str(report.path), "ok": report.ok,
                               "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in report.checks]}, indent=2))
    else:
        for check, ok, detail in report.checks:
            click.echo(f"{'ok  ' if ok else 'FAIL'}  {check}: {detail}")
        click.echo(f"{report.path}: {'verified' if report.ok else 'verification FAILED'}")
    if not report.ok:
        raise SystemExit(1)

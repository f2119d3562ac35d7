"""The report: tables (markdown, CSV) and figures from run records only (no model, no GPU).

:func:`write_report` writes ``summary.md``, ``table.csv``, ``runs.csv``,
``clouds.csv``, ``clouds.png``, ``dropout.png`` (when several dropout rates
exist) and ``interpolation.png`` (when interpolation records exist) into one
folder; every file is written atomically. :func:`summary_tables` is the short
form the training commands print after a run.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path

from linft.analysis.aggregate import (SelectedRun, cloud_points, cloud_tables, domainbed_table, missing_domains,
                                      run_results, table_markdown, table_rows)
from linft.analysis.plots import plot_clouds, plot_dropout, plot_interpolation
from linft.errors import LinftError
from linft.protocol.records import read_records
from linft.runtime import atomic_write_text


def is_interpolation(result: SelectedRun) -> bool:
    """Interpolation records are curves over α (drawn by :func:`plot_interpolation`), not methods with a grid."""
    return result.method.startswith("interpolation-")


def summary_tables(record_paths, selection: str = "iid") -> dict:
    """DomainBed's table of the records: ``{"rows": [...] (for JSON), "markdown": "..." (o.o.d. then i.i.d.)}``."""
    results = [r for r in run_results(read_records(record_paths), selection) if not is_interpolation(r)]
    table = domainbed_table(results, selection)
    return {"rows": table_rows(table), "markdown": table_markdown(table, "ood") + "\n" + table_markdown(table, "iid")}


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _curves_table(result, keys: list[str], title: str) -> str:
    names = {"weights": "weights", "representation": "representation", "linearized": "first-order"}
    short = [names.get(k, k.split(":", 1)[-1]) for k in keys]
    lines = [f"**{title}**\n", "| α | " + " | ".join(f"{n} iid | {n} ood" for n in short) + " |",
             "|---" * (1 + 2 * len(keys)) + "|"]
    for i, a in enumerate(result.alphas):
        cells = [_pct(result.curves[k][i][m]) for k in keys for m in ("iid", "ood")]
        lines.append(f"| {a:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def interpolation_text(result) -> str:
    """An :class:`~linft.analysis.interpolate.InterpolationResult` as text: accuracy per α and path, linearity."""
    main = [k for k in ("weights", "representation", "linearized") if k in result.curves]
    blocks = [k for k in result.curves if k.startswith("block:")]
    label = next(iter(result.labels.values()))
    suffix = label[label.rfind(" ["):] if label.endswith("]") else ""
    out = [f"{result.dataset}, held out {result.test_domain}, seed {result.seed}{suffix}: accuracy (%) per α "
           f"(α = share of the fine-tuned model)\n", _curves_table(result, main, "interpolation paths")]
    if blocks:
        out.append(_curves_table(result, blocks, "representation interpolation per φ block (probe heads on each model)"))
    if result.linearity:
        lin = result.linearity
        out.append("**post-hoc linearity** (θ0 = pretrained with probe head)\n")
        out += [f"  {w:<10} iid {_pct(lin[w]['iid'])}  ood {_pct(lin[w]['ood'])}" for w in ("f(θf)", "f_lin(θf)", "f(θ0)")]
        out.append(f"  relative gap ‖f(θf) − f_lin(θf)‖ / ‖f(θf) − f(θ0)‖ = {lin['gap']:.4f}\n")
    out.append(f"records: {result.records} ({result.records_written} new)")
    if result.plot:
        out.append(f"plot: {result.plot}")
    return "\n".join(out)


def _csv(rows) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def _runs_csv(results: list[SelectedRun]) -> str:
    rows = [["dataset", "label", "test_domain", "seed", "grid", "step", "iid", "ood", "status"]]
    for r in sorted(results, key=lambda r: (r.dataset, r.label, r.test_domain, r.grid, r.seed)):
        rows.append([r.dataset, r.label, r.test_domain, r.seed, dict(r.grid), r.step, r.iid, r.ood, r.status])
    return _csv(rows)


def _table_csv(table: dict) -> str:
    rows = [["dataset", "label", "test_domain", "iid_mean", "iid_se", "ood_mean", "ood_se", "seeds"]]
    for (dataset, label), row in sorted(table.items()):
        for d, cell in row.items():
            rows.append([dataset, label, d, *cell["iid"], *cell["ood"], cell["n"]])
    return _csv(rows)


def _clouds_csv(clouds: dict) -> str:
    rows = [["dataset", "label", "iid", "ood", "exact"]]
    for (dataset, label), tab in sorted(clouds.items()):
        pts, exact = cloud_points(tab)
        rows.extend([dataset, label, x, y, exact] for x, y in pts)
    return _csv(rows)


def _summary(results, table, clouds, record_paths, selection: str, files: list[str]) -> str:
    counts = defaultdict(lambda: defaultdict(int))
    for r in results:
        counts[(r.dataset, r.label)][r.status] += 1
    rule = ("best i.i.d. step of each run, and per seed the grid point with the best i.i.d. accuracy "
            "(training-domain validation)" if selection == "iid" else
            "oracle: best o.o.d. step of each run, and per seed the grid point with the best o.o.d. accuracy")
    lines = ["# linft report\n", f"Selection: {rule}. Records: {', '.join(map(str, record_paths))}.\n",
             table_markdown(table, "ood"), table_markdown(table, "iid"), "**Runs**\n",
             "| dataset | method | ok | diverged | unfinished | cloud points |", "|---|---|---|---|---|---|"]
    for key in sorted(counts):
        c = counts[key]
        n_cloud = len(cloud_points(clouds[key])[0]) if key in clouds else 0
        lines.append(f"| {key[0]} | {key[1]} | {c['ok']} | {c['diverged']} | {c['unfinished']} | {n_cloud} |")
    for (dataset, label), domains in sorted(missing_domains(results).items()):
        lines.append(f"\n{label} on {dataset}: no usable run for held-out {', '.join(domains)}; "
                     f"its average and cloud are left out.")
    diverged = [r for r in results if r.status == "diverged"]
    if diverged:
        lines.append("\nDiverged runs (not averaged in): " + "; ".join(
            f"{r.label} {r.test_domain} seed {r.seed} {dict(r.grid)}" for r in diverged[:20]))
    lines.append("\nFiles: " + ", ".join(files))
    return "\n".join(lines) + "\n"


def _write_report(results: list[SelectedRun], record_paths, out: Path, selection: str) -> dict:
    curves = [r for r in results if is_interpolation(r)]
    results = [r for r in results if not is_interpolation(r)]
    table, clouds = domainbed_table(results, selection), cloud_tables(results)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs": atomic_write_text(out / "runs.csv", _runs_csv(results)),
             "table": atomic_write_text(out / "table.csv", _table_csv(table)),
             "clouds_csv": atomic_write_text(out / "clouds.csv", _clouds_csv(clouds))}
    if clouds:
        paths["clouds_png"] = plot_clouds(clouds, out / "clouds.png")
    dropout_png = plot_dropout(results, out / "dropout.png", selection)
    if dropout_png:
        paths["dropout_png"] = dropout_png
    interpolation_png = plot_interpolation(curves, out / "interpolation.png") if curves else None
    if interpolation_png:
        paths["interpolation_png"] = interpolation_png
    summary = _summary(results, table, clouds, record_paths, selection, [p.name for p in paths.values()])
    paths["summary"] = atomic_write_text(out / "summary.md", summary)
    return paths


def write_report(record_paths, out_dir, selection: str = "iid") -> dict:
    """Write the report of the records in ``record_paths`` (files or folders) into ``out_dir``; return the paths."""
    records = read_records(record_paths)
    if not records:
        raise LinftError(f"the run records in {', '.join(map(str, record_paths))} are empty; train something first")
    results = run_results(records, selection)
    try:
        return _write_report(results, record_paths, Path(out_dir), selection)
    except OSError as exc:
        raise LinftError(f"cannot write the report to {out_dir} ({exc.strerror or exc}); choose another --out") from None

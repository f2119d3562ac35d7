"""The report: tables (markdown, CSV) and figures from run records only (no model, no GPU).

:func:`write_report` writes ``summary.md``, ``table.csv``, ``runs.csv``,
``clouds.csv`` and the figures that have something to draw, each as PNG and
PDF (:data:`FIGURES`: the paper's Figures 2 to 10 whose records are there, and
the interpolation curves), embedded in ``summary.md``, into one folder; every
file is written atomically. Accuracies are fractions in [0, 1] in every CSV
(columns named ``*_acc*``) and percent in the markdown tables and figures.
:func:`summary_tables` is the short form the training commands print after a
run.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path

from linft.analysis.aggregate import (TIE_RULES, SelectedRun, domainbed_table, missing_domains, run_results,
                                      table_markdown, table_rows, tie_counts)
from linft.analysis.findings import findings_text
from linft.analysis.figures import (figure2_points, figure3_points, figure4_points, figure5_points, figure6_points,
                                    figure7_points, figure8_points, figure9_points, figure10_points)
from linft.analysis.plots import (DPI, clouds_figure, dropout_figure, figure9_figure, interpolation_figure,
                                  save_figure)
from linft.data.folders import check_output_apart
from linft.errors import LinftError
from linft.locks import output_lock
from linft.protocol.records import read_records
from linft.protocol.selection import SE_FORMULAS, check_se
from linft.output import PARTIAL_SUFFIX, WriteError, atomic_write_text, remove_path, write_failure

#: What summary.md says before its findings.
FINDINGS_INTRO = ("The paper's claims on these records, computed from them: o.o.d. accuracy differences in "
                  "percentage points, each the mean ± standard error of the differences paired by held-out domain "
                  "and seed, at the grid points selection chose.")

#: What summary.md says about units.
UNITS_NOTE = ("Units: accuracies are fractions in [0, 1] in every CSV (columns named *_acc*) and percent in the "
              "markdown tables and figures.")


def is_interpolation(result: SelectedRun) -> bool:
    """Interpolation records are curves over α (drawn by :func:`plot_interpolation`), not methods with a grid."""
    return result.method.startswith("interpolation-")


def summary_tables(record_paths, selection: str = "iid", se: str = "sample") -> dict:
    """DomainBed's table of the records: ``{"rows": [...] (for JSON: fractions, None where there is no value),
    "markdown": "..." (o.o.d. then i.i.d., percent)}``; ``se`` is the standard-error convention."""
    check_se(se)
    results = [r for r in run_results(read_records(record_paths), selection) if not is_interpolation(r)]
    table = domainbed_table(results, selection, se)
    return {"rows": table_rows(table),
            "markdown": table_markdown(table, "ood", se) + "\n" + table_markdown(table, "iid", se)}


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


# The main interpolation paths (linft.interpolation.run.PATHS) in the order the text shows them; the gap formula.
_MAIN_PATHS = ("weights", "representation", "linearized")
_GAP = "relative gap ‖f(θf) − f_lin(θf)‖ / ‖f(θf) − f(θ0)‖"


def _paths_text(result, heading: str, middle: list[str], tail: str) -> str:
    """The text both interpolation results share: heading, the paths' table, ``middle``, ``tail``, the plot."""
    keys = [k for k in _MAIN_PATHS if k in result.curves]
    out = [heading, _curves_table(result, keys, "interpolation paths"), *middle, tail]
    return "\n".join(out + ([f"plot: {result.plot}"] if result.plot else []))


def interpolation_text(result) -> str:
    """An :class:`~linft.interpolation.run.InterpolationResult` as text: accuracy per α and path, linearity."""
    blocks = [k for k in result.curves if k.startswith("block:")]
    suffix = f" [{result.finetuned_label}]" if result.finetuned_label else ""
    middle = []
    if blocks:
        middle.append(_curves_table(result, blocks,
                                    "representation interpolation per φ block (probe heads on each model)"))
    if result.linearity:
        lin = result.linearity
        middle.append("**post-hoc linearity** (θ0 = pretrained with probe head)\n")
        middle += [f"  {w:<10} iid {_pct(lin[w]['iid'])}  ood {_pct(lin[w]['ood'])}"
                   for w in ("f(θf)", "f_lin(θf)", "f(θ0)")]
        middle.append(f"  {_GAP} = {lin['gap']:.4f}\n")
    return _paths_text(result, f"{result.dataset}, held out {result.test_domain}, seed {result.seed}{suffix}: "
                               f"accuracy (%) per α (α = share of the fine-tuned model)\n", middle,
                       f"records: {result.records} ({result.records_written} new)")


def checkpoint_interpolation_text(result) -> str:
    """A :class:`~linft.interpolation.checkpoints.CheckpointInterpolation` as text (Figure 1's numbers)."""
    ood = ", ".join(result.ood_sets) or "none"
    gaps = ", ".join(f"{n} {g:.4f}" for n, g in (result.linearity_gap or {}).items())
    return _paths_text(result, f"{result.backbone}: {result.pretrained} ({result.pretrained_head} head) → "
                               f"{result.finetuned}; i.i.d. = {result.iid_set}, o.o.d. = mean of {ood}; "
                               f"accuracy (%) per α (share of the fine-tuned model)\n",
                       [f"{_GAP}: {gaps}\n"] if gaps else [], f"summary: {result.summary}")


def _csv(rows) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


#: The fixed columns of runs.csv before the grid's hyper-parameters, and after them.
RUNS_COLUMNS = ("dataset", "model", "label", "method", "test_domain", "seed", "dropout")
RUNS_TAIL = ("step", "iid_acc", "ood_acc", "status")


def _runs_csv(results: list[SelectedRun]) -> str:
    """One row per run at its selected step; every grid hyper-parameter (union over runs) is a column, blank
    where a run does not have it; accuracies are fractions."""
    grid_keys = sorted({k for r in results for k, _ in r.grid} - set(RUNS_COLUMNS) - set(RUNS_TAIL))
    rows = [[*RUNS_COLUMNS, *grid_keys, *RUNS_TAIL]]
    for r in sorted(results, key=lambda r: (r.dataset, r.label, r.test_domain, r.grid, r.seed)):
        grid = dict(r.grid)
        dropout = grid.get("dropout", r.dropout)
        rows.append([r.dataset, r.model, r.label, r.method, r.test_domain, r.seed, "" if dropout is None else dropout,
                     *("" if grid.get(k) is None else grid[k] for k in grid_keys), r.step, r.iid, r.ood, r.status])
    return _csv(rows)


def _table_csv(table: dict) -> str:
    rows = [["dataset", "label", "test_domain", "iid_acc_mean", "iid_acc_se", "ood_acc_mean", "ood_acc_se", "seeds"]]
    for (dataset, label), row in sorted(table.items()):
        for d, cell in row.items():
            rows.append([dataset, label, d, *cell["iid"], *cell["ood"], cell["n"]])
    return _csv(rows)


def _clouds_csv(points: dict) -> str:
    rows = [["dataset", "model", "label", "series", "iid_acc", "ood_acc", "exact"]]
    for (dataset, model, label), fp in sorted(points.items()):
        rows.extend([dataset, model, label, fp.role, x, y, fp.exact] for x, y in fp.points)
    return _csv(rows)


def _method_notes(selection: str, se: str) -> list[str]:
    rule = ("best i.i.d. step of each run, and per seed the grid point with the best i.i.d. accuracy "
            "(training-domain validation)" if selection == "iid" else
            "oracle: best o.o.d. step of each run, and per seed the grid point with the best o.o.d. accuracy")
    return [f"Selection: {rule}.", f"Ties: {TIE_RULES}.",
            f"Statistics: mean ± standard error over seeds, {SE_FORMULAS[se]}; the average column is the mean over "
            f"the dataset's held-out domains per seed, then mean ± SE over the seeds that have every domain"
            + (". DomainBed prints the average column as the mean of the per-domain means, without SE: the same "
               "mean when every domain has the same seeds." if se == "domainbed" else "."),
            UNITS_NOTE]


def _summary(results, table, points, record_paths, selection: str, se: str, files: list[str]) -> str:
    counts = defaultdict(lambda: defaultdict(int))
    for r in results:
        counts[(r.dataset, r.label)][r.status] += 1
    n_points = {(d, label): len(fp.points) for (d, _, label), fp in points.items()}
    ties = tie_counts(results, selection)
    lines = ["# linft report\n", f"Records: {', '.join(map(str, record_paths))}.\n",
             *(f"{note}\n" for note in _method_notes(selection, se)),
             table_markdown(table, "ood", se), table_markdown(table, "iid", se), "**Runs**\n",
             "| dataset | method | ok | diverged | unfinished | cloud points | ties at the best score |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(counts):
        c = counts[key]
        tied, groups = ties.get(key, (0, 0))
        lines.append(f"| {key[0]} | {key[1]} | {c['ok']} | {c['diverged']} | {c['unfinished']} | "
                     f"{n_points.get(key, 0)} | {tied} of {groups} |")
    for (dataset, label), domains in sorted(missing_domains(results).items()):
        lines.append(f"\n{label} on {dataset}: no usable run for held-out {', '.join(domains)}; "
                     f"its average and cloud are left out.")
    diverged = [r for r in results if r.status == "diverged"]
    if diverged:
        lines.append("\nDiverged runs (not averaged in): " + "; ".join(
            f"{r.label} {r.test_domain} seed {r.seed} {dict(r.grid)}" for r in diverged[:20]))
    lines.append("\nFiles: " + ", ".join(files))
    return "\n".join(lines) + "\n"


#: The figures a report can draw, in the order summary.md shows them: file name -> caption. Each is drawn only when
#: its records are there (its data, a pure function of the selected runs, is not empty).
FIGURES = {
    "clouds": "Figure 2: i.i.d. vs o.o.d. accuracy of every series (● baseline, ◆ dropout, ▲ ensembles, "
              "★ weight averages; single large points: across runs)",
    "figure6": "Figure 6: as Figure 2 with a larger last-layer learning rate",
    "figure7": "Figure 7: ensembles and weight averages of models fine-tuned with dropout",
    "figure8": "Figure 8: linear fine-tuning vs full fine-tuning vs linear probing",
    "figure10": "Figure 10: stochastic depth (residual-block dropout) vs dropout",
    "figure9": "Figure 9: naive (●) vs advanced (◆) fine-tuning of several pretrained models",
    "dropout": "Figure 3: average accuracy against the dropout rate",
    "figure4": "Figure 4: DomainNet, average accuracy against the dropout rate",
    "figure5": "Figure 5: from scratch, average accuracy against the dropout rate",
    "interpolation": "Figure 1 (per α): accuracy along the interpolation paths",
}


def report_figures(results: list[SelectedRun], curves: list[SelectedRun], points: dict, selection: str = "iid",
                   se: str = "sample") -> dict:
    """``{name: matplotlib Figure}`` of every figure of :data:`FIGURES` with something to draw, none saved.
    ``points``: :func:`figure2_points` of ``results``; ``curves``: the interpolation results."""
    clouds = {"figure6": ("Figure 6", figure6_points), "figure7": ("Figure 7", figure7_points),
              "figure8": ("Figure 8", figure8_points), "figure10": ("Figure 10", figure10_points)}
    rates = {"dropout": ("", figure3_points), "figure4": ("Figure 4", figure4_points),
             "figure5": ("Figure 5", figure5_points)}
    drawn = {"clouds": clouds_figure(points), "figure9": figure9_figure(figure9_points(results, fig2=points)),
             "interpolation": interpolation_figure(curves) if curves else None}
    drawn.update({name: clouds_figure(f(results, fig2=points), title) for name, (title, f) in clouds.items()})
    drawn.update({name: dropout_figure(f(results, selection, se), title) for name, (title, f) in rates.items()})
    return {name: drawn[name] for name in FIGURES if drawn[name] is not None}


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` in pixels of a PNG file, from its header."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def _figures(results, curves, points, out: Path, selection: str, se: str) -> dict:
    """Every figure with something to draw, as ``{"<name>_png": path, "<name>_pdf": path}``."""
    paths = {}
    for name, fig in report_figures(results, curves, points, selection, se).items():
        png = save_figure(fig, out / f"{name}.png")
        paths[f"{name}_png"], paths[f"{name}_pdf"] = png, png.with_suffix(".pdf")
    return paths


def _figures_markdown(paths: dict) -> str:
    """summary.md's figures section: each figure embedded (a markdown viewer shows it), its caption and size."""
    lines = ["\n**Figures**\n", f"PNG at {DPI} dpi (a PDF of each beside it).\n"]
    for name, caption in FIGURES.items():
        png = paths.get(f"{name}_png")
        if png is not None:
            w, h = png_size(png)
            lines.append(f"{caption} ({png.name}, {w}×{h} px, {w / DPI:.1f}×{h / DPI:.1f} in)\n\n"
                         f"![{caption}]({png.name})\n")
    return "\n".join(lines) if len(lines) > 2 else ""


#: Every file a report may hold; a folder holding one of them holds a report (refused without ``force``).
REPORT_FILES = ("summary.md", "table.csv", "runs.csv", "clouds.csv",
                *(f"{name}.{ext}" for name in FIGURES for ext in ("png", "pdf")))


def _write_report(results: list[SelectedRun], record_paths, out: Path, selection: str, se: str,
                  notes: list[str] = (), findings_title: str = "What these records show") -> dict:
    """Write every file into ``out`` (a staging folder); return their paths."""
    curves = [r for r in results if is_interpolation(r)]
    results = [r for r in results if not is_interpolation(r)]
    table, points = domainbed_table(results, selection, se), figure2_points(results)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"runs": atomic_write_text(out / "runs.csv", _runs_csv(results)),
             "table": atomic_write_text(out / "table.csv", _table_csv(table)),
             "clouds_csv": atomic_write_text(out / "clouds.csv", _clouds_csv(points))}
    paths.update(_figures(results, curves, points, out, selection, se))
    summary = _summary(results, table, points, record_paths, selection, se, [p.name for p in paths.values()])
    summary += _figures_markdown(paths)
    if notes:  # the caller's notes, e.g. the demo's differences from the paper's protocol
        summary += "\n**Notes**\n\n" + "".join(f"- {note}\n" for note in notes)
    found = findings_text(results, selection, se)
    if found:  # last: the paper's claims, checked on these records
        summary += f"\n**{findings_title}**\n\n{FINDINGS_INTRO}\n\n" + "".join(f"- {line}\n" for line in found)
    paths["summary"] = atomic_write_text(out / "summary.md", summary)
    return paths


def existing_report(out_dir) -> list[str]:
    """The report files already in ``out_dir`` (none when it does not exist)."""
    out_dir = Path(out_dir)
    return [name for name in REPORT_FILES if (out_dir / name).exists()]


def _refuse_report(out: Path, force: bool) -> None:
    """Refuse ``out`` when it already holds a report, unless ``force``."""
    present = existing_report(out)
    if present and not force:
        raise LinftError(f"{out} already holds a report ({', '.join(present[:3])}); pass force=True to replace it or "
                         f"choose another out_dir", param="force")


def write_report(record_paths, out_dir, selection: str = "iid", se: str = "sample",
                 notes: list[str] | None = None, force: bool = False,
                 findings_title: str = "What these records show") -> dict:
    """Write the report of the records in ``record_paths`` (files or folders) into ``out_dir``; return the paths.

    ``selection``: ``iid`` or ``oracle``; ``se``: the standard-error convention (``sample``: ddof=1, linft's
    default; ``domainbed``: ddof=0, as DomainBed's tables). ``notes``: lines appended to ``summary.md`` under
    "Notes" (the demo states there how its protocol differs from the paper's). ``summary.md`` ends with the
    paper's claims checked on the records (:func:`~linft.analysis.findings.findings_text`) under the heading
    ``findings_title``.

    A folder that already holds a report is refused unless ``force``; then the new report replaces the old one
    whole (its files are written aside first and moved in once all are written; old report files the new one
    does not make are removed, other files are left alone).
    """
    check_se(se)
    out = Path(out_dir)
    check_output_apart(out, param="out_dir")
    _refuse_report(out, force)  # at once, before reading the records; again under the lock
    records = read_records(record_paths)
    if not records:
        raise LinftError(f"the run records in {', '.join(map(str, record_paths))} are empty; train something first")
    results = run_results(records, selection)
    with output_lock(out, folder=True):  # creates the folder
        _refuse_report(out, force)  # under the lock: a report another process wrote meanwhile is not replaced
        staging = out / f".report{PARTIAL_SUFFIX}"
        remove_path(staging)
        try:
            staged = _write_report(results, record_paths, staging, selection, se, notes or [], findings_title)
            new = {p.name for p in staged.values()}
            for name in existing_report(out):  # under the lock: what is there now
                if name not in new:
                    (out / name).unlink()
            paths = {}
            for key, path in staged.items():
                os.replace(path, out / path.name)
                paths[key] = out / path.name
        except (OSError, WriteError) as exc:
            reason = exc.reason if isinstance(exc, WriteError) else write_failure(exc)
            raise LinftError(f"cannot write the report to {out} ({reason}); free space or choose another out_dir "
                             f"(the previous report, if any, is unchanged)", param="out_dir") from None
        finally:
            remove_path(staging)
    return paths

"""Tables and plots from run records only (no model, no GPU): the analysis half of linft.

* :func:`run_results` selects one step per run (best i.i.d. by default);
* :func:`domainbed_table` is DomainBed's table: per seed the grid point with
  the best i.i.d. accuracy, then mean ± standard error over seeds, per held-out
  domain and on average;
* :func:`cloud_tables` and :func:`linft.protocol.cloud_points` give the
  paper's i.i.d.-vs-o.o.d. clouds (Figure 2), drawn by :func:`plot_clouds`;
* :func:`write_report` writes all of it as markdown, CSV and PNG.

Diverged runs are never averaged in: they are counted and listed.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linft.errors import LinftError
from linft.protocol import SELECTIONS, cloud_points, group_runs, iid_accuracy, mean_and_se, ood_accuracy
from linft.records import read_records

MARKERS = ("o", "D", "^", "*", "s", "v", "P", "X", "h", "<", ">")


@dataclass(frozen=True)
class RunResult:
    """One run at its selected step."""

    label: str
    method: str
    dataset: str
    test_domain: str
    seed: int
    grid: tuple
    step: int
    iid: float
    ood: float
    status: str  # ok, diverged, unfinished
    dropout: float | None
    source: str
    domains: tuple  # every domain of the dataset (training and held-out)


def run_results(records: list[dict], selection: str = "iid") -> list[RunResult]:
    """One :class:`RunResult` per run, at the step chosen by ``selection`` (``iid`` or ``oracle``)."""
    if selection not in SELECTIONS:
        raise LinftError(f"unknown selection '{selection}'; use one of {', '.join(SELECTIONS)}")
    select = SELECTIONS[selection]
    results = []
    sources: dict[tuple, set] = defaultdict(set)
    for run_records in group_runs(records).values():
        last = run_records[-1]
        status = last.get("status", "ok")
        if status == "ok" and not last.get("final"):
            status = "unfinished"
        usable = [r for r in run_records if r.get("status", "ok") == "ok"]
        chosen = select(usable) if usable else last
        key = (last["label"], last.get("dataset") or "")
        sources[key].add(last.get("cache_provenance") or last.get("source") or "")
        results.append(RunResult(
            label=last["label"], method=last.get("method", last["label"]), dataset=last.get("dataset") or "", test_domain=last["test_domain"],
            seed=int(last["seed"]), grid=tuple(sorted(last.get("grid", {}).items())), step=int(chosen["step"]),
            iid=iid_accuracy(chosen) if usable else float("nan"), ood=ood_accuracy(chosen) if usable else float("nan"),
            status=status, dropout=last.get("hparams", {}).get("dropout"), source=next(iter(sources[key])),
            domains=tuple(sorted(set(last["train_domains"]) | {last["test_domain"]})),
        ))
    mixed = [f"{label} on {ds}" for (label, ds), s in sources.items() if len(s) > 1]
    if mixed:
        raise LinftError(f"records of {', '.join(mixed)} come from different sources (feature "
                         f"caches, or datasets and backbone weights); report each source's records separately")
    return results


def _ok(results):
    return [r for r in results if r.status == "ok"]


def _expected_domains(results) -> dict[tuple, set]:
    out: dict[tuple, set] = defaultdict(set)
    for r in results:
        out[(r.dataset, r.label)].update(r.domains)
    return out


def missing_domains(results: list[RunResult]) -> dict[tuple, list[str]]:
    """Per (dataset, label), the held-out domains without any finished, non-diverged run."""
    have: dict[tuple, set] = defaultdict(set)
    for r in _ok(results):
        have[(r.dataset, r.label)].add(r.test_domain)
    return {k: sorted(v - have[k]) for k, v in _expected_domains(results).items() if v - have[k]}


def domainbed_table(results: list[RunResult], selection: str = "iid") -> dict:
    """``{(dataset, label): {test_domain | "average": {"iid": (mean, se), "ood": (mean, se), "n": seeds}}}``.

    Per seed and held-out domain one grid point is chosen: the best i.i.d.
    accuracy (training-domain validation), or with ``selection="oracle"`` the
    best o.o.d. accuracy; then mean ± SE over seeds. The average is taken per
    seed over *all* the dataset's domains, then over seeds; when a domain has
    no usable run the average is NaN (shown as —), never an average of the rest.
    """
    score = (lambda r: r.ood) if selection == "oracle" else (lambda r: r.iid)
    chosen: dict[tuple, dict[str, dict[int, RunResult]]] = defaultdict(lambda: defaultdict(dict))
    for r in _ok(results):
        cur = chosen[(r.dataset, r.label)][r.test_domain].get(r.seed)
        if cur is None or score(r) > score(cur) or (score(r) == score(cur) and r.grid < cur.grid):  # ties: first grid
            chosen[(r.dataset, r.label)][r.test_domain][r.seed] = r
    expected = _expected_domains(results)
    table = {}
    for key, per_domain in chosen.items():
        row = {}
        for d in sorted(per_domain):
            runs = list(per_domain[d].values())
            row[d] = {"iid": mean_and_se(r.iid for r in runs), "ood": mean_and_se(r.ood for r in runs), "n": len(runs)}
        domains = sorted(expected[key])
        seeds = sorted(set.intersection(*(set(per_domain.get(d, {})) for d in domains)))
        row["average"] = {
            "iid": mean_and_se(np.mean([per_domain[d][s].iid for d in domains]) for s in seeds),
            "ood": mean_and_se(np.mean([per_domain[d][s].ood for d in domains]) for s in seeds),
            "n": len(seeds),
        }
        table[key] = row
    return table


def cloud_tables(results: list[RunResult]) -> dict:
    """``{(dataset, label): {test_domain: {grid: (iid, ood)}}}``, seeds averaged; grid points with a
    diverged or unfinished seed are left out (they would bias the average), and so are methods
    missing a held-out domain (see :func:`missing_domains`): their cloud would mix other domains."""
    bad = {(r.dataset, r.label, r.test_domain, r.grid) for r in results if r.status != "ok"}
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in _ok(results):
        if (r.dataset, r.label, r.test_domain, r.grid) not in bad:
            acc[(r.dataset, r.label)][r.test_domain][r.grid].append((r.iid, r.ood))
    expected = _expected_domains(results)
    return {k: {d: {g: tuple(np.mean(v, axis=0)) for g, v in grids.items()} for d, grids in per.items()}
            for k, per in acc.items() if set(per) == expected[k]}


def table_rows(table: dict) -> list[dict]:
    """The :func:`domainbed_table` as a list of plain rows (for ``--json``)."""
    return [{"dataset": k[0], "label": k[1], "test_domain": d, "iid": cell["iid"], "ood": cell["ood"], "seeds": cell["n"]}
            for k, row in sorted(table.items()) for d, cell in row.items()]


def _fmt(ms) -> str:
    m, se = ms
    return "—" if math.isnan(m) else f"{100 * m:.1f} ± {100 * se:.1f}"


def table_markdown(table: dict, metric: str) -> str:
    """One markdown table per dataset: rows = method labels, columns = held-out domains and average."""
    out = []
    for dataset in sorted({k[0] for k in table}):
        keys = sorted(k for k in table if k[0] == dataset)
        domains = sorted({d for k in keys for d in table[k] if d != "average"})
        out.append(f"**{dataset or 'dataset'}: {metric} accuracy (%), mean ± SE over seeds**\n")
        out.append("| method | " + " | ".join(domains) + " | average |")
        out.append("|---" * (len(domains) + 2) + "|")
        for k in keys:
            cells = [_fmt(table[k][d][metric]) if d in table[k] else "—" for d in domains + ["average"]]
            out.append(f"| {k[1]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot_clouds(clouds: dict, path: Path) -> Path:
    """i.i.d.-vs-o.o.d. clouds with convex hulls, one panel per dataset, one marker per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.spatial import ConvexHull, QhullError

    datasets = sorted({k[0] for k in clouds})
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5 * max(1, len(datasets)), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        labels = sorted(k[1] for k in clouds if k[0] == dataset)
        for i, label in enumerate(labels):
            pts, exact = cloud_points(clouds[(dataset, label)])
            color = f"C{i % 10}"
            ax.scatter(pts[:, 0], pts[:, 1], s=12, marker=MARKERS[i % len(MARKERS)], color=color, alpha=0.5,
                       label=f"{label} ({len(pts)}{'' if exact else ' sampled'})")
            if len(pts) >= 3:
                try:
                    hull = ConvexHull(pts)
                    ring = np.append(hull.vertices, hull.vertices[0])
                    ax.plot(pts[ring, 0], pts[ring, 1], color=color, lw=1)
                except QhullError:  # collinear points: no hull to draw
                    pass
        ax.set_title(dataset or "dataset")
        ax.set_xlabel("iid acc")
        ax.set_ylabel("ood acc")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dropout(results: list[RunResult], path: Path, selection: str = "iid") -> Path | None:
    """Average o.o.d. and i.i.d. accuracy (the table's average column: grid point selected per seed,
    mean ± SE over seeds) against the dropout rate, for each method with several rates."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.dropout is not None:
            by_method[(r.dataset, r.method)][r.dropout].append(r)
    by_method = {k: v for k, v in by_method.items() if len(v) >= 2}
    if not by_method:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for i, ((dataset, method), per_rate) in enumerate(sorted(by_method.items())):
        rates = sorted(per_rate)
        cells = [next(iter(domainbed_table(per_rate[p], selection).values()), {}).get("average") for p in rates]
        for ax, metric in zip(axes, ("ood", "iid")):
            pts = [(p, c[metric]) for p, c in zip(rates, cells) if c is not None and not np.isnan(c[metric][0])]
            if not pts:
                continue
            ax.errorbar([p for p, _ in pts], [100 * m for _, (m, _) in pts], yerr=[100 * se for _, (_, se) in pts],
                        marker="o", color=f"C{i}", label=f"{dataset} {method}", capsize=3)
            ax.set_xlabel("dropout rate")
            ax.set_ylabel(f"{metric} acc (%), average over held-out domains")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


INTERPOLATION_STYLES = {  # method -> (line style, marker, line width)
    "interpolation-weights": ("-", "o", 2.0),
    "interpolation-representation": ("-", "s", 2.0),
    "interpolation-linearized": (":", "^", 1.6),
    "interpolation-representation-block": ("--", ".", 1.0),
}


def plot_interpolation(results: list[RunResult], path: Path, title: str | None = None) -> Path | None:
    """The paper's Figure 1: accuracy against α for every interpolation path, one axes per split.

    ``results`` are :class:`RunResult` of records written by
    :func:`linft.interpolate.interpolate` (methods ``interpolation-*``,
    ``grid = {"alpha": α}``); other methods are ignored. Per dataset, two
    axes (i.i.d. and o.o.d. accuracy), one curve per label, averaged over
    the runs (held-out domains, seeds, fine-tuned runs) that share it; the
    endpoints α = 0 (pretrained with its probe head) and α = 1 (fine-tuned)
    of the weight and representation paths are marked. Returns None when
    there is nothing to draw.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict = defaultdict(lambda: defaultdict(list))
    methods = {}
    for r in results:
        grid = dict(r.grid)
        if not r.method.startswith("interpolation-") or "alpha" not in grid or r.status != "ok":
            continue
        curves[(r.dataset, r.label)][float(grid["alpha"])].append((r.iid, r.ood))
        methods[(r.dataset, r.label)] = r.method
    if not curves:
        return None
    datasets = sorted({k[0] for k in curves})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
    order = list(INTERPOLATION_STYLES)
    for row, dataset in zip(axes, datasets):
        keys = sorted((k for k in curves if k[0] == dataset),
                      key=lambda k: (order.index(methods[k]) if methods[k] in order else len(order), k[1]))
        suffixes = {k[1][k[1].rfind(" ["):] if k[1].endswith("]") and " [" in k[1] else "" for k in keys}
        common = suffixes.pop() if len(suffixes) == 1 else ""  # one fine-tuned label: said once, in the title
        for j, (ax, metric) in enumerate(zip(row, ("iid", "ood"))):
            ends = []
            for i, key in enumerate(keys):
                alphas = sorted(curves[key])
                ys = [100 * float(np.mean([v[j] for v in curves[key][a]])) for a in alphas]
                ls, marker, lw = INTERPOLATION_STYLES.get(methods[key], ("-", "o", 1.5))
                color = f"C{i % 10}"
                ax.plot(alphas, ys, linestyle=ls, marker=marker, lw=lw, ms=4 if lw < 2 else 5, color=color,
                        label=key[1][:len(key[1]) - len(common)])
                if methods[key] in ("interpolation-weights", "interpolation-representation"):
                    for a, y in zip(alphas, ys):
                        if a in (0.0, 1.0):
                            ax.scatter([a], [y], s=110, marker="*" if a == 1.0 else "D", color=color,
                                       edgecolor="black", zorder=5)
                            ends.append((a, y))
            for a, text in ((0.0, "pretrained\n(probe head)"), (1.0, "fine-tuned")):
                ys = [y for x, y in ends if x == a]
                if ys:
                    ax.annotate(text, (a, max(ys)), textcoords="offset points", xytext=(0, 10), fontsize=8,
                                ha="left" if a == 0.0 else "right")
            ax.set_xlabel("α: share of the fine-tuned model (0 = pretrained, 1 = fine-tuned)")
            ax.set_ylabel(("i.i.d." if metric == "iid" else "o.o.d.") + " accuracy (%)")
            heading = title or f"{dataset or 'dataset'}{' ' + common.strip() if common else ''}"
            ax.set_title(f"{heading}\n{'i.i.d.' if metric == 'iid' else 'o.o.d.'} split", fontsize=9)
            ax.set_xlim(-0.05, 1.05)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(record_paths, out_dir, selection: str = "iid") -> dict:
    """Write ``summary.md``, ``table.csv``, ``runs.csv``, ``clouds.csv``, ``clouds.png`` and
    ``dropout.png`` (when several dropout rates exist) into ``out_dir``; return their paths."""
    records = read_records(record_paths)
    if not records:
        raise LinftError(f"the run records in {', '.join(map(str, record_paths))} are empty; train something first")
    results = run_results(records, selection)
    try:
        return _write_report(results, record_paths, Path(out_dir), selection)
    except OSError as exc:
        raise LinftError(f"cannot write the report to {out_dir} ({exc.strerror or exc}); choose another --out") from None


def is_interpolation(result: RunResult) -> bool:
    """Interpolation records are curves over α (drawn by :func:`plot_interpolation`), not methods with a grid."""
    return result.method.startswith("interpolation-")


def _write_report(results, record_paths, out: Path, selection: str) -> dict:
    curves = [r for r in results if is_interpolation(r)]
    results = [r for r in results if not is_interpolation(r)]
    table = domainbed_table(results, selection)
    clouds = cloud_tables(results)
    missing = missing_domains(results)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "label", "test_domain", "seed", "grid", "step", "iid", "ood", "status"])
        for r in sorted(results, key=lambda r: (r.dataset, r.label, r.test_domain, r.grid, r.seed)):
            w.writerow([r.dataset, r.label, r.test_domain, r.seed, dict(r.grid), r.step, r.iid, r.ood, r.status])
    paths["runs"] = out / "runs.csv"
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "label", "test_domain", "iid_mean", "iid_se", "ood_mean", "ood_se", "seeds"])
        for (dataset, label), row in sorted(table.items()):
            for d, cell in row.items():
                w.writerow([dataset, label, d, *cell["iid"], *cell["ood"], cell["n"]])
    paths["table"] = out / "table.csv"
    with open(out / "clouds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "label", "iid", "ood", "exact"])
        for (dataset, label), tab in sorted(clouds.items()):
            pts, exact = cloud_points(tab)
            for x, y in pts:
                w.writerow([dataset, label, x, y, exact])
    paths["clouds_csv"] = out / "clouds.csv"
    if clouds:
        paths["clouds_png"] = plot_clouds(clouds, out / "clouds.png")
    dropout_png = plot_dropout(results, out / "dropout.png", selection)
    if dropout_png:
        paths["dropout_png"] = dropout_png
    if curves:
        interpolation_png = plot_interpolation(curves, out / "interpolation.png")
        if interpolation_png:
            paths["interpolation_png"] = interpolation_png

    counts = defaultdict(lambda: defaultdict(int))
    for r in results:
        counts[(r.dataset, r.label)][r.status] += 1
    rule = ("best i.i.d. step of each run, and per seed the grid point with the best i.i.d. accuracy "
            "(training-domain validation)" if selection == "iid" else
            "oracle: best o.o.d. step of each run, and per seed the grid point with the best o.o.d. accuracy")
    lines = [f"# linft report\n", f"Selection: {rule}. Records: {', '.join(map(str, record_paths))}.\n",
             table_markdown(table, "ood"), table_markdown(table, "iid"), "**Runs**\n",
             "| dataset | method | ok | diverged | unfinished | cloud points |", "|---|---|---|---|---|---|"]
    for key in sorted(counts):
        c = counts[key]
        n_cloud = len(cloud_points(clouds[key])[0]) if key in clouds else 0
        lines.append(f"| {key[0]} | {key[1]} | {c['ok']} | {c['diverged']} | {c['unfinished']} | {n_cloud} |")
    for (dataset, label), domains in sorted(missing.items()):
        lines.append(f"\n{label} on {dataset}: no usable run for held-out {', '.join(domains)}; "
                     f"its average and cloud are left out.")
    diverged = [r for r in results if r.status == "diverged"]
    if diverged:
        lines.append("\nDiverged runs (not averaged in): " + "; ".join(
            f"{r.label} {r.test_domain} seed {r.seed} {dict(r.grid)}" for r in diverged[:20]))
    lines.append("\nFiles: " + ", ".join(p.name for p in paths.values()))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    paths["summary"] = out / "summary.md"
    return paths

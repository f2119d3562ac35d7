"""Figures from selected runs: the paper's i.i.d.-vs-o.o.d. clouds, accuracy against the dropout rate, and
Figure 1 (accuracy along the interpolation paths).

Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot, so
importing linft never changes the caller's matplotlib backend or state).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.spatial import ConvexHull, QhullError

from linft.analysis.aggregate import SelectedRun, cloud_points, domainbed_table

MARKERS = ("o", "D", "^", "*", "s", "v", "P", "X", "h", "<", ">")


def _subplots(rows: int, cols: int, figsize, squeeze: bool = True):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def plot_clouds(clouds: dict, path: Path) -> Path:
    """i.i.d.-vs-o.o.d. clouds with convex hulls, one panel per dataset, one marker per method."""
    datasets = sorted({k[0] for k in clouds})
    fig, axes = _subplots(1, max(1, len(datasets)), figsize=(5 * max(1, len(datasets)), 4.2), squeeze=False)
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
    return path


def plot_dropout(results: list[SelectedRun], path: Path, selection: str = "iid") -> Path | None:
    """Average o.o.d. and i.i.d. accuracy (the table's average column: grid point selected per seed,
    mean ± SE over seeds) against the dropout rate, for each method with several rates."""
    by_method = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.dropout is not None:
            by_method[(r.dataset, r.method)][r.dropout].append(r)
    by_method = {k: v for k, v in by_method.items() if len(v) >= 2}
    if not by_method:
        return None
    fig, axes = _subplots(1, 2, figsize=(9, 3.8))
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
    return path


INTERPOLATION_STYLES = {  # method -> (line style, marker, line width)
    "interpolation-weights": ("-", "o", 2.0),
    "interpolation-representation": ("-", "s", 2.0),
    "interpolation-linearized": (":", "^", 1.6),
    "interpolation-representation-block": ("--", ".", 1.0),
}


def plot_interpolation(results: list[SelectedRun], path: Path, title: str | None = None) -> Path | None:
    """The paper's Figure 1: accuracy against α for every interpolation path, one axes per split.

    ``results`` are :class:`SelectedRun` of records written by
    :func:`linft.analysis.interpolate.interpolate` (methods ``interpolation-*``,
    ``grid = {"alpha": α}``); other methods are ignored. Per dataset, two
    axes (i.i.d. and o.o.d. accuracy), one curve per label, averaged over
    the runs (held-out domains, seeds, fine-tuned runs) that share it; the
    endpoints α = 0 (pretrained with its probe head) and α = 1 (fine-tuned)
    of the weight and representation paths are marked. Returns None when
    there is nothing to draw.
    """
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
    fig, axes = _subplots(len(datasets), 2, figsize=(11, 4.2 * len(datasets)), squeeze=False)
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
    return path



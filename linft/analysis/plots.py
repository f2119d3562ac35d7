"""Figures of a report: the paper's Figure 2 (i.i.d.-vs-o.o.d. clouds), Figure 9 (two pretrained models),
accuracy against the dropout rate, and Figure 1 (accuracy along the interpolation paths).

The data each figure draws comes from the pure functions of :mod:`linft.analysis.figures`
(fractions); every axis shows accuracy in percent. Each figure is written as PNG
and as PDF (vector, for papers) next to it, atomically (:func:`save_figure`).
Figures are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot, so
importing linft never changes the caller's matplotlib backend or state).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from scipy.spatial import ConvexHull, QhullError

from linft.analysis.aggregate import SelectedRun
from linft.analysis.figures import FigurePoints
from linft.output import atomic_write

MARKERS = ("o", "D", "^", "*", "s", "v", "P", "X", "h", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
#: Figure 2's colours, close to the paper's: navy baseline, blue dropout, teal ensembles, sage weight averages
#: (a role with several labels in one panel gets the colour cycle instead).
ROLE_COLORS = {"baseline": "#1b2a47", "dropout": "#3b7dbf", "trajectory ensemble": "#3f6b73", "ensemble": "#3f6b73",
               "trajectory average": "#8fb09a", "soup": "#8fb09a", "greedy soup": "#b08a5a"}


def _subplots(rows: int, cols: int, figsize, squeeze: bool = True):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def figure_files(path: Path) -> list[Path]:
    """The files :func:`save_figure` writes for ``path``: the PNG and the PDF beside it."""
    path = Path(path)
    return [path, path.with_suffix(".pdf")]


#: Every figure is written at this resolution (PNG); its size in inches is set per figure below.
DPI = 150
#: Inches of one cloud panel (Figures 2, 6, 7, 9, 10; the legend beside it is inside this width).
CLOUD_PANEL = (9.0, 4.6)
#: Inches of one row of the dropout-rate figures (Figures 3, 4, 5): o.o.d. and i.i.d. side by side, per dataset.
DROPOUT_ROW = (10.0, 3.6)
#: Inches of one row of the interpolation figure (i.i.d. and o.o.d. against α), and of Figure 1's one panel.
INTERPOLATION_ROW = (11.0, 4.2)
FIGURE1_SIZE = (6.0, 5.0)


def layout(fig: Figure) -> Figure:
    """Space the panels (:meth:`Figure.tight_layout`) as :func:`save_figure` does before writing; its "not applied"
    warning (very many legend entries) is not shown: the saved page grows to hold everything drawn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG (:data:`DPI`) at ``path`` and as PDF (vector) beside it, each atomically; return ``path``.

    The saved page grows to hold everything drawn (``bbox_inches="tight"``: legends beside or below the axes).
    """
    layout(fig)
    png, pdf = figure_files(path)
    atomic_write(png, lambda fh: fig.savefig(fh, format="png", dpi=DPI, bbox_inches="tight"))
    atomic_write(pdf, lambda fh: fig.savefig(fh, format="pdf", bbox_inches="tight", metadata={"CreationDate": None}))
    return png


def legend_below(fig: Figure, axes, **kw) -> None:
    """One legend for the whole figure, centred below every panel (never over data, labels or titles): the
    labelled handles of ``axes``, each label once."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        layout(fig)  # the panels placed first: the legend goes under them
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False,
                   ncol=min(len(handles), kw.pop("ncol", 2)), **kw)


def _label_axes(ax, title: str) -> None:
    """Titles, percent axis labels, and a legend beside the axes (never over the points), markers of one size."""
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("i.i.d. accuracy (%)")
    ax.set_ylabel("o.o.d. accuracy (%)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if not handles:  # nothing labelled: no legend (and no matplotlib warning)
        return
    legend = ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                       ncol=1 + (len(handles) - 1) // 18)
    for handle in legend.legend_handles:
        handle.set_sizes([36])
        handle.set_alpha(1.0)


def _draw_points(ax, fp: FigurePoints, color, label: str) -> None:
    """One series in percent: a cloud (small translucent markers and its convex hull) or one large point."""
    pts = 100 * fp.points
    if fp.single:
        ax.scatter(pts[:, 0], pts[:, 1], s=170, marker=fp.marker, color=color, edgecolor="black", linewidths=1.2,
                   zorder=5, label=f"{label} (1 point)" if len(pts) == 1 else f"{label} ({len(pts)})")
        return
    few = len(pts) < 50  # a cloud of a few points (a small grid): larger and opaque, or it is not seen
    ax.scatter(pts[:, 0], pts[:, 1], s=40 if few else 14, marker=fp.marker, color=color, alpha=0.85 if few else 0.45,
               linewidths=0, label=f"{label} ({len(pts)}{'' if fp.exact else ' sampled'})")
    if len(pts) >= 3:
        try:
            hull = ConvexHull(pts)
            ring = np.append(hull.vertices, hull.vertices[0])
            ax.plot(pts[ring, 0], pts[ring, 1], color=color, lw=1)
        except QhullError:  # collinear points: no hull to draw
            pass


def _saved(fig: Figure | None, path: Path) -> Path | None:
    return None if fig is None else save_figure(fig, path)


def plot_clouds(points: dict, path: Path, title: str = "") -> Path | None:
    """:func:`clouds_figure` saved at ``path`` (PNG) and beside it (PDF); None when there is nothing to draw."""
    return _saved(clouds_figure(points, title), path)


def clouds_figure(points: dict, title: str = "") -> Figure | None:
    """The paper's Figure 2 from :func:`~linft.analysis.figures.figure2_points`: one panel per dataset and model
    (models side by side), one colour per label, the paper's marker per series (● baseline, ◆ dropout,
    ▲ ensembles, ★ weight averages; the across-run ensemble and soups as single large points with a black edge),
    legends beside the panels. Figures 6, 7 and 10 are drawn by it too, ``title`` heading each panel.
    None when there is nothing to draw."""
    if not points:
        return None
    panels = sorted({k[:2] for k in points})
    datasets = sorted({d for d, _ in panels})
    cols = max(sum(1 for d, _ in panels if d == ds) for ds in datasets)
    fig, axes = _subplots(len(datasets), cols, figsize=(CLOUD_PANEL[0] * cols, CLOUD_PANEL[1] * len(datasets)),
                          squeeze=False)
    for row, dataset in zip(axes, datasets):
        models = [m for d, m in panels if d == dataset]
        for ax in row[len(models):]:
            ax.set_axis_off()
        for ax, model in zip(row, models):
            keys = sorted((k for k in points if k[:2] == (dataset, model)), key=lambda k: (points[k].single, k[2]))
            shared = {role for role in ROLE_COLORS if sum(points[k].role == role for k in keys) > 1}
            for i, key in enumerate(keys):
                role = points[key].role
                color = f"C{i % 10}" if role in shared or role not in ROLE_COLORS else ROLE_COLORS[role]
                _draw_points(ax, points[key], color, key[2].removeprefix(f"{model}: "))
            heading = (f"{title}: " if title else "") + f"{dataset or 'dataset'}"
            _label_axes(ax, heading + (f"\n{model}" if model else ""))
    return fig


def _shade(color: str, j: int, n: int):
    """The j-th of n shades of ``color`` (the first is the colour itself, later ones lighter)."""
    rgb = np.array(to_rgb(color))
    return tuple(rgb + (1 - rgb) * (0.35 * j / max(1, n - 1) if n > 1 else 0.0))


def plot_figure9(points: dict, path: Path) -> Path | None:
    """:func:`figure9_figure` saved at ``path`` (PNG) and beside it (PDF); None when there is nothing to draw."""
    return _saved(figure9_figure(points), path)


def figure9_figure(points: dict) -> Figure | None:
    """The paper's Figure 9 from :func:`~linft.analysis.figures.figure9_points`: one panel per dataset, one colour
    per pretrained model, ● naive and ◆ advanced fine-tuning. None when there is nothing to draw."""
    if not points:
        return None
    datasets = sorted({k[0] for k in points})
    fig, axes = _subplots(1, len(datasets), figsize=(CLOUD_PANEL[0] * len(datasets), CLOUD_PANEL[1]), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        models = sorted({k[1] for k in points if k[0] == dataset})
        for i, model in enumerate(models):
            keys = sorted((k for k in points if k[:2] == (dataset, model)),
                          key=lambda k: (points[k].role != "naive", k[2]))
            for j, key in enumerate(keys):
                fp = points[key]
                _draw_points(ax, fp, _shade(f"C{i % 10}", j, len(keys)), f"{model}: {fp.role}, {key[2]}")
        _label_axes(ax, f"{dataset or 'dataset'}: naive vs advanced fine-tuning per pretrained model")
    return fig


def plot_dropout(points: dict, path: Path, title: str = "") -> Path | None:
    """:func:`dropout_figure` saved at ``path`` (PNG) and beside it (PDF); None when there is nothing to draw."""
    return _saved(dropout_figure(points, title), path)


def dropout_figure(points: dict, title: str = "") -> Figure | None:
    """Average o.o.d. and i.i.d. accuracy (%) (the table's average column, mean ± SE over seeds) against the
    dropout rate, from :func:`~linft.analysis.figures.dropout_points`: one row per dataset (o.o.d. left, i.i.d.
    right), one marker and line style per series, the legend below. Figures 3, 4 and 5 are drawn by it, ``title``
    heading each row. None when there is nothing to draw (no series with two rates or more)."""
    if not points:
        return None
    datasets = sorted({k[0] for k in points})
    fig, axes = _subplots(len(datasets), 2, figsize=(DROPOUT_ROW[0], DROPOUT_ROW[1] * len(datasets)), squeeze=False)
    for i, (key, rows) in enumerate(sorted(points.items())):
        dataset, model, method, variant = key
        multi_model = len({k[1] for k in points if k[0] == dataset}) > 1
        name = f"{variant} ({method})" + (f" [{model}]" if multi_model and model else "")
        for ax, metric in zip(axes[datasets.index(dataset)], ("ood", "iid")):
            ax.errorbar(rows["rates"], [100 * m for m, _ in rows[metric]], yerr=[100 * e for _, e in rows[metric]],
                        marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)], ms=7,
                        mfc="none", mew=1.5, color=f"C{i % 10}", label=name, capsize=3, alpha=0.85)
    for row, dataset in zip(axes, datasets):
        for ax, metric in zip(row, ("o.o.d.", "i.i.d.")):
            ax.set_title((f"{title}: " if title else "") + f"{dataset or 'dataset'}, {metric}", fontsize=9)
            ax.set_xlabel("dropout rate")
            ax.set_ylabel(f"{metric} accuracy (%)\n(average of held-out domains)", fontsize=9)
            ax.grid(alpha=0.3)
    legend_below(fig, axes.ravel(), title="mean ± SE over seeds", title_fontsize=8)
    return fig


INTERPOLATION_STYLES = {  # method -> (line style, marker, line width)
    "interpolation-weights": ("-", "o", 2.0),
    "interpolation-representation": ("-", "s", 2.0),
    "interpolation-linearized": (":", "^", 1.6),
    "interpolation-representation-block": ("--", ".", 1.0),
}


def plot_interpolation(results: list[SelectedRun], path: Path, title: str | None = None) -> Path | None:
    """:func:`interpolation_figure` saved at ``path`` (PNG) and beside it (PDF); None when there is nothing to
    draw."""
    return _saved(interpolation_figure(results, title), path)


def interpolation_figure(results: list[SelectedRun], title: str | None = None) -> Figure | None:
    """The paper's Figure 1: accuracy (%) against α for every interpolation path, one axes per split.

    ``results`` are :class:`SelectedRun` of records written by
    :func:`linft.interpolation.run.interpolate` (methods ``interpolation-*``,
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
    fig, axes = _subplots(len(datasets), 2, figsize=(INTERPOLATION_ROW[0], INTERPOLATION_ROW[1] * len(datasets)),
                          squeeze=False)
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
            for a, marker, text in ((0.0, "D", "α = 0: pretrained (probe head)"), (1.0, "*", "α = 1: fine-tuned")):
                if any(x == a for x, _ in ends):  # said in the legend, never written over the curves or titles
                    ax.scatter([], [], s=110, marker=marker, color="white", edgecolor="black", label=text)
            ax.set_xlabel("α: share of the fine-tuned model (0 = pretrained, 1 = fine-tuned)")
            ax.set_ylabel(("i.i.d." if metric == "iid" else "o.o.d.") + " accuracy (%)")
            heading = title or f"{dataset or 'dataset'}{' ' + common.strip() if common else ''}"
            ax.set_title(f"{heading}\n{'i.i.d.' if metric == 'iid' else 'o.o.d.'} split", fontsize=9)
            ax.set_xlim(-0.05, 1.05)
            ax.grid(alpha=0.3)
    legend_below(fig, axes.ravel())
    return fig


#: Figure 1's paths: (line style, marker, colour); the paper draws weights dashed, representations solid.
FIGURE1_STYLES = {"weights": ("--", "o", "C3"), "representation": ("-", "s", "C0"), "linearized": (":", "^", "C2")}


def plot_figure1(curves: dict, path: Path, title: str | None = None) -> Path | None:
    """:func:`figure1_figure` saved at ``path`` (PNG) and beside it (PDF)."""
    return _saved(figure1_figure(curves, title), path)


def figure1_figure(curves: dict, title: str | None = None) -> Figure | None:
    """The paper's Figure 1: mean o.o.d. accuracy (%) against i.i.d. accuracy (%) along each interpolation path.

    ``curves[path] = [{"alpha", "iid", "ood"}, ...]`` (:func:`linft.interpolation.checkpoints.
    interpolate_checkpoints`); α runs along each curve, the pretrained end (α = 0) marked ◆, the fine-tuned
    end (α = 1) ★. None when no curve has an o.o.d. accuracy.
    """
    drawn = {k: [p for p in v if p.get("ood") is not None] for k, v in curves.items()}
    if not any(drawn.values()):
        return None
    fig, ax = _subplots(1, 1, figsize=FIGURE1_SIZE)
    for key, points in drawn.items():
        ls, marker, color = FIGURE1_STYLES.get(key, ("-", "o", "C7"))
        xs, ys = [100 * p["iid"] for p in points], [100 * p["ood"] for p in points]
        ax.plot(xs, ys, linestyle=ls, marker=marker, ms=4, color=color, label=f"{key} interpolation")
        for p, x, y in zip(points, xs, ys):
            if p["alpha"] in (0.0, 1.0):
                ax.scatter([x], [y], s=120, marker="D" if p["alpha"] == 0.0 else "*", color=color,
                           edgecolor="black", zorder=5)
    ax.set_xlabel("i.i.d. accuracy (%)")
    ax.set_ylabel("mean o.o.d. accuracy (%)")
    ax.set_title((title + "\n" if title else "") + "◆ pretrained (α = 0), ★ fine-tuned (α = 1)", fontsize=9)
    ax.grid(alpha=0.3)
    legend_below(fig, [ax], ncol=1)
    return fig

"""What the paper's figures draw, as data: pure functions of selected runs, tested without drawing anything.

* :func:`figure_role` — which of the paper's Figure 2 series a label belongs to
  (baseline, dropout, trajectory ensemble or average, across-run ensemble,
  uniform soup, greedy soup), from its method and dropout rate;
* :func:`figure2_points` — per dataset, model and label, the points of
  Figure 2: a cloud (every choice of one grid point per held-out domain, seeds
  averaged) for runs with a grid, and one point for the across-run ensemble
  and soups (average over seeds, then over held-out domains);
* :func:`figure9_points` — Figure 9: the same clouds for datasets whose records
  come from several pretrained models, split into naive and advanced fine-tuning;
* :func:`dropout_points` — the average o.o.d. and i.i.d. accuracy (the table's
  average column) against the dropout rate.

Accuracies are fractions in [0, 1]; the plots (:mod:`linft.analysis.plots`) draw them in percent.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from linft.analysis.aggregate import SelectedRun, cloud_points, cloud_tables, domainbed_table
from linft.protocol.records import DERIVED

#: Figure 2's series: role -> (marker, drawn as one point). The paper's markers: baseline ● (o), very large
#: dropout ◆ (D), ensembles ▲ (^), weight averages ★ (*); the across-run ensemble and soup are single ▲ and ☆
#: drawn large with a black edge. The greedy soup is not in the paper: a single P (plus).
ROLE_STYLES = {
    "baseline": ("o", False),
    "dropout": ("D", False),
    "trajectory ensemble": ("^", False),
    "trajectory average": ("*", False),
    "ensemble": ("^", True),
    "soup": ("*", True),
    "greedy soup": ("P", True),
}
ROLE_OF_KIND = {"trajectory-ensemble": "trajectory ensemble", "trajectory-average": "trajectory average",
                "ensemble": "ensemble", "soup": "soup", "greedy-soup": "greedy soup"}
#: Figure 9's series: naive fine-tuning ● and advanced fine-tuning ◆.
FIGURE9_STYLES = {"naive": "o", "advanced": "D"}


@dataclass(frozen=True)
class FigurePoints:
    """The points of one label in a figure: (M, 2) ``[iid, ood]`` fractions, and how to draw them."""

    role: str
    marker: str
    single: bool
    points: np.ndarray
    exact: bool


def derived_kind(method: str) -> str | None:
    """The :data:`~linft.protocol.records.DERIVED` kind of a method (``finetune-soup`` -> ``soup``), or None."""
    for kind in sorted(DERIVED, key=len, reverse=True):  # trajectory-ensemble before ensemble
        if method.endswith("-" + kind):
            return kind
    return None


def figure_role(method: str, dropout) -> str:
    """The Figure 2 series of a run: its derived kind, else ``dropout`` (a dropout rate above 0) or ``baseline``."""
    kind = derived_kind(method)
    if kind is not None:
        return ROLE_OF_KIND[kind]
    return "dropout" if dropout else "baseline"


def _label_info(results: list[SelectedRun]) -> dict[tuple, SelectedRun]:
    """One result per (dataset, label): what the label's runs share (model, method, dropout rate)."""
    return {(r.dataset, r.label): r for r in results}


def figure2_points(results: list[SelectedRun]) -> dict[tuple, FigurePoints]:
    """``{(dataset, model, label): FigurePoints}``: what Figure 2 draws for every label with a complete cloud.

    Runs with a grid give the cloud of :func:`~linft.analysis.aggregate.cloud_points` (per held-out domain and
    grid point the seeds averaged; every choice of one grid point per domain is one point). The across-run
    ensemble and soups (records with ``grid = {}``, one per held-out domain and seed) give one point: the
    average over seeds, then over held-out domains. Labels without a usable run on every held-out domain are
    left out (see :func:`~linft.analysis.aggregate.missing_domains`).
    """
    info = _label_info(results)
    out = {}
    for key, table in sorted(cloud_tables(results).items()):
        r = info[key]
        role = figure_role(r.method, r.dropout)
        marker, single = ROLE_STYLES[role]
        pts, exact = cloud_points(table)
        out[(r.dataset, r.model, r.label)] = FigurePoints(role, marker, single, pts, exact)
    return out


def figure9_points(results: list[SelectedRun], naive=None, advanced=None,
                   fig2: dict[tuple, FigurePoints] | None = None) -> dict[tuple, FigurePoints]:
    """``{(dataset, model, base label): FigurePoints}`` for datasets whose records come from several models.

    Only labels (as recorded, without the model) that every model of the dataset has are compared. ``naive``
    and ``advanced`` name them; by default naive fine-tuning is every such label of the ``baseline`` role of
    :func:`figure_role` (no dropout, not an ensemble or average) and advanced fine-tuning every other one.
    Points are those of :func:`figure2_points` (``fig2``: already computed for ``results``, to reuse); roles are
    ``naive`` (●) and ``advanced`` (◆).
    """
    fig2 = figure2_points(results) if fig2 is None else fig2
    info = _label_info(results)
    models: dict[str, set] = defaultdict(set)
    for r in results:
        models[r.dataset].add(r.model)
    base = {(r.dataset, r.model, r.label): r.base_label for r in info.values()}
    out = {}
    for dataset in sorted(d for d, m in models.items() if len(m) > 1):
        keys = [k for k in fig2 if k[0] == dataset]
        per_model: dict[str, set] = defaultdict(set)
        for k in keys:
            per_model[k[1]].add(base[k])
        common = set.intersection(*(per_model.get(m, set()) for m in models[dataset]))
        for k in keys:
            label = base[k]
            if label not in common:
                continue
            group = _figure9_group(label, fig2[k].role, naive, advanced)
            if group is not None:
                out[(dataset, k[1], label)] = FigurePoints(group, FIGURE9_STYLES[group], fig2[k].single,
                                                           fig2[k].points, fig2[k].exact)
    return out


def _figure9_group(label: str, role: str, naive, advanced) -> str | None:
    if naive is None and advanced is None:
        return "naive" if role == "baseline" else "advanced"
    if naive is not None and label in naive:
        return "naive"
    if advanced is not None and label in advanced:
        return "advanced"
    return None


def _variant(label: str) -> str:
    """A label without its dropout rate: the series of :func:`dropout_points`."""
    return re.sub(r"(,\s*)?\bdropout [^,]+", "", label).strip(", ") or label


def dropout_points(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> dict[tuple, dict]:
    """``{(dataset, model, method, variant): {"rates": [...], "iid": [(mean, se)], "ood": [(mean, se)]}}``.

    Per series (a method and its label without the dropout rate) and dropout rate, the average column of
    :func:`~linft.analysis.aggregate.domainbed_table` (grid point selected per seed, mean ± SE over seeds).
    Rates whose average is missing (a held-out domain without usable runs) are left out, and so are series with
    fewer than two rates left: there is nothing to draw.
    """
    series: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.dropout is not None and derived_kind(r.method) not in ("ensemble", "soup", "greedy-soup"):
            series[(r.dataset, r.model, r.method, _variant(r.base_label))][float(r.dropout)].append(r)
    out = {}
    for key, per_rate in sorted(series.items()):
        rows = {"rates": [], "iid": [], "ood": []}
        for rate in sorted(per_rate):
            cell = next(iter(domainbed_table(per_rate[rate], selection, se).values()), {}).get("average")
            if cell is None or not (math.isfinite(cell["ood"][0]) and math.isfinite(cell["iid"][0])):
                continue
            rows["rates"].append(rate)
            rows["iid"].append(cell["iid"])
            rows["ood"].append(cell["ood"])
        if len(rows["rates"]) >= 2:
            out[key] = rows
    return out

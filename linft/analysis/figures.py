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
  average column) against the dropout rate: Figure 3 (:func:`figure3_points`), Figure 4 on DomainNet
  (:func:`figure4_points`) and Figure 5 from scratch (:func:`figure5_points`);
* :func:`figure6_points`, :func:`figure7_points`, :func:`figure10_points` — Figure 2's clouds restricted to
  the 10x last-layer lr runs, to the ensembles and averages of dropout models, and to stochastic depth vs dropout.

Accuracies are fractions in [0, 1]; the plots (:mod:`linft.analysis.plots`) draw them in percent.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from linft.analysis.aggregate import SelectedRun, cloud_points, cloud_tables, domainbed_table
from linft.protocol.records import DERIVED, derived_from

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
    "stochastic depth": ("o", False),  # Figure 10: residual-block dropout, circles as the paper
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


_HEAD_LR = re.compile(r"\b([0-9.eE+-]+)x head lr\b")
_DEPTH = re.compile(r"\bstochastic depth ([0-9.eE+-]+)")


def label_variant(label: str) -> tuple[float, float]:
    """``(last-layer lr multiplier, stochastic depth rate)`` of a fine-tuning label (``1.0, 0.0`` when it does not
    say), as :func:`linft.train.finetune.model.finetune_label` writes them."""
    head, depth = _HEAD_LR.search(label), _DEPTH.search(label)
    return (float(head.group(1)) if head else 1.0, float(depth.group(1)) if depth else 0.0)


def _base_method(method: str) -> str:
    kind = derived_kind(method)
    return method if kind is None else method[: -len(kind) - 1]


def _clouds_where(results: list[SelectedRun], fig2: dict | None, keep) -> dict[tuple, FigurePoints]:
    """The :func:`figure2_points` (``fig2``: already computed) whose result ``r`` and points ``fp`` pass
    ``keep(r, fp)``, only full fine-tuning runs (method ``finetune`` and what is derived from it)."""
    fig2 = figure2_points(results) if fig2 is None else fig2
    info = _label_info(results)
    return {k: fp for k, fp in fig2.items()
            if _base_method(info[(k[0], k[2])].method) == "finetune" and keep(info[(k[0], k[2])], fp)}


def _single_series(points: dict, roles) -> dict:
    """``points`` of the datasets where one of them has one of ``roles`` (the series that make the figure)."""
    keep = {k[0] for k, fp in points.items() if fp.role in roles}
    return {k: fp for k, fp in points.items() if k[0] in keep}


def figure6_points(results: list[SelectedRun], fig2: dict | None = None) -> dict[tuple, FigurePoints]:
    """Figure 6 (Figure 2 with a larger last-layer lr): every full fine-tuning series (baseline, dropout,
    ensembles, averages) whose runs have a last-layer lr multiplier other than 1. Empty when there is none."""
    return _clouds_where(results, fig2, lambda r, fp: label_variant(r.base_label)[0] != 1.0)


def _plain(r: SelectedRun) -> bool:
    return label_variant(r.base_label) == (1.0, 0.0)


def members_dropout(r: SelectedRun, info: dict[tuple, SelectedRun]):
    """The dropout rate of ``r``'s runs; for an ensemble or average whose records do not say (the across-run ones:
    their members may differ in everything but the label), that of the label it was made from (``info``: one
    result per (dataset, label)); None when neither says."""
    kind = derived_kind(r.method)
    if r.dropout is not None or kind is None:
        return r.dropout
    source = info.get((r.dataset, derived_from(r.label, kind)))
    return None if source is None else source.dropout


def figure7_points(results: list[SelectedRun], fig2: dict | None = None) -> dict[tuple, FigurePoints]:
    """Figure 7: plain full fine-tuning's baseline and dropout clouds, and the ensembles and weight averages
    made of models fine-tuned *with dropout* (dropout rate above 0, :func:`members_dropout`). Empty without such
    an ensemble or average."""
    derived, info = set(ROLE_OF_KIND.values()), _label_info(results)
    points = _clouds_where(results, fig2, lambda r, fp: _plain(r) and (fp.role not in derived
                                                                     or bool(members_dropout(r, info))))
    return _single_series(points, derived)


def figure10_points(results: list[SelectedRun], fig2: dict | None = None) -> dict[tuple, FigurePoints]:
    """Figure 10: stochastic depth (residual-block dropout, one cloud per rate, role ``stochastic depth``) against
    plain fine-tuning's baseline and dropout clouds (no ensembles or averages). Empty without stochastic depth."""
    derived = set(ROLE_OF_KIND.values())
    picked = _clouds_where(results, fig2, lambda r, fp: fp.role not in derived and label_variant(r.base_label)[0] == 1)
    info = _label_info(results)
    out = {}
    for key, fp in picked.items():
        depth = label_variant(info[(key[0], key[2])].base_label)[1]
        if depth:
            style = ROLE_STYLES["stochastic depth"]
            out[key] = FigurePoints("stochastic depth", style[0], style[1], fp.points, fp.exact)
        else:
            out[key] = fp
    return _single_series(out, {"stochastic depth"})


def is_domainnet(dataset: str) -> bool:
    """Whether a dataset is DomainNet (Figure 4's; its dropout rates are not drawn in Figure 3)."""
    return "domainnet" in dataset.lower()


def figure3_points(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> dict[tuple, dict]:
    """Figure 3: :func:`dropout_points` of every dataset but DomainNet, fine-tuning from pretrained weights (linear
    and full fine-tuning; not from scratch, Figure 5)."""
    return {k: v for k, v in dropout_points(results, selection, se).items()
            if not is_domainnet(k[0]) and k[2] != "scratch"}


def figure4_points(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> dict[tuple, dict]:
    """Figure 4: :func:`dropout_points` on DomainNet (fine-tuning from pretrained weights)."""
    return {k: v for k, v in dropout_points(results, selection, se).items() if is_domainnet(k[0]) and k[2] != "scratch"}


def figure5_points(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> dict[tuple, dict]:
    """Figure 5: :func:`dropout_points` of training from scratch (method ``scratch``), any dataset."""
    return {k: v for k, v in dropout_points(results, selection, se).items() if k[2] == "scratch"}


def figure8_points(results: list[SelectedRun], fig2: dict | None = None) -> dict[tuple, FigurePoints]:
    """Figure 8: linear fine-tuning against full fine-tuning and linear probing, the clouds of their runs with a grid
    (no ensembles or averages; full fine-tuning without a larger head lr or stochastic depth), on the datasets that
    have linear fine-tuning and one of the other two."""
    fig2 = figure2_points(results) if fig2 is None else fig2
    info = _label_info(results)
    derived = set(ROLE_OF_KIND.values())
    out = {}
    for key, fp in fig2.items():
        r = info[(key[0], key[2])]
        if fp.role in derived or r.method not in ("linear-ft", "linear-probe", "finetune"):
            continue
        if r.method != "finetune" or _plain(r):
            out[key] = fp
    methods: dict[str, set] = defaultdict(set)
    for k in out:
        methods[k[0]].add(info[(k[0], k[2])].method)
    return {k: fp for k, fp in out.items()
            if "linear-ft" in methods[k[0]] and methods[k[0]] & {"linear-probe", "finetune"}}

"""Aggregation of run records: one selected step per run, DomainBed's table, and the paper's 1296-point clouds.

* :func:`run_results` selects one step per run (best i.i.d. by default);
* :func:`domainbed_table` is DomainBed's table: per seed the grid point with
  the best i.i.d. accuracy, then mean ± standard error over seeds, per held-out
  domain and on average;
* :func:`cloud_tables` and :func:`cloud_points` give the paper's
  i.i.d.-vs-o.o.d. clouds (Figure 2): per held-out domain and grid point,
  average the seeds; every way of choosing one grid point per domain gives one
  point ``(mean_e iid, mean_e ood)``.

Diverged runs are never averaged in: they are counted and listed.

Ties (see :data:`TIE_RULES`): within a run the earliest of the steps with the
best score is selected; between the grid points of one (held-out domain, seed)
the first grid point in sorted order (``grid`` as sorted ``(name, value)``
pairs, compared name by name: the smallest value of the alphabetically first
hyper-parameter, e.g. the smallest ``lr``, then the next one).

Records of several backbones or weights are kept apart: each result carries
its ``model`` (backbone and weights), and when a dataset's records come from
several models every label is prefixed with its model, so that tables and
clouds show each model's rows separately. Records of one label, model and
dataset from different sources (two caches of the same backbone and weights)
are ambiguous and refused.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from linft.errors import LinftError
from linft.protocol.selection import SELECTIONS, group_runs, iid_accuracy, mean_and_se, ood_accuracy

#: Up to this many combinations the cloud is enumerated exactly; above it is sampled.
CLOUD_EXACT_LIMIT = 1_000_000

#: How selection breaks ties, as summary.md and the README state it.
TIE_RULES = ("within a run, the earliest of the evaluation steps with the best score; between grid points of one "
             "held-out domain and seed, the first grid point in sorted order (hyper-parameters compared by name in "
             "alphabetical order, smallest value first: e.g. the smallest lr, then the smallest weight_decay)")


@dataclass(frozen=True)
class SelectedRun:
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
    model: str = ""  # backbone/weights of the records ("" when they do not say)
    base_label: str = ""  # the label as recorded (``label`` is prefixed with the model when models mix)


def model_name(backbone, weights) -> str:
    """``backbone/weights`` as a report names a pretrained network (a weights file by its name)."""
    parts = [str(backbone or ""), PurePath(str(weights)).name if weights else ""]
    return "/".join(p for p in parts if p)


def _selected(run_records: list[dict], select) -> SelectedRun:
    last = run_records[-1]
    status = last.get("status", "ok")
    if status == "ok" and not last.get("final"):
        status = "unfinished"
    usable = [r for r in run_records if r.get("status", "ok") == "ok"]
    chosen = select(usable) if usable else last
    return SelectedRun(
        label=last["label"], method=last.get("method", last["label"]), dataset=last.get("dataset") or "",
        test_domain=last["test_domain"], seed=int(last["seed"]), grid=tuple(sorted(last.get("grid", {}).items())),
        step=int(chosen["step"]), iid=iid_accuracy(chosen) if usable else float("nan"),
        ood=ood_accuracy(chosen) if usable else float("nan"), status=status,
        dropout=last.get("hparams", {}).get("dropout"), source=last.get("source") or "",
        domains=tuple(sorted(set(last["train_domains"]) | {last["test_domain"]})),
        model=model_name(last.get("backbone"), last.get("weights")), base_label=last["label"])


def _keep_models_apart(results: list[SelectedRun]) -> list[SelectedRun]:
    """Refuse one label of one model from several sources; prefix labels with the model where models mix."""
    sources: dict[tuple, set] = defaultdict(set)
    models: dict[str, set] = defaultdict(set)
    for r in results:
        sources[(r.base_label, r.dataset, r.model)].add(r.source)
        models[r.dataset].add(r.model)
    mixed = [f"{label} on {ds}" + (f" with {model}" if model else "")
             for (label, ds, model), s in sources.items() if len(s) > 1]
    if mixed:
        raise LinftError(f"records of {', '.join(mixed)} come from different sources (feature caches, or "
                         f"datasets and backbone weights) of the same backbone and weights; report each source's "
                         f"records separately")
    return [dataclasses.replace(r, label=f"{r.model or 'unknown model'}: {r.base_label}")
            if len(models[r.dataset]) > 1 else r for r in results]


def run_results(records: list[dict], selection: str = "iid") -> list[SelectedRun]:
    """One :class:`SelectedRun` per run, at the step chosen by ``selection`` (``iid`` or ``oracle``).

    Runs of one dataset from several models (backbone/weights) are kept apart: their labels are prefixed with
    ``model: ``. One label of one model from two sources (two caches of the same backbone and weights) is refused.
    """
    if selection not in SELECTIONS:
        raise LinftError(f"unknown selection '{selection}'; use one of {', '.join(SELECTIONS)}", param="selection")
    select = SELECTIONS[selection]
    return _keep_models_apart([_selected(run_records, select) for run_records in group_runs(records).values()])


def _ok(results):
    return [r for r in results if r.status == "ok"]


def _expected_domains(results) -> dict[tuple, set]:
    out: dict[tuple, set] = defaultdict(set)
    for r in results:
        out[(r.dataset, r.label)].update(r.domains)
    return out


def missing_domains(results: list[SelectedRun]) -> dict[tuple, list[str]]:
    """Per (dataset, label), the held-out domains without any finished, non-diverged run."""
    have: dict[tuple, set] = defaultdict(set)
    for r in _ok(results):
        have[(r.dataset, r.label)].add(r.test_domain)
    return {k: sorted(v - have[k]) for k, v in _expected_domains(results).items() if v - have[k]}


def _score(selection: str):
    return (lambda r: r.ood) if selection == "oracle" else (lambda r: r.iid)


def best_grid_points(results: list[SelectedRun], selection: str = "iid") -> dict:
    """``{(dataset, label): {test_domain: {seed: SelectedRun}}}``: per held-out domain and seed the grid point
    with the best i.i.d. (or, ``oracle``, o.o.d.) accuracy; on ties the first grid point in sorted order."""
    score = _score(selection)
    chosen: dict[tuple, dict[str, dict[int, SelectedRun]]] = defaultdict(lambda: defaultdict(dict))
    for r in _ok(results):
        cur = chosen[(r.dataset, r.label)][r.test_domain].get(r.seed)
        if cur is None or score(r) > score(cur) or (score(r) == score(cur) and r.grid < cur.grid):  # ties: first grid
            chosen[(r.dataset, r.label)][r.test_domain][r.seed] = r
    return chosen


def tie_counts(results: list[SelectedRun], selection: str = "iid") -> dict[tuple, tuple[int, int]]:
    """``{(dataset, label): (tied, groups)}``: of the (held-out domain, seed) groups, how many have several grid
    points at the best score (the tie rule of :func:`best_grid_points` decided them)."""
    score = _score(selection)
    scores: dict[tuple, list] = defaultdict(list)
    for r in _ok(results):
        scores[(r.dataset, r.label, r.test_domain, r.seed)].append(score(r))
    out: dict[tuple, list] = defaultdict(lambda: [0, 0])
    for (dataset, label, _, _), values in scores.items():
        out[(dataset, label)][0] += values.count(max(values)) > 1
        out[(dataset, label)][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def domainbed_table(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> dict:
    """``{(dataset, label): {test_domain | "average": {"iid": (mean, se), "ood": (mean, se), "n": seeds}}}``.

    Per seed and held-out domain one grid point is chosen (:func:`best_grid_points`): the best i.i.d.
    accuracy (training-domain validation), or with ``selection="oracle"`` the
    best o.o.d. accuracy; then mean ± SE over seeds, with the standard error of
    convention ``se`` (:data:`~linft.protocol.selection.SE_FORMULAS`: ``sample``, ddof=1, or
    ``domainbed``, ddof=0). The average is
    taken per seed over *all* the dataset's domains, then over seeds; when a domain has
    no usable run the average is NaN (shown as —), never an average of the rest.
    """
    expected = _expected_domains(results)
    table = {}
    for key, per_domain in best_grid_points(results, selection).items():
        row = {}
        for d in sorted(per_domain):
            runs = list(per_domain[d].values())
            row[d] = {"iid": mean_and_se((r.iid for r in runs), se), "ood": mean_and_se((r.ood for r in runs), se),
                      "n": len(runs)}
        domains = sorted(expected[key])
        seeds = sorted(set.intersection(*(set(per_domain.get(d, {})) for d in domains)))
        row["average"] = {
            "iid": mean_and_se((np.mean([per_domain[d][s].iid for d in domains]) for s in seeds), se),
            "ood": mean_and_se((np.mean([per_domain[d][s].ood for d in domains]) for s in seeds), se),
            "n": len(seeds),
        }
        table[key] = row
    return table


def cloud_tables(results: list[SelectedRun]) -> dict:
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


def _finite(pair) -> list:
    return [float(x) if math.isfinite(x) else None for x in pair]


def table_rows(table: dict) -> list[dict]:
    """The :func:`domainbed_table` as a list of plain rows (for ``--json``): ``iid`` and ``ood`` are
    ``[mean, se]`` as fractions in [0, 1], ``None`` where there is no value (never NaN: strict JSON)."""
    return [{"dataset": k[0], "label": k[1], "test_domain": d, "iid": _finite(cell["iid"]), "ood": _finite(cell["ood"]),
             "seeds": cell["n"]} for k, row in sorted(table.items()) for d, cell in row.items()]


def _fmt(ms) -> str:
    m, se = ms
    return "—" if math.isnan(m) else f"{100 * m:.1f} ± {100 * se:.1f}"


def table_markdown(table: dict, metric: str, se: str = "sample") -> str:
    """One markdown table per dataset: rows = method labels, columns = held-out domains and average (percent)."""
    out = []
    convention = " (DomainBed's SE, ddof=0)" if se == "domainbed" else ""
    for dataset in sorted({k[0] for k in table}):
        keys = sorted(k for k in table if k[0] == dataset)
        domains = sorted({d for k in keys for d in table[k] if d != "average"})
        out.append(f"**{dataset or 'dataset'}: {metric} accuracy (%), mean ± SE over seeds{convention}**\n")
        out.append("| method | " + " | ".join(domains) + " | average |")
        out.append("|---" * (len(domains) + 2) + "|")
        for k in keys:
            cells = [_fmt(table[k][d][metric]) if d in table[k] else "—" for d in domains + ["average"]]
            out.append(f"| {k[1]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def cloud_points(table: dict, max_exact: int = CLOUD_EXACT_LIMIT, samples: int = 200_000,
                 seed: int = 0) -> tuple[np.ndarray, bool]:
    """The paper's cloud: ``table[e][h] = (iid, ood)`` (seed-averaged) -> points (M, 2) and whether exact.

    Each way of choosing one grid point ``h`` per held-out domain ``e`` gives
    the point ``(mean_e iid, mean_e ood)``. With up to ``max_exact``
    combinations all are enumerated (6 grid points and 4 domains: 1296);
    above, ``samples`` combinations are drawn uniformly with ``seed``.
    """
    domains = sorted(table)
    if not domains:
        return np.zeros((0, 2)), True
    values = [np.array([table[e][h] for h in sorted(table[e])], dtype=float) for e in domains]  # (H_e, 2)
    count = math.prod(len(v) for v in values)
    if count <= max_exact:
        total = np.zeros((1, 2))
        for v in values:  # outer sum, domain by domain, in itertools.product order
            total = (total[:, None, :] + v[None, :, :]).reshape(-1, 2)
        return total / len(values), True
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(v), size=samples) for v in values]
    total = sum(v[p] for v, p in zip(values, picks))
    return total / len(values), False

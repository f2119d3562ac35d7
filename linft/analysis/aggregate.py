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
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from linft.errors import LinftError
from linft.protocol.selection import SELECTIONS, group_runs, iid_accuracy, mean_and_se, ood_accuracy

#: Up to this many combinations the cloud is enumerated exactly; above it is sampled.
CLOUD_EXACT_LIMIT = 1_000_000


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


def run_results(records: list[dict], selection: str = "iid") -> list[SelectedRun]:
    """One :class:`SelectedRun` per run, at the step chosen by ``selection`` (``iid`` or ``oracle``)."""
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
        sources[key].add(last.get("source") or "")
        results.append(SelectedRun(
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


def missing_domains(results: list[SelectedRun]) -> dict[tuple, list[str]]:
    """Per (dataset, label), the held-out domains without any finished, non-diverged run."""
    have: dict[tuple, set] = defaultdict(set)
    for r in _ok(results):
        have[(r.dataset, r.label)].add(r.test_domain)
    return {k: sorted(v - have[k]) for k, v in _expected_domains(results).items() if v - have[k]}


def domainbed_table(results: list[SelectedRun], selection: str = "iid") -> dict:
    """``{(dataset, label): {test_domain | "average": {"iid": (mean, se), "ood": (mean, se), "n": seeds}}}``.

    Per seed and held-out domain one grid point is chosen: the best i.i.d.
    accuracy (training-domain validation), or with ``selection="oracle"`` the
    best o.o.d. accuracy; then mean ± SE over seeds. The average is taken per
    seed over *all* the dataset's domains, then over seeds; when a domain has
    no usable run the average is NaN (shown as —), never an average of the rest.
    """
    score = (lambda r: r.ood) if selection == "oracle" else (lambda r: r.iid)
    chosen: dict[tuple, dict[str, dict[int, SelectedRun]]] = defaultdict(lambda: defaultdict(dict))
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

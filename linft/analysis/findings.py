"""The paper's claims, checked on a set of records: each a paired o.o.d. difference with its standard error.

:func:`findings` compares, per dataset (and model), the labels the paper compares:

* **dropout**: every plain label with a dropout rate above 0 against the same label at dropout 0 (full
  fine-tuning, linear fine-tuning, from scratch: whatever the records hold);
* **ensembles and weight averages**: every ensemble or weight average of the dropout-0 runs (trajectory or
  across runs) against the same method at each dropout rate above 0 (the paper's Figure 2: very large dropout
  against them);
* **linear FT vs probe**: every plain linear fine-tuning label against linear probing.

A difference is taken per (held-out domain, seed) that both labels have, between the grid points selection
chose (:func:`~linft.analysis.aggregate.best_grid_points`), in o.o.d. accuracy; the reported difference is
the mean of those pairs and its standard error is :func:`~linft.protocol.selection.mean_and_se` over them
(pairing removes the between-domain spread both labels share). With one pair there is no standard error
(``None``). :func:`findings_text` writes them as the sentences ``summary.md`` ends with. Pure functions of
selected runs: nothing is trained or read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from linft.analysis.aggregate import SelectedRun, best_grid_points
from linft.analysis.figures import derived_kind
from linft.protocol.records import METHODS, derived_from
from linft.protocol.selection import mean_and_se

_DROPOUT = re.compile(r"\bdropout ([0-9.eE+-]+)")
_LINEAR_FT = re.compile(rf"^{METHODS['linear-ft']}, dropout [0-9.eE+-]+")


@dataclass(frozen=True)
class Finding:
    """``label`` against ``other`` on ``dataset``: mean o.o.d. difference (``label`` − ``other``, a fraction)
    over ``n`` paired (held-out domain, seed) results, its standard error (None for ``n`` = 1)."""

    claim: str  # "dropout", "ensembles and weight averages" or "linear FT vs probe"
    dataset: str
    label: str
    other: str
    difference: float
    se: float | None
    n: int


def paired_difference(results: list[SelectedRun], dataset: str, label: str, other: str,
                      selection: str = "iid", se: str = "sample") -> tuple[float, float | None, int] | None:
    """``(mean, standard error, n)`` of the o.o.d. accuracy of ``label`` minus ``other`` on ``dataset``, paired
    over the (held-out domain, seed) both have, each at the grid point ``selection`` chose; None when they
    share no pair. The standard error is None for a single pair."""
    return _paired(best_grid_points(results, selection), dataset, label, other, se)


def _paired(chosen: dict, dataset: str, label: str, other: str, se: str) -> tuple[float, float | None, int] | None:
    """:func:`paired_difference` on ``chosen``, the :func:`~linft.analysis.aggregate.best_grid_points` of the runs."""
    a, b = chosen.get((dataset, label), {}), chosen.get((dataset, other), {})
    diffs = [a[d][s].ood - b[d][s].ood for d in sorted(set(a) & set(b)) for s in sorted(set(a[d]) & set(b[d]))]
    if not diffs:
        return None
    mean, err = mean_and_se(diffs, se)
    return mean, (err if len(diffs) > 1 else None), len(diffs)


def with_dropout(label: str, rate: float) -> str:
    """``label`` with its ``dropout <p>`` written as ``dropout <rate>`` (unchanged when it names no rate)."""
    return _DROPOUT.sub(f"dropout {rate:g}", label, count=1)


def _pairs(results: list[SelectedRun]) -> list[tuple[str, str, str, str]]:
    """``(claim, dataset, label, other)`` of every comparison the records allow, in a stable order."""
    info = {(r.dataset, r.label): r for r in results if r.status == "ok"}
    plain = {k: r for k, r in info.items() if derived_kind(r.method) is None and _DROPOUT.search(r.label)}
    with_rate = sorted(k for k, r in plain.items() if r.dropout)  # plain labels with a dropout rate above 0
    pairs = [("dropout", dataset, label, with_dropout(label, 0)) for dataset, label in with_rate
             if (dataset, with_dropout(label, 0)) in plain]
    for (dataset, label), r in sorted(info.items()):
        kind = derived_kind(r.method)
        source = plain.get((dataset, derived_from(label, kind))) if kind else None
        if source is not None and not source.dropout:  # the paper: ensembles and averages of dropout-0 runs
            pairs += [("ensembles and weight averages", dataset, label, other) for d, other in with_rate
                      if d == dataset and with_dropout(other, 0) == source.label]
    for (dataset, label), r in sorted(plain.items()):
        prefix = label[: len(label) - len(r.base_label)] if r.base_label else ""  # "<model>: " when models mix
        probe, found = _LINEAR_FT.subn(METHODS["linear-probe"], label[len(prefix):], count=1)  # the same variant
        if r.method == "linear-ft" and found and (dataset, prefix + probe) in info:
            pairs.append(("linear FT vs probe", dataset, label, prefix + probe))
    return pairs


def findings(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> list[Finding]:
    """Every comparison of the module docstring the records allow, each with its paired difference."""
    chosen, out = best_grid_points(results, selection), []
    for claim, dataset, label, other in _pairs(results):
        diff = _paired(chosen, dataset, label, other, se)
        if diff is not None:
            out.append(Finding(claim, dataset, label, other, *diff))
    return out


def _decimals(x: float) -> int:
    """One decimal for a difference in percentage points, two when one would show a non-zero difference as 0.0."""
    return 2 if x and abs(100 * x) < 0.05 else 1


def finding_sentence(f: Finding) -> str:
    """One finding as a sentence: who beat whom o.o.d., by how much ± SE (percentage points), on how many pairs,
    and whether the difference is within two standard errors (not a clear win or loss)."""
    places = _decimals(f.difference)
    size = f"{100 * f.difference:+.{places}f}" + (f" ± {100 * f.se:.{places}f}" if f.se is not None else "")
    pairs = (f"mean ± SE of {f.n} differences paired by held-out domain and seed" if f.se is not None else
             "a single held-out domain and seed: no SE")
    if not f.difference:
        return f"{f.dataset}: {f.label} tied with {f.other} o.o.d. ({size} points; {pairs})."
    verdict = "beat" if f.difference > 0 else "did not beat"
    unclear = f.se is not None and abs(f.difference) <= 2 * f.se
    outcome = "win" if f.difference > 0 else "loss"
    return (f"{f.dataset}: {f.label} {verdict} {f.other} o.o.d.: {size} points ({pairs})"
            + (f"; within two standard errors, not a clear {outcome}." if unclear else "."))


def findings_text(results: list[SelectedRun], selection: str = "iid", se: str = "sample") -> list[str]:
    """The sentences of :func:`findings`, grouped by claim in the paper's order; empty when nothing compares."""
    found = findings(results, selection, se)
    order = ("dropout", "ensembles and weight averages", "linear FT vs probe")
    return [finding_sentence(f) for claim in order for f in found if f.claim == claim]

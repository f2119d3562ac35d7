"""The grid of a leave-one-domain-out protocol and its one validator, shared by linear and full fine-tuning.

A :class:`Grid` is held-out domains × seeds × hyper-parameter points (:class:`GridPoint`: lr × weight decay ×
dropout rate, and for the linear protocol the probe runs). Its defaults are the paper's grid (:data:`PAPER_GRID`:
lr {1e-3, 5e-4} × weight decay {1e-4, 5e-5, 1e-5}, 3 seeds). :func:`check_grid` refuses one that cannot run, in
one line that names the parameter (``LinftError.param``), before anything is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from linft.errors import LinftError


def check_dropout_rate(rate: float, what: str = "dropout rate") -> float:
    """``rate`` as a float in [0, 1), or one LinftError naming ``what``."""
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise LinftError(f"{what} {rate!r} is not a number; use e.g. 0.9", param="dropout") from None
    if not 0.0 <= value < 1.0:
        raise LinftError(f"{what} {rate} is outside [0, 1); use e.g. 0.9", param="dropout")
    return value


def _no_repeats(name: str, values) -> None:
    repeated = sorted({repr(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise LinftError(f"{name} repeats {', '.join(repeated)}; give each value once (a run would be trained twice)",
                         param=name)


def check_test_domains(domains: Sequence[str], test_domains: Sequence[str] | None, where: str = "the data"
                       ) -> list[str]:
    """The held-out domains to run: ``test_domains`` (each one of ``domains``), or every domain when empty.

    ``where`` names what holds the domains in the messages (``the cache``, a folder).
    """
    if len(domains) < 2:
        raise LinftError(f"{where} has {len(domains)} domain{'' if len(domains) == 1 else 's'}; "
                         f"leave-one-domain-out needs at least 2")
    if not test_domains:
        return list(domains)
    _no_repeats("test_domains", test_domains)
    unknown = [d for d in test_domains if d not in domains]
    if unknown:
        raise LinftError(f"held-out domain {', '.join(map(repr, unknown))} is not in {where}; "
                         f"choose from {', '.join(domains)}", param="test_domains")
    return list(test_domains)


def check_grid(domains: Sequence[str], *, test_domains=None, seeds: int, lrs, weight_decays, dropouts,
               probe: bool = False, usable: Sequence[int] | None = None, where: str = "the data") -> list[str]:
    """Refuse a grid that cannot run; returns the held-out domains to run.

    Needs at least one seed, lr and weight decay, and at least one dropout
    rate unless ``probe``; every lr finite and positive, every weight decay
    finite and >= 0, every dropout rate in [0, 1); no value given twice.
    ``usable``: the number of usable images of each domain (a cache's valid
    rows), none of which may be 0: such a domain, held out, has no o.o.d.
    accuracy, and gives no batch to train on.
    """
    chosen = check_test_domains(domains, test_domains, where)
    empty = [d for d, n in zip(domains, usable) if n == 0] if usable is not None else []
    if empty:
        raise LinftError(f"domain {', '.join(map(repr, empty))} has no usable image in {where} (every one was skipped "
                         f"as unreadable); replace its unreadable images, then extract again with force")
    for rate in dropouts:
        check_dropout_rate(rate)
    for name, values in (("dropouts", dropouts), ("lrs", lrs), ("weight_decays", weight_decays)):
        _no_repeats(name, [float(v) for v in values])
    if int(seeds) != seeds:
        raise LinftError(f"seeds must be a whole number of seeds, got {seeds}", param="seeds")
    empty_fields = [n for n, v in (("seeds", seeds >= 1), ("lrs", lrs), ("weight_decays", weight_decays),
                                   ("dropouts", dropouts or probe)) if not v]
    if empty_fields:
        raise LinftError("the grid is empty: give at least one seed, lr, weight decay and dropout rate (or probing)",
                         param=empty_fields[0])
    if any(not (math.isfinite(v) and v > 0) for v in lrs):
        raise LinftError(f"learning rates must be finite and positive, got {list(lrs)}", param="lrs")
    if any(not (math.isfinite(v) and v >= 0) for v in weight_decays):
        raise LinftError(f"weight decays must be finite and >= 0, got {list(weight_decays)}", param="weight_decays")
    return chosen


@dataclass(frozen=True)
class GridPoint:
    """The hyper-parameters of one run of a (held-out domain, seed): lr, weight decay, dropout rate, probing."""

    lr: float
    weight_decay: float
    dropout: float
    probe: bool = False


@dataclass(frozen=True)
class Grid:
    """Held-out domains × seeds × hyper-parameter points; the defaults are the paper's grid (:data:`PAPER_GRID`).

    ``dropouts`` × ``lrs`` × ``weight_decays`` are the points (:meth:`points`), then, with ``probe``, the probe
    runs (dropout 0) at every lr × weight decay; ``test_domains`` None or empty: every domain.
    """

    dropouts: tuple = (0.0,)
    probe: bool = False
    lrs: tuple = (1e-3, 5e-4)
    weight_decays: tuple = (1e-4, 5e-5, 1e-5)
    seeds: int = 3
    test_domains: tuple | None = None

    def points(self) -> list[GridPoint]:
        """The points of one (held-out domain, seed): dropout rates × lr × weight decay, then the probe runs."""
        points = [GridPoint(float(lr), float(wd), float(p)) for p in self.dropouts for lr in self.lrs
                  for wd in self.weight_decays]
        if self.probe:
            points += [GridPoint(float(lr), float(wd), 0.0, True) for lr in self.lrs for wd in self.weight_decays]
        return points

    def check(self, domains: Sequence[str], *, usable: Sequence[int] | None = None, where: str = "the data"
              ) -> list[str]:
        """:func:`check_grid` of this grid on ``domains``; returns the held-out domains to run."""
        return check_grid(domains, test_domains=self.test_domains, seeds=self.seeds, lrs=self.lrs,
                          weight_decays=self.weight_decays, dropouts=self.dropouts, probe=self.probe, usable=usable,
                          where=where)

    def runs(self, domains: Sequence[str], *, where: str = "the data") -> list[tuple[str, int, GridPoint]]:
        """Every run, checked: ``(held-out domain, seed, point)`` in the order domain × seed × :meth:`points`."""
        return [(d, s, p) for d in self.check(domains, where=where) for s in range(self.seeds) for p in self.points()]


#: The paper's grid (Section 4): lr {1e-3, 5e-4} × weight decay {1e-4, 5e-5, 1e-5}, 3 seeds (its schedule is
#: :data:`linft.protocol.schedule.PAPER`).
PAPER_GRID = Grid()

#: The paper's DomainNet learning rates (appendix A.2; its schedule is :data:`linft.protocol.schedule.DOMAINNET`).
DOMAINNET_LRS = (3e-3, 5e-3)

"""The one validator of a leave-one-domain-out grid, shared by linear fine-tuning and full fine-tuning.

A grid is every held-out domain × seed × lr × weight decay × dropout rate
(and, for the linear protocol, the probe runs). :func:`check_grid` refuses
one that cannot run, in one line that names the parameter, before anything
is trained.
"""

from __future__ import annotations

import math
from typing import Sequence

from linft.errors import LinftError
from linft.models.heads import check_dropout_rate


def _no_repeats(name: str, values) -> None:
    repeated = sorted({repr(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise LinftError(f"{name} repeats {', '.join(repeated)}; give each value once (a run would be trained twice)")


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
                         f"choose from {', '.join(domains)}")
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
        raise LinftError(f"seeds must be a whole number of seeds, got {seeds}")
    if seeds < 1 or not lrs or not weight_decays or (not dropouts and not probe):
        raise LinftError("the grid is empty: give at least one seed, lr, weight decay and dropout rate (or probing)")
    if any(not (math.isfinite(v) and v > 0) for v in lrs):
        raise LinftError(f"learning rates must be finite and positive, got {list(lrs)}")
    if any(not (math.isfinite(v) and v >= 0) for v in weight_decays):
        raise LinftError(f"weight decays must be finite and >= 0, got {list(weight_decays)}")
    return chosen

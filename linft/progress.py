"""One progress bar for every long loop in linft (click's, on stderr, with a rate)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import click


@contextmanager
def progress_bar(total: int, label: str, unit: str = "it", enabled: bool = True, initial: int = 0):
    """Yield ``update(n)``; shows done/total, ``unit``/s and ETA on stderr when ``enabled``.

    ``initial`` counts work done before (a resumed run): it fills the bar but not the rate.
    """
    if not enabled:
        yield lambda n: None
        return
    start = time.perf_counter()
    counted = [0]

    def show(_item):
        elapsed = time.perf_counter() - start
        rate = counted[0] / elapsed if elapsed > 0 else 0.0
        return f"{rate:,.1f} {unit}/s"

    with click.progressbar(length=total, label=label, file=sys.stderr, item_show_func=show,
                           show_pos=True, width=24) as bar:
        if initial:
            bar.update(initial)

        def update(n: int) -> None:
            counted[0] += n
            bar.update(n, current_item=True)

        yield update

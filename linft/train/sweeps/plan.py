"""The plan of a sweep: every run of the grid asked for, written before anything trains.

``OUT/planned.json`` (:attr:`~linft.train.sweeps.folder.SweepFolder.plan`) is one JSON object
``{"runs": {run_id: {"label", "test_domain", "seed", "grid"}}}``. ``train-linear`` (:mod:`linft.train.linear.driver`)
and fine-tuning sweeps (:func:`linft.train.finetune.run.finetune`, so every launcher and the demo) add their runs to it
before they train; :func:`linft.train.sweeps.status.sweep_status` counts the planned runs with no files yet as
*to do*. Runs planned before are kept, so two commands into one folder plan both grids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from linft.errors import LinftError
from linft.output import atomic_write_text, is_count
from linft.train.sweeps.folder import SweepFolder

#: What the plan keeps of a run.
PLAN_KEYS = ("label", "test_domain", "seed", "grid")


def plan_entry(record_or_header: dict) -> dict:
    """What the plan keeps of a run (:data:`PLAN_KEYS`), from its record or header as a dict."""
    return {k: record_or_header[k] for k in PLAN_KEYS}


def write_plan(out_dir: str | os.PathLike, runs: dict[str, dict]) -> Path:
    """Add ``{run_id: plan_entry}`` to the plan of the sweep folder ``out_dir`` (runs planned before are kept; a
    plan that holds them all already is left untouched). Returns the plan's path."""
    path = SweepFolder(out_dir).plan
    before = read_plan_file(path)
    planned = {**before, **runs}
    if planned == before:
        return path
    return atomic_write_text(path, json.dumps({"runs": planned}, indent=1, sort_keys=True) + "\n")


def plan_entry_problem(entry) -> str | None:
    """What makes ``entry`` not a plan entry (:func:`plan_entry`); None when nothing. The schema check of a plan,
    as :func:`linft.protocol.records.record_problem` is that of a record."""
    if not isinstance(entry, dict):
        return f"is {entry!r}, not a JSON object"
    for k, ok, what in (("label", lambda v: isinstance(v, str) and v, "a name"),
                        ("test_domain", lambda v: isinstance(v, str) and v, "a name"),
                        ("seed", is_count, "a whole number >= 0"),
                        ("grid", lambda v: isinstance(v, dict), "an object")):
        if k in entry and entry[k] is not None and not ok(entry[k]):
            return f"has {k} {entry[k]!r}, not {what}"
    return None


def read_plan_file(path: str | os.PathLike) -> dict[str, dict]:
    """The runs of one plan file (none when it is missing or unreadable: the plan only adds *to do* runs); an entry
    that is not a plan entry (:func:`plan_entry_problem`) is one LinftError naming the file and the run."""
    try:
        runs = json.loads(Path(path).read_text()).get("runs", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(runs, dict):
        return {}
    for rid, entry in runs.items():
        problem = plan_entry_problem(entry)
        if problem:
            raise LinftError(f"{path} is not a linft plan: its run {rid!r} {problem}; delete that file (it only "
                             f"lists the runs to do) and run the command again")
    return runs

"""Where a sweep stands, read from its folder while its jobs run: done, running, interrupted, diverged, to do.

A sweep folder holds fine-tuning run folders (``OUT/<run_id>/``, :class:`~linft.train.finetune.run_folder.RunFolder`),
records files of the linear protocol (``OUT/records.jsonl``) or of any other method, feature caches, and the
plan (``planned.json``, written by ``train-linear`` and ``finetune`` before they train: every run of the grid
asked for, so that runs not started yet count as *to do*).

The state of a run:

* **done** / **diverged**: its final record is on disk (the one rule of
  :func:`linft.protocol.records.final_records`), with status ``ok`` / ``diverged``;
* **running**: not done, and its files (a run folder's records, checkpoint, ``run.json``, ``selected.pt``;
  a records file of the linear grid) changed less than ``stale_after`` seconds ago;
* **interrupted**: not done, and nothing changed for ``stale_after`` seconds (a killed job; re-running the
  same command resumes it). A job that evaluates less often than ``stale_after`` shows as interrupted between
  its evaluations: choose ``stale_after`` above the time between two evaluations;
* **to do**: in the plan, with no record and no run folder yet.

Everything is read-only and takes no lock: records files are read as they are (a torn last line, the one a
writer is appending, is skipped), HDF5 caches are opened with ``locking=False``
(:func:`linft.cache.format.cache_info`), so ``status`` runs next to the jobs that write these files.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linft.cache.format import cache_info
from linft.errors import LinftError
from linft.protocol.records import DERIVED, read_records
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.output import PARTIAL_SUFFIX, atomic_write_text, is_count
from linft.train.finetune.run_folder import RUN_FILE, RunFolder

PLAN_FILE = "planned.json"

#: A run whose files did not change for this long is interrupted (not running); ``linft status --stale-minutes``.
DEFAULT_STALE_AFTER = 30 * 60

STATES = ("done", "running", "interrupted", "diverged", "to do")


# --------------------------------------------------------------------------- the plan


def plan_entry(record_or_header: dict) -> dict:
    """What the plan keeps of a run: ``label``, ``test_domain``, ``seed``, ``grid``."""
    return {k: record_or_header[k] for k in ("label", "test_domain", "seed", "grid")}


def write_plan(out_dir: str | os.PathLike, runs: dict[str, dict]) -> Path:
    """Add ``{run_id: plan_entry}`` to ``out_dir/planned.json`` (runs planned before are kept; a plan that
    holds them all already is left untouched)."""
    path = Path(out_dir) / PLAN_FILE
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


def read_plan_file(path: Path) -> dict[str, dict]:
    """The runs of one plan file (none when it is missing or unreadable: the plan only adds *to do* runs); an entry
    that is not a plan entry (:func:`plan_entry_problem`) is one LinftError naming the file and the run."""
    try:
        runs = json.loads(path.read_text()).get("runs", {})
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


def divergence_note(diverged: list[dict], total: int) -> str | None:
    """One line: how many of ``total`` runs diverged and at which hyper-parameters (None when none did).

    ``diverged`` holds one dict per diverged run (``label``, ``lr``, ``weight_decay``, ...); every key is listed
    with the values that diverged.
    """
    if not diverged:
        return None
    values: dict[str, list] = {}
    for hp in diverged:
        for k, v in hp.items():
            if v not in values.setdefault(k, []):
                values[k].append(v)
    what = "; ".join((", ".join(map(str, vs)) if k == "label" else
                      f"{k.replace('_', ' ')} {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}")
                     for k, vs in values.items())
    if len(diverged) < total:
        head = f"{len(diverged)} of {total} runs diverged"
    else:
        head = "the run diverged" if total == 1 else f"all {total} runs diverged"
    return f"{head} ({what})"


# --------------------------------------------------------------------------- the status


@dataclass
class RunState:
    """One run as :func:`sweep_status` sees it."""

    run_id: str
    state: str  # one of STATES
    label: str | None = None
    test_domain: str | None = None
    seed: int | None = None
    grid: dict = field(default_factory=dict)
    last_step: int | None = None
    steps: int | None = None
    seconds_since_change: float | None = None
    where: str | None = None  # its run folder or records file


@dataclass
class SweepStatus:
    """The runs, caches and best i.i.d. accuracies of a sweep folder."""

    folder: Path
    stale_after: float
    runs: list[RunState]
    best: list[dict]
    caches: list[dict]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.state == s for r in self.runs) for s in STATES}

    def to_dict(self) -> dict:
        return {"folder": str(self.folder), "stale_after_seconds": self.stale_after, "counts": self.counts(),
                "runs": [asdict(r) for r in self.runs], "best_iid": self.best, "caches": self.caches}


def _is_base(record: dict) -> bool:
    """Records of a run of its own (not derived ensembles and averages, which follow their runs)."""
    return not any(str(record.get("method", "")).endswith("-" + kind) for kind in DERIVED)


def _age(paths, now: float) -> float | None:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return now - max(times) if times else None


def _state(records: list[dict], age: float | None, stale_after: float) -> str:
    final = [r for r in records if r.get("final")]
    if final:
        return "diverged" if final[-1].get("status") == "diverged" else "done"
    return "running" if age is not None and age < stale_after else "interrupted"


def _run_state(run_id: str, records: list[dict], age, stale_after: float, where: Path) -> RunState:
    """A run from its records (the last step is that of its latest attempt: a restarted run starts over)."""
    last = records[-1] if records else {}
    hparams = last.get("hparams") if isinstance(last.get("hparams"), dict) else {}
    attempt = [r["step"] for r in records if r.get("attempt") == last.get("attempt")]
    return RunState(run_id, _state(records, age, stale_after), last.get("label"), last.get("test_domain"),
                    last.get("seed"), last.get("grid") or {}, max(attempt, default=None), hparams.get("steps"),
                    None if age is None else round(age, 1), str(where))


def _read(path: Path) -> list[dict]:
    """The records of one file as they are now (a file that vanished meanwhile has none)."""
    try:
        return read_records([path])
    except LinftError:
        if not path.exists():
            return []
        raise


def _runs(folder: Path, stale_after: float, now: float) -> tuple[list[RunState], list[dict]]:
    """Every run with files under ``folder``, and every base record read (for the best i.i.d.)."""
    runs, seen = [], []
    run_dirs = {p.parent for p in folder.rglob(RUN_FILE)}
    for root in sorted(run_dirs):
        rf = RunFolder(root)
        records = [r for r in _read(rf.records) if r["run_id"] == rf.run_id] if rf.records.exists() else []
        age = _age([rf.records, rf.checkpoint, rf.run_json, rf.selected], now)
        runs.append(_run_state(rf.run_id, records, age, stale_after, root))
        seen += records
    for path in sorted(folder.rglob("*.jsonl")):
        if path.parent in run_dirs:
            continue
        by_run: dict[str, list[dict]] = {}
        for r in _read(path):
            if _is_base(r):
                by_run.setdefault(r["run_id"], []).append(r)
        age = _age([path], now)
        runs += [_run_state(rid, recs, age, stale_after, path) for rid, recs in by_run.items()]
        seen += [r for recs in by_run.values() for r in recs]
    return runs, seen


def _best(records: list[dict], diverged: set[str]) -> list[dict]:
    """Per (label, held-out domain): the record with the best i.i.d. accuracy so far, and its o.o.d. (runs that
    diverged are left out, as the tables leave them out)."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r.get("status", "ok") != "ok" or not r.get("splits") or r["run_id"] in diverged:
            continue
        key = (r["label"], r["test_domain"])
        iid = iid_accuracy(r)
        if key not in best or iid > best[key]["iid"]:
            best[key] = {"label": r["label"], "test_domain": r["test_domain"], "iid": iid, "ood": ood_accuracy(r),
                         "run_id": r["run_id"], "step": r["step"]}
    return [best[k] for k in sorted(best)]


def _caches(folder: Path, stale_after: float, now: float) -> list[dict]:
    """Feature caches under ``folder``: complete, or how far their extraction is (read without locks)."""
    found = []
    for path in sorted([*folder.rglob("*.h5"), *folder.rglob("*.h5" + PARTIAL_SUFFIX)]):
        entry = {"path": str(path), "seconds_since_change": round(_age([path], now), 1)}
        try:
            info = cache_info(path)
        except LinftError as exc:
            found.append({**entry, "state": "unreadable", "detail": str(exc)})
            continue
        if info.get("complete") and not path.name.endswith(PARTIAL_SUFFIX):
            state = "complete"
        else:
            state = "extracting" if entry["seconds_since_change"] < stale_after else "interrupted"
        found.append({**entry, "state": state, "done": int(info.get("num_done", info.get("num_examples", 0))),
                      "total": int(info.get("num_examples", 0))})
    return found


def sweep_status(folder: str | os.PathLike, stale_after: float = DEFAULT_STALE_AFTER) -> SweepStatus:
    """The state of every run under ``folder`` (run folders, records files, the plan's runs not started yet),
    the best i.i.d. accuracy so far per method and held-out domain, and the feature caches found there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LinftError(f"{folder} is not a folder; pass the --out folder of train-linear, finetune or demo")
    if not stale_after > 0:
        raise LinftError(f"stale_after must be positive, got {stale_after}")
    now = time.time()
    runs, records = _runs(folder, stale_after, now)
    known = {r.run_id for r in runs}
    planned: dict[str, dict] = {}
    for path in sorted(folder.rglob(PLAN_FILE)):
        planned.update(read_plan_file(path))
    runs += [RunState(rid, "to do", p.get("label"), p.get("test_domain"), p.get("seed"), p.get("grid") or {})
             for rid, p in sorted(planned.items()) if rid not in known]
    best = _best(records, {r.run_id for r in runs if r.state == "diverged"})
    return SweepStatus(folder, stale_after, runs, best, _caches(folder, stale_after, now))


# --------------------------------------------------------------------------- for people


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "no file yet"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s ago"
    return f"{seconds // 60} min ago" if seconds < 7200 else f"{seconds // 3600} h ago"


def _run_line(r: RunState) -> str:
    grid = " ".join(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.grid.items())
    step = "no evaluation yet" if r.last_step is None else \
        f"step {r.last_step}" + (f" of {r.steps}" if r.steps else "")
    return f"  {r.run_id}  {r.label} / held out {r.test_domain} / seed {r.seed} / {grid}: {step}, " \
           f"changed {_ago(r.seconds_since_change)}"


def _grouped_lines(runs: list[RunState]) -> list[str]:
    """Runs of a run folder one line each; runs of one records file (a linear grid) one line per step reached."""
    lines, files = [], {}
    for r in runs:
        if r.where and Path(r.where).name.endswith(".jsonl"):
            files.setdefault((r.where, r.last_step, r.steps, r.seconds_since_change), []).append(r)
        else:
            lines.append(_run_line(r))
    for (where, step, steps, age), group in files.items():
        lines.append(f"  {len(group)} runs of {where}: step {step}" + (f" of {steps}" if steps else "")
                     + f", changed {_ago(age)}")
    return lines


def describe_status(status: SweepStatus) -> str:
    """The status as lines for people: counts, running and interrupted runs, best i.i.d. so far, caches."""
    counts = status.counts()
    lines = [f"{status.folder}: {len(status.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    for state, hint in (("running", ""), ("interrupted", f" (nothing changed for {status.stale_after / 60:g} min; "
                                                          f"re-run the same command to resume)")):
        chosen = [r for r in status.runs if r.state == state]
        if chosen:
            lines += [f"{state}{hint}:", *_grouped_lines(chosen)]
    if status.best:
        lines.append("best i.i.d. so far (o.o.d. at that evaluation):")
        width = max(len(b["label"]) for b in status.best)
        lines += [f"  {b['label']:<{width}}  held out {b['test_domain']}: i.i.d. {100 * b['iid']:.1f}%, "
                  f"o.o.d. {100 * b['ood']:.1f}% (run {b['run_id']} step {b['step']})" for b in status.best]
    for c in status.caches:
        what = c.get("detail") if c["state"] == "unreadable" else \
            f"{c['done']} of {c['total']} images, changed {_ago(c['seconds_since_change'])}"
        lines.append(f"cache {c['path']}: {c['state']}, {what}")
    return "\n".join(lines)

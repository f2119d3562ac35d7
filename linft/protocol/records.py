"""Run records: THE schema, one JSON line per evaluation point of one run, written by every method.

Every method (linear FT and probing, full fine-tuning and its variants,
trajectory and across-run ensembles and soups, interpolation paths) builds its
records with :func:`make_record` from a :class:`RunHeader`, so that selection,
tables and plots (:mod:`linft.protocol.selection`, :mod:`linft.analysis`) read
nothing else. Fields:

``method`` (one of :data:`METHODS`, or a base method with a :data:`DERIVED`
suffix), ``label`` (method and variant, the unit a report compares),
``dataset``, ``source`` (what the numbers were computed from: a feature
cache's ``provenance_sha256``, or ``<dataset files>:<weights>`` hashes; records
of different sources never mix), ``backbone``, ``weights``, ``test_domain``,
``train_domains``, ``hparams`` (all of them), ``grid`` (the hyper-parameters
that vary inside one label: the cloud's grid points), ``seed``, ``run_id``,
``attempt``, ``step``, ``splits`` (``{"<domain>_in"|"<domain>_out": [correct,
total]}``), ``loss``, ``status`` (``ok`` or ``diverged``) and ``final`` (true on
the run's last record), plus method-specific extras.

One rule says what is done (:func:`finished_run_ids`): a run whose records hold
a ``final`` record. Every method writes a run's final record last, after all
else it produces is on disk, so a run killed before it is redone or resumed.
Every command reports it in one wording (:func:`done_summary`).

Files are only ever appended to, one complete line per write, flushed. Records
of earlier releases are read as they are (:func:`upgrade_record`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from linft.errors import LinftError
from linft.output import write_failure

RECORDS_FILE = "records.jsonl"

REQUIRED_FIELDS = ("run_id", "label", "test_domain", "train_domains", "seed", "step", "splits")

#: Every method that writes records, with the start of its labels.
METHODS = {
    "linear-ft": "linear FT",
    "linear-probe": "linear probe",
    "finetune": "full FT",
    "scratch": "from scratch",
    "linearized-finetune": "linearized FT",
    "lp-ft": "LP-FT",
    "interpolation-weights": "weight interpolation",
    "interpolation-representation": "representation interpolation",
    "interpolation-representation-block": "representation interpolation",
    "interpolation-linearized": "linearized weight interpolation",
}

#: Records derived from the runs of a base method: method suffix -> label suffix.
DERIVED = {
    "trajectory-ensemble": "trajectory ensemble",
    "trajectory-average": "trajectory average",
    "ensemble": "ensemble of runs",
    "soup": "weight average of runs",
    "greedy-soup": "greedy soup",
}


def derived(method: str, label: str, kind: str) -> tuple[str, str]:
    """``(method, label)`` of the records of kind ``kind`` (:data:`DERIVED`) made from runs of ``method``."""
    if kind not in DERIVED:
        raise LinftError(f"unknown derived kind {kind!r}; use one of {', '.join(DERIVED)}")
    return f"{method}-{kind}", f"{label}, {DERIVED[kind]}"


def is_known_method(method: str) -> bool:
    """Whether ``method`` is in the vocabulary: a method of :data:`METHODS`, or one with a :data:`DERIVED` suffix."""
    return method in METHODS or any(method == f"{m}-{k}" for m in METHODS for k in DERIVED)


def run_id(**identity) -> str:
    """A short stable id of a run from what defines it (method, source, domain, hyper-parameters, seed)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunHeader:
    """What every record of one run says about the run: all but the evaluation point."""

    method: str
    label: str
    dataset: str
    source: str
    backbone: str
    weights: str
    test_domain: str
    train_domains: list
    hparams: dict
    grid: dict
    seed: int
    run_id: str
    attempt: str
    extra: dict = field(default_factory=dict)

    def replace(self, **changes) -> "RunHeader":
        """A copy with some fields changed (a derived run: another method, label and id)."""
        return dataclasses.replace(self, **changes)

    def fields(self) -> dict:
        """The header as the record fields it contributes (extras flattened in)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


def make_record(header: RunHeader, step: int, splits: dict, *, loss: float | None = None, status: str = "ok",
                final: bool = False, **extra) -> dict:
    """The record of one evaluation point: the header's fields, the point's, and any extras."""
    if not is_known_method(header.method):
        raise LinftError(f"unknown record method {header.method!r}; add it to linft.protocol.records.METHODS")
    record = header.fields()
    record.update(step=int(step), splits=splits, loss=loss, status=status, final=bool(final))
    record.update(extra)
    return record


def upgrade_record(record: dict) -> dict:
    """A record of any release in today's schema (earlier linear records named ``source`` ``cache_provenance``)."""
    if "source" not in record and "cache_provenance" in record:
        record = {**record, "source": record["cache_provenance"]}
    return record


def _drop_torn_last_line(path: Path) -> None:
    """Cut an unterminated last line (a writer killed mid-line) so that appends start on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        fh.truncate(data.rfind(b"\n") + 1)


class RecordWriter:
    """Appends records to ``path`` (JSON lines), one flushed line each.

    ``sinks``: other destinations of the same records (a metrics stream such as
    :class:`linft.protocol.sinks.TensorBoardSink`): each record, once its line is
    on disk, is passed to every sink's ``write(record)``; :meth:`close` calls
    each sink's ``close()`` (a sink may be written to again after it, by another
    writer). The records file stays the reference: a sink never replaces it.
    """

    def __init__(self, path: str | os.PathLike, sinks=()):
        self.path = Path(path)
        self.sinks = list(sinks)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_last_line(self.path)
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise LinftError(f"cannot write run records to {self.path} ({exc.strerror}); choose another --out") from None

    def write(self, record: dict) -> None:
        try:
            self._fh.write(json.dumps(record, sort_keys=True) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk: the torn line is dropped when the file is next opened
            raise LinftError(f"cannot write run records to {self.path} ({write_failure(exc)}); free space, then "
                             f"re-run the same command: finished runs are kept") from None
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:  # the buffer was already flushed or its write failed and was reported
            pass
        for sink in self.sinks:
            sink.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def record_files(paths) -> list[Path]:
    """``*.jsonl`` files named directly or found (recursively) in the given folders."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(p.rglob("*.jsonl")))
        elif p.is_file():
            found.append(p)
        else:
            raise LinftError(f"{p} does not exist; pass run-record files (*.jsonl) or folders holding them")
    if not found:
        raise LinftError(f"no run records (*.jsonl) in {', '.join(map(str, paths))}; train something first")
    return found


def _parse_line(path: Path, i: int, line: str, last: bool) -> dict | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        if last:  # the last, unterminated line of a killed writer
            return None
        raise LinftError(f"{path} line {i + 1} is not JSON; it is not a linft record file") from None
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
        raise LinftError(f"{path} line {i + 1} is not a linft run record (needs {', '.join(REQUIRED_FIELDS)}); "
                         f"pass only linft record files or folders")
    return upgrade_record(record)


def read_records(paths) -> list[dict]:
    """All records of the given files or folders, in today's schema. A torn last line (a killed writer) is skipped."""
    records = []
    for path in record_files(paths):
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        for i, line in enumerate(lines):
            if line.strip():
                record = _parse_line(path, i, line, last=i == len(lines) - 1)
                if record is not None:
                    records.append(record)
    return records


def existing_records(path: str | os.PathLike) -> list[dict]:
    """The records of one file, or none when it does not exist yet."""
    path = Path(path)
    return read_records([path]) if path.exists() else []


def final_records(paths) -> dict[str, dict]:
    """THE "skip what is done" rule: a run is done when the files (those that exist) hold its final record.

    Returns ``{run_id: its final record}`` (the last one, when a run was finished twice).
    """
    existing = [p for p in map(Path, paths) if p.exists()]
    return {r["run_id"]: r for r in (read_records(existing) if existing else []) if r.get("final")}


def finished_run_ids(paths) -> set[str]:
    """Ids of the runs that are done (:func:`final_records`)."""
    return set(final_records(paths))


def done_summary(new: int, already: int, *, verb: str = "trained", unit: str = "run", diverged: int = 0,
                 failed: int = 0) -> str:
    """THE wording of what a command did under the "skip what is done" rule, for every command and the demo.

    ``done_summary(3, 5, diverged=1)`` is ``3 runs trained (1 diverged), 5 already done``: ``new`` units were
    ``verb`` now (``diverged`` and ``failed`` count among them), ``already`` were done before and skipped.
    """
    def count(n: int) -> str:
        return f"{n:,} {unit}{'' if n == 1 else 's'}"

    among = [f"{n:,} {what}" for n, what in ((diverged, "diverged"), (failed, "failed")) if n]
    detail = f" ({', '.join(among)})" if among else ""
    return f"{count(new)} {verb}{detail}, {already:,} already done"

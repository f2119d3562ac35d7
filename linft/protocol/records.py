"""Run records: THE schema, one JSON line per evaluation point of one run, written by every method.

Every method (linear FT and probing, full fine-tuning and its variants,
trajectory and across-run ensembles and soups, interpolation paths) builds its
records with :func:`make_record` from the header of :func:`linft.protocol.identity.run_header`, so that selection,
tables and plots (:mod:`linft.protocol.selection`, :mod:`linft.analysis`) read
nothing else. Fields:

``method`` (one of :data:`METHODS`, or a base method with a :data:`DERIVED`
suffix), ``label`` (method and variant, the unit a report compares),
``dataset``, ``source`` (what the numbers were computed from: a feature
cache's ``provenance_sha256``, or ``<dataset files>:<weights>`` hashes; records
of different sources never mix), ``backbone``, ``weights``, ``test_domain``,
``train_domains``, ``hparams`` (all of them), ``grid`` (the hyper-parameters
that vary inside one label: the cloud's grid points), ``seed``, ``run_id``,
``attempt``, ``schema`` (:data:`~linft.protocol.identity.SCHEMA_VERSION`; absent: 1), ``step``, ``splits``
(``{"<domain>_in"|"<domain>_out": [correct, total]}``), ``loss``, ``status`` (``ok`` or ``diverged``) and
``final`` (true on the run's last record), plus method-specific extras.

One rule says what is done (:func:`finished_run_ids`): a run whose records hold
a ``final`` record. Every method writes a run's final record last, after all
else it produces is on disk, so a run killed before it is redone or resumed.
Every command reports it in one wording (:func:`done_summary`).

Files are only ever appended to, one complete line per write, flushed. A record
whose source is named ``cache_provenance`` is read with it as its ``source`` (:func:`upgrade_record`). The reader
refuses a record that selection and reports could not use (:func:`record_problem`)
in one line naming its file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from linft.errors import LinftError
from linft.protocol.identity import SCHEMA_VERSION, RunHeader, run_id  # noqa: F401  (re-exported)
from linft.output import finite_or_none, is_count, write_failure

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


def derived_from(label: str, kind: str) -> str | None:
    """The label of the runs a record of kind ``kind`` with label ``label`` was made from (the inverse of
    :func:`derived`'s label), or None when ``label`` does not end as :func:`derived` writes it."""
    suffix = f", {DERIVED[kind]}" if kind in DERIVED else None
    return label[: -len(suffix)] if suffix and label.endswith(suffix) else None


def is_known_method(method: str) -> bool:
    """Whether ``method`` is in the vocabulary: a method of :data:`METHODS`, or one with a :data:`DERIVED` suffix."""
    return method in METHODS or any(method == f"{m}-{k}" for m in METHODS for k in DERIVED)


def make_record(header: RunHeader, step: int, splits: dict | None, *, loss: float | None = None, status: str = "ok",
                final: bool = False, **extra) -> dict:
    """The record of one evaluation point: the header's fields, the point's, and any extras. ``splits`` None (no
    accuracy: non-finite logits, :func:`~linft.protocol.selection.split_counts`) is a ``diverged`` record."""
    if not is_known_method(header.method):
        raise LinftError(f"unknown record method {header.method!r}; add it to linft.protocol.records.METHODS")
    if splits is None:
        splits, status, loss = {}, "diverged", None
    record = header.fields()
    record.update(step=int(step), splits=splits, loss=loss, status=status, final=bool(final))
    record.update(extra)
    return record


def upgrade_record(record: dict) -> dict:
    """``record`` in today's schema: ``source`` taken from ``cache_provenance`` when only that is present."""
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
            raise LinftError(f"cannot write run records to {self.path} ({write_failure(exc)}); choose another "
                             f"out_dir", param="out_dir") from None

    def write(self, record: dict) -> None:
        try:
            self._fh.write(json.dumps(finite_or_none(record), sort_keys=True, allow_nan=False) + "\n")  # NaN: null
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


#: ``status`` values of a record.
STATUSES = ("ok", "diverged")


def _split_problem(splits: dict, name: str) -> str | None:
    if name not in splits:
        return f"splits lack {name}"
    pair = splits[name]
    if not (isinstance(pair, list) and len(pair) == 2 and all(map(is_count, pair)) and pair[0] <= pair[1]):
        return f"splits entry {name} is {pair!r}, not [correct, total] with 0 <= correct <= total"
    return None


def _splits_problem(record: dict) -> str | None:
    """What keeps the i.i.d. and o.o.d. accuracies of a record from being computed (a diverged run has none)."""
    splits, test = record["splits"], record["test_domain"]
    if not isinstance(splits, dict):
        return f"splits is {splits!r}, not an object"
    if not splits and record.get("status") == "diverged":
        return None
    needed = [f"{test}_in", f"{test}_out", *(f"{d}_out" for d in record["train_domains"])]
    problem = next(filter(None, (_split_problem(splits, k) for k in dict.fromkeys([*needed, *splits]))), None)
    if problem is None and splits[f"{test}_in"][1] + splits[f"{test}_out"][1] == 0:
        problem = f"held-out domain {test!r} has no image in its splits (o.o.d. accuracy undefined)"
    return problem


def record_problem(record) -> str | None:
    """What makes ``record`` unusable by selection, tables and the "skip what is done" rule; None when nothing.

    Needs the :data:`REQUIRED_FIELDS` with names as text, a whole ``seed`` and ``step`` >= 0, distinct training
    domains (at least one, without the held-out one), ``[correct, total]`` splits of the held-out domain (not all
    empty) and of every training domain's "out" part (none for a diverged run), and well-typed optional fields.
    """
    if not isinstance(record, dict):
        return "is not a JSON object"
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    bad_name = next((k for k in ("run_id", "label", "test_domain") if not (isinstance(record[k], str) and record[k])),
                    None)
    if bad_name:
        return f"{bad_name} is {record[bad_name]!r}, not a name"
    for k in ("seed", "step"):
        if not is_count(record[k]):
            return f"{k} is {record[k]!r}, not a whole number >= 0"
    train = record["train_domains"]
    if not (isinstance(train, list) and train and all(isinstance(d, str) for d in train)
            and len(set(train)) == len(train) and record["test_domain"] not in train):
        return f"train_domains is {train!r}, not a list of distinct domains without the held-out one"
    for k, kind, what in (("grid", dict, "an object"), ("hparams", dict, "an object"), ("final", bool, "true or false"),
                          ("attempt", str, "a text"), ("method", str, "a text"), ("schema", int, "a whole number")):
        if k in record and not isinstance(record[k], kind):
            return f"{k} is {record[k]!r}, not {what}"
    if record.get("status", "ok") not in STATUSES:
        return f"status is {record['status']!r}, not one of {', '.join(STATUSES)}"
    loss = record.get("loss")
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        return f"loss is {loss!r}, not a number"
    return _splits_problem(record)


def _parse_line(path: Path, i: int, raw: bytes, last: bool) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:  # records are ASCII JSON: even a torn line decodes, so this is another kind of file
        raise LinftError(f"{path} line {i + 1} is not UTF-8 text; it is not a linft record file (pass only the "
                         f"records.jsonl files of linft or the folders holding them)") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        if last:  # the last, unterminated line of a killed writer
            return None
        raise LinftError(f"{path} line {i + 1} is not JSON; it is not a linft record file") from None
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
        raise LinftError(f"{path} line {i + 1} is not a linft run record (needs {', '.join(REQUIRED_FIELDS)}); "
                         f"pass only linft record files or folders")
    record = upgrade_record(record)
    problem = record_problem(record)
    if problem:
        raise LinftError(f"{path} line {i + 1} is a run record that cannot be used: its {problem}; fix or delete "
                         f"that line (or move the file away) and run the command again")
    return record


def read_records(paths) -> list[dict]:
    """All records of the given files or folders, in today's schema. A torn last line (a killed writer) is skipped;
    any other line that is not a usable record (:func:`record_problem`) is one LinftError naming file and line."""
    records = []
    for path in record_files(paths):
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            raise LinftError(f"cannot read run records {path} ({exc.strerror}); check its permissions") from None
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
    return finals_of(read_records(existing) if existing else [])


def finals_of(records: list[dict]) -> dict[str, dict]:
    """:func:`final_records` of records already read."""
    return {r["run_id"]: r for r in records if r.get("final")}


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

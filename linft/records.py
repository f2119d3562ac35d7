"""Run records: one JSON line per evaluation point of one run.

Every training method writes the same fields, so that selection, tables and
plots (:mod:`linft.protocol`, :mod:`linft.report`) read nothing else:

``method``, ``label`` (method and variant, the unit a report compares),
``dataset``, ``cache_provenance`` (or another source identity),
``test_domain``, ``train_domains``, ``hparams`` (all of them), ``grid`` (the
hyper-parameters that vary inside one label: the cloud's grid points),
``seed``, ``run_id``, ``attempt``, ``step``, ``splits``
(``{"<domain>_in"|"<domain>_out": [correct, total]}``), ``loss``,
``status`` (``ok`` or ``diverged``) and ``final`` (true on the run's last record).

Files are only ever appended to, one complete line per write, flushed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from linft.errors import LinftError

RECORDS_FILE = "records.jsonl"


def run_id(**identity) -> str:
    """A short stable id of a run from what defines it (method, source, domain, hyper-parameters, seed)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


REQUIRED_FIELDS = ("run_id", "label", "test_domain", "train_domains", "seed", "step", "splits")


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
    """Appends records to ``path`` (JSON lines), one flushed line each."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_last_line(self.path)
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise LinftError(f"cannot write run records to {self.path} ({exc.strerror}); choose another --out") from None

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

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


def read_records(paths) -> list[dict]:
    """All records of the given files or folders. A torn last line (a killed writer) is skipped."""
    records = []
    for path in record_files(paths):
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # the last, unterminated line of a killed writer
                    continue
                raise LinftError(f"{path} line {i + 1} is not JSON; it is not a linft record file") from None
            if not isinstance(record, dict) or any(k not in record for k in REQUIRED_FIELDS):
                raise LinftError(f"{path} line {i + 1} is not a linft run record (needs {', '.join(REQUIRED_FIELDS)}); "
                                 f"pass only linft record files or folders")
            records.append(record)
    return records


def finished_run_ids(paths) -> set[str]:
    """Ids of runs that have a final record in the existing files (missing files: none)."""
    existing = [p for p in map(Path, paths) if p.exists()]
    if not existing:
        return set()
    return {r["run_id"] for r in read_records(existing) if r.get("final")}

"""The run folder: one object that names every file of a fine-tuning run (it imports no torch).

``OUT/<run_id>/`` holds ``run.json`` (what the run is), ``records.jsonl``,
``checkpoint.pt`` while it trains (resume), and ``selected.pt`` (the model at
the best-i.i.d. step: what ensembles, soups and interpolation use; its format and its one writer and reader:
:mod:`linft.train.finetune.selected`). The sweep folder around run folders is
:class:`linft.train.sweeps.folder.SweepFolder`. A run is
done when its records hold its final record (the one rule of
:func:`linft.protocol.records.finished_run_ids`); its status is that record's.
What a run's id is made of is :func:`linft.train.finetune.run.run_identity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from linft.protocol.identity import run_id
from linft.protocol.records import RECORDS_FILE, final_records

CHECKPOINT_FILE = "checkpoint.pt"
SELECTED_FILE = "selected.pt"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class RunFolder:
    """``root = OUT/<run_id>``: every file of one run."""

    root: Path

    @classmethod
    def of(cls, out_dir, identity: dict) -> "RunFolder":
        """The folder of the run ``identity`` (:func:`run_identity`) under ``out_dir``."""
        return cls(Path(out_dir) / run_id(**identity))

    @property
    def run_id(self) -> str:
        return self.root.name

    run_json = property(lambda self: self.root / RUN_FILE, doc="what the run is (its identity)")
    records = property(lambda self: self.root / RECORDS_FILE, doc="one record per evaluation")
    checkpoint = property(lambda self: self.root / CHECKPOINT_FILE, doc="the state to resume from, while it trains")
    selected = property(lambda self: self.root / SELECTED_FILE, doc="the model at the best-i.i.d. step")

    def final_status(self) -> str | None:
        """``ok`` or ``diverged`` once the run's final record is on disk; None while it is not done."""
        final = final_records([self.records]).get(self.run_id)
        return final.get("status", "ok") if final else None

    def is_done(self) -> bool:
        return self.final_status() is not None

"""The run folder: one object that names every file of a fine-tuning run, and what a run's id is made of.

``OUT/<run_id>/`` holds ``run.json`` (what the run is), ``records.jsonl``,
``checkpoint.pt`` while it trains (resume), and ``selected.pt`` (the model at
the best-i.i.d. step: what ensembles, soups and interpolation use). A run is
done when its records hold its final record (the one rule of
:func:`linft.protocol.records.finished_run_ids`); its status is that record's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from linft.errors import LinftError
from linft.models.checkpoints import load_checkpoint
from linft.protocol.records import RECORDS_FILE, final_records, run_id
from linft.train.finetune_model import FineTuneConfig, FineTuneRun
from linft.train.lp_ft import lp_ft_identity

CHECKPOINT_FILE = "checkpoint.pt"
SELECTED_FILE = "selected.pt"
RUN_FILE = "run.json"


def run_identity(run: FineTuneRun, backbone: str, weights_sha256: str, dataset_sha256: str,
                 config: FineTuneConfig) -> dict:
    """Everything that defines a run's result (its id is the hash of this); an LP-FT run adds its probe's source."""
    identity = {"method": "finetune", "backbone": backbone, "weights_sha256": weights_sha256,
                "dataset": dataset_sha256, "run": run.identity(), "protocol": config.protocol()}
    if run.lp_ft:
        identity["lp_ft"] = lp_ft_identity(config)
    return identity


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


def load_selected(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of a ``selected.pt`` (a run folder, or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTED_FILE
    if not path.is_file():
        raise LinftError(f"{path} does not exist; pass a run folder of `linft finetune` or its selected.pt")
    obj = load_checkpoint(path, "checkpoint", "pass a run's selected.pt")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise LinftError(f"{path} is not a linft fine-tuning checkpoint (no state_dict); pass a run's selected.pt")
    return obj["state_dict"], dict(obj.get("metadata") or {})

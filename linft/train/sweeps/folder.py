"""The sweep folder: one object that names every file of a sweep (it imports no torch), as submitit's ``JobPaths``
names those of a job.

``OUT/`` (the ``out_dir`` of ``train-linear``, ``finetune``, ``demo``'s stages) holds:

* ``planned.json``: the plan, every run of the grid asked for (:mod:`linft.train.sweeps.plan`), so that runs not
  started yet count as *to do* in ``linft status``;
* ``records.jsonl``: the records of the linear protocol (one file for the whole grid);
* ``<run_id>/``: one fine-tuning run's folder (:class:`~linft.train.finetune.run_folder.RunFolder`);
* ``across_runs/records.jsonl``: the ensembles and soups of the grid's selected models;
* ``submitit/<job id>/``: the logs and pickles of the jobs of the ``slurm`` and ``submitit-local`` launchers.

The names are those of every release so far (existing folders stay readable); no module spells them but this one,
:mod:`linft.protocol.records` (``records.jsonl``) and :mod:`linft.train.finetune.run_folder` (a run's files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from linft.protocol.records import RECORDS_FILE
from linft.train.finetune.run_folder import RunFolder

PLAN_FILE = "planned.json"
ACROSS_RUNS_FOLDER = "across_runs"
SUBMITIT_FOLDER = "submitit"
#: submitit replaces ``%j`` with the job's id
SUBMITIT_JOB = "%j"


@dataclass(frozen=True)
class SweepFolder:
    """``root = OUT``: every file of one sweep."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    plan = property(lambda self: self.root / PLAN_FILE, doc="every run of the grid asked for")
    records = property(lambda self: self.root / RECORDS_FILE, doc="the linear protocol's records")
    across_runs = property(lambda self: self.root / ACROSS_RUNS_FOLDER, doc="ensembles and soups across runs")
    across_runs_records = property(lambda self: self.across_runs / RECORDS_FILE,
                                   doc="the records of the ensembles and soups across runs")
    submitit = property(lambda self: self.root / SUBMITIT_FOLDER, doc="submitit's logs, one folder per job")
    submitit_jobs = property(lambda self: self.submitit / SUBMITIT_JOB,
                             doc="the folder pattern given to submitit (``%j``: the job id)")

    def run(self, run_id: str) -> RunFolder:
        """The folder of the fine-tuning run ``run_id``."""
        return RunFolder(self.root / run_id)

    def run_of(self, identity: dict) -> RunFolder:
        """The folder of the fine-tuning run ``identity`` (:func:`linft.train.finetune.run.run_identity`)."""
        return RunFolder.of(self.root, identity)

    def plans(self) -> list[Path]:
        """Every plan file under this folder (a demo's folder holds the plans of its stages), sorted."""
        return sorted(self.root.rglob(PLAN_FILE))

"""What a launch did: one typed outcome per run (:class:`RunStatus`), the jobs submitted, and the sweep's summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from linft.data.images import EvalImages
from linft.train.finetune.model import FineTuneRun


class RunStatus(str, Enum):
    """What a launch did with one run (its value is the word the CLI prints)."""

    TRAINED = "trained"  # trained from step 0 by this launch
    RESUMED = "resumed"  # resumed from its checkpoint and finished by this launch
    DONE = "done"  # already finished before this launch (skipped)
    DIVERGED = "diverged"  # trained by this launch until its loss was not finite
    FAILED = "failed"  # its job raised (``LaunchedRun.detail``: the last line of the error)
    SUBMITTED = "submitted"  # submitted to Slurm and not waited for

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class LaunchedRun:
    """One run of a launch: what it is, where its folder is, what this launch did with it (``status``) and its final
    record's status once the launch returned (``final``: ``ok``, ``diverged``, or None while it is not done)."""

    run: FineTuneRun
    run_id: str
    run_dir: Path
    status: RunStatus
    final: str | None = None
    detail: str | None = None  # why it failed


@dataclass
class LaunchResult:
    """The runs of one :func:`~linft.train.sweeps.launch.launch_sweep` call, in the order they were given.

    ``jobs``: the ids of the jobs submitted (submitit launchers); ``usable``: runs whose final record is ``ok``;
    ``divergence``: one line on the runs that diverged (:func:`linft.train.sweeps.status.divergence_note`) or None;
    ``across_runs``: the records file of the ensembles and soups across runs, when they were evaluated;
    ``eval_images``: the evaluation images decoded in this process (the inline launcher), to reuse.
    """

    out: Path
    runs: list[LaunchedRun]
    jobs: list[str] = field(default_factory=list)
    usable: int = 0
    divergence: str | None = None
    across_runs: Path | None = None
    eval_images: EvalImages | None = None

    def count(self, status: RunStatus) -> int:
        return sum(r.status == status for r in self.runs)

    @property
    def skipped(self) -> int:
        """Runs finished before this launch."""
        return self.count(RunStatus.DONE)

    @property
    def launched(self) -> int:
        """Runs this launch trained, resumed or submitted (every run but the skipped ones)."""
        return len(self.runs) - self.skipped

    @property
    def failed(self) -> list[LaunchedRun]:
        return [r for r in self.runs if r.status == RunStatus.FAILED]

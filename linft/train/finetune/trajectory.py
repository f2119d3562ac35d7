"""Trajectory ensembles and weight averages of one fine-tuning run, written as records of derived runs.

From the first evaluation after step 0 (the step-0 model is the pretrained
network with a barely trained head), every evaluation adds the run's current
model to an output ensemble (:class:`~linft.train.finetune.ensembles.RunningEnsemble`)
and to a weight average (:class:`~linft.models.averaging.RunningAverage`;
``config.average_every_step``: every step, as the official code), and each is
evaluated and recorded as its own run (``<method>-trajectory-ensemble``,
``<method>-trajectory-average``). Their state travels in the run's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from linft.errors import LinftError
from linft.models.averaging import RunningAverage
from linft.models.heads import build_classifier
from linft.models.registry import load_backbone
from linft.protocol.identity import run_id
from linft.protocol.records import RecordWriter, derived
from linft.protocol.selection import predicted_classes, split_counts
from linft.train.finetune.ensembles import RunningEnsemble
from linft.train.finetune.model import FineTuneConfig, ordinary_state

KINDS = {"ensemble": "trajectory-ensemble", "average": "trajectory-average"}


class Trajectory:
    """The trajectory ensemble and weight average of one run."""

    def __init__(self, identity: dict, config: FineTuneConfig, backbone: str):
        self.config, self.backbone = config, backbone
        self.ids = {k: run_id(**identity, derived=k, rule=config.ensemble_rule if k == "ensemble" else None,
                              every_step=config.average_every_step if k == "average" else None) for k in KINDS}
        self.average = RunningAverage()
        self.ensemble = RunningEnsemble(rule=config.ensemble_rule)
        self.start = min(config.eval_every, config.steps - 1)
        self._model: nn.Module | None = None

    def header(self, run, kind: str):
        method, label = derived(run.header.method, run.header.label, KINDS[kind])
        return run.header.replace(method=method, label=label, run_id=self.ids[kind])

    def after_step(self, model: nn.Module, step: int) -> None:
        """Every step: the official code's every-step average, when asked for."""
        if self.config.average_every_step and step >= self.start:
            self.average.update(ordinary_state(model))

    def evaluate(self, run, writer: RecordWriter, step: int, logits: torch.Tensor, final: bool) -> None:
        """At an evaluation: add the model, evaluate the ensemble and the average, write their records."""
        if step < self.start:
            return
        ds = run.dataset
        self.ensemble.add(logits)
        ens_splits = split_counts(predicted_classes(self.ensemble.scores()), ds.labels, run.split_rows, ds.domains)
        run.write(writer, self.header(run, "ensemble"), step, ens_splits, None, "ok", final)
        if not self.config.average_every_step:
            self.average.update(ordinary_state(run.model))
        if self._model is None:
            dev = next(run.model.parameters()).device
            # the architecture only: the average's weights replace every entry (no weights file read again)
            self._model = build_classifier(load_backbone(self.backbone, "none").model, len(ds.classes),
                                           run.run.dropout).to(dev)
        self._model.load_state_dict(self.average.value(), strict=True)
        _, avg_splits = run.evaluate(self._model)
        run.write(writer, self.header(run, "average"), step, avg_splits, None, "ok", final)

    def diverged(self, run, writer: RecordWriter, step: int) -> None:
        """The run diverged: so did the ensemble and average of its trajectory."""
        for kind in KINDS:
            run.write(writer, self.header(run, kind), step, {}, None, "diverged", True)

    def state_dict(self) -> dict:
        """Checkpoint entries (tensors and plain values)."""
        return {"average": self.average.state_dict(), "ensemble": self.ensemble.state_dict()}

    def load_state_dict(self, checkpoint: dict, path: Path) -> None:
        """Continue from a run's checkpoint; one written without trajectory state is refused."""
        if checkpoint.get("average") is None or checkpoint.get("ensemble") is None:
            raise LinftError(f"{path} was written without ensembles (trajectory); resume this run without them, "
                             f"or delete the checkpoint to restart it with them", param="ensembles")
        self.average.load_state_dict(checkpoint["average"])
        self.ensemble.load_state_dict(checkpoint["ensemble"])

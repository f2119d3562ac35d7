"""Observers of fine-tuning runs: what a run tells (:class:`RunHooks`), one line per evaluation
(:func:`eval_logger`) and the hooks of a watched sweep (:func:`watch_hooks`: that line and TensorBoard)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from linft.protocol.schedule import lr_at, milestone_steps
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.protocol.sinks import TensorBoardSink


@dataclass
class EvalEvent:
    """What :attr:`RunHooks.on_eval` receives: the step, the run's record of it, and the model (do not modify)."""

    step: int
    record: dict
    model: nn.Module


@dataclass
class RunHooks:
    """Observers of a run. ``on_eval(EvalEvent)`` after an evaluation's records are written; ``on_checkpoint(step,
    path)`` after its checkpoint is on disk; ``on_step(step)`` after every step; ``say(line)`` for one-line news;
    ``sinks``: metrics streams that receive every record the run writes (``RecordWriter(..., sinks=)``)."""

    on_eval: Callable[[EvalEvent], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    on_step: Callable[[int], None] | None = None
    say: Callable[[str], None] | None = None
    sinks: tuple = ()

    def tell(self, line: str) -> None:
        if self.say is not None:
            self.say(line)


def eval_logger(say: Callable[[str], None]) -> Callable[[EvalEvent], None]:
    """An ``on_eval`` hook that says one line per evaluation: the run (id, held-out domain, seed), step, learning
    rate, training loss, i.i.d. accuracy and the best so far (in this process), o.o.d. accuracy."""
    best: dict[str, tuple[float, int]] = {}

    def on_eval(event: EvalEvent) -> None:
        r, h = event.record, event.record["hparams"]
        iid, ood = iid_accuracy(r), ood_accuracy(r)
        if iid > best.get(r["run_id"], (-1.0, 0))[0]:
            best[r["run_id"]] = (iid, event.step)
        top, at = best[r["run_id"]]
        lr = lr_at(event.step, h["lr"], milestone_steps(h["lr_milestones"], h["steps"]))
        loss = "?" if r.get("loss") is None else f"{r['loss']:.4g}"
        say(f"{r['run_id'][:8]} {r['test_domain']} seed {r['seed']}: step {event.step} of {h['steps']}, lr {lr:.3g}, "
            f"loss {loss}, i.i.d. {100 * iid:.1f}% (best {100 * top:.1f}% at step {at}), o.o.d. {100 * ood:.1f}%")
    return on_eval


def watch_hooks(say: Callable[[str], None] | None = None, tensorboard_dir=None) -> RunHooks:
    """The hooks of a watched sweep: ``say`` for news and one :func:`eval_logger` line per evaluation (nothing
    when None), and TensorBoard event files of every record under ``tensorboard_dir`` (when given)."""
    return RunHooks(on_eval=eval_logger(say) if say is not None else None, say=say,
                    sinks=(TensorBoardSink(tensorboard_dir),) if tensorboard_dir is not None else ())

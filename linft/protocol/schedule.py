"""The protocol's schedule: its settings (:class:`Schedule`, the paper's :data:`PAPER` and DomainNet's
:data:`DOMAINNET`), the learning rate at a step, and the steps at which runs are evaluated."""

from __future__ import annotations

from dataclasses import dataclass, fields

from linft.errors import LinftError


def lr_at(step: int, base_lr, milestones: tuple[int, ...]):
    """Learning rate at ``step``: ``base_lr`` divided by 10 at each milestone reached."""
    return base_lr * 0.1 ** sum(step >= m for m in milestones)


def milestone_steps(milestones, steps: int) -> tuple[int, ...]:
    """Milestones as step numbers: a value up to 1 is a fraction of ``steps`` (``(0.5,)``: lr ÷10 at half), a
    larger one a step number (``(5000, 10000)`` with 10,001 steps: the official code's schedule, whose last
    update runs at lr/100; ``(15000, 25000)``: its DomainNet schedule)."""
    return tuple(int(round(m * steps)) if m <= 1 else int(m) for m in milestones)


def check_milestones(milestones) -> None:
    """One-line errors for milestones that are neither fractions in (0, 1] nor whole step numbers above 1 (a step
    number at or past the run's last step is never reached, as the fraction 1)."""
    for m in milestones:
        if not (0 < m <= 1 or (m > 1 and float(m).is_integer())):
            raise LinftError(f"lr_milestones {m:g} is neither a fraction of steps in (0, 1] nor a whole step "
                             f"number; e.g. 0.5, or 5000 with steps=10001", param="lr_milestones")


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """DomainBed's evaluation steps: every ``eval_every`` steps from 0, and the last step."""
    return sorted(set(range(0, steps, eval_every)) | {steps - 1})


def decay_shrinkage(schedule: "Schedule", lr: float, weight_decay: float) -> float:
    """The fraction by which weight decay alone shrinks a weight over ``schedule`` at base ``lr``:
    ``1 − Π_t (1 − lr_t · weight_decay / (1 − momentum))``, ``lr_t`` the lr of step ``t`` (:func:`lr_at`) and
    ``lr_t / (1 − momentum)`` SGD's steady-state step with momentum. Its scale says whether the weight decays of
    a grid can change a result: far below one part in a thousand, they can hardly change a prediction."""
    milestones = schedule.milestone_steps()
    kept = 1.0
    for t in range(schedule.steps):
        kept *= 1.0 - lr_at(t, lr, milestones) * weight_decay / (1.0 - schedule.momentum)
    return 1.0 - kept


@dataclass(frozen=True)
class Schedule:
    """How long and how a run trains: SGD steps, examples per training domain per step, evaluation period,
    momentum, and where the lr is divided by 10 (:func:`milestone_steps`). The defaults are the paper's (:data:`PAPER`).

    The configurations of linear fine-tuning and full fine-tuning are schedules with more fields
    (:class:`linft.train.linear.engine.LinearGridConfig`, :class:`linft.train.finetune.model.FineTuneConfig`).
    """

    steps: int = 10_000
    batch_size: int = 32  # per training domain
    eval_every: int = 300
    momentum: float = 0.9
    lr_milestones: tuple[float, ...] = (0.5,)  # fractions of ``steps``, or step numbers (> 1)

    def milestone_steps(self) -> tuple[int, ...]:
        return milestone_steps(self.lr_milestones, self.steps)

    def eval_steps(self) -> list[int]:
        return eval_steps(self.steps, self.eval_every)

    def schedule(self) -> "Schedule":
        """The schedule alone (of a configuration that extends it)."""
        return Schedule(**{f.name: getattr(self, f.name) for f in fields(Schedule)})

    def has_paper_milestones(self) -> bool:
        """Whether the lr drops at the steps where :data:`PAPER`'s milestones put them for this many steps."""
        return self.milestone_steps() == milestone_steps(PAPER.lr_milestones, self.steps)

    def check(self) -> None:
        """One-line errors for a schedule that cannot run."""
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise LinftError(f"{name} must be at least 1, got {getattr(self, name)}", param=name)
        check_milestones(self.lr_milestones)


#: The paper's schedule (Section 4; DomainBed's): 10,000 steps of 32 examples per training domain, momentum 0.9,
#: lr ÷10 at half, evaluation every 300 steps and at the last.
PAPER = Schedule()

#: The paper's DomainNet schedule (appendix A.2): 30,000 steps, lr ÷10 at 15,000 and 25,000; evaluation every 1,000
#: steps, as the official code (the paper does not say).
DOMAINNET = Schedule(steps=30_000, eval_every=1_000, lr_milestones=(15_000, 25_000))

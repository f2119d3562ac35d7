"""The protocol's schedule: the learning rate at a step, and the steps at which runs are evaluated."""

from __future__ import annotations

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

"""The protocol's schedule: the learning rate at a step, and the steps at which runs are evaluated."""

from __future__ import annotations


def lr_at(step: int, base_lr, milestones: tuple[int, ...]):
    """Learning rate at ``step``: ``base_lr`` divided by 10 at each milestone reached."""
    return base_lr * 0.1 ** sum(step >= m for m in milestones)


def milestone_steps(fractions, steps: int) -> tuple[int, ...]:
    """Milestones given as fractions of ``steps`` (``(0.5,)``: lr ÷10 at half) as step numbers."""
    return tuple(int(round(m * steps)) for m in fractions)


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """DomainBed's evaluation steps: every ``eval_every`` steps from 0, and the last step."""
    return sorted(set(range(0, steps, eval_every)) | {steps - 1})

"""Output ensembles: the ensemble of several models' logits, at once or accumulated one model at a time.

Ensembles default to the mean of softmax probabilities (``rule="probs"``);
``rule="logits"`` is the mean of logits (the official code sums logits, which
has the same argmax). Weight averages are :mod:`linft.models.averaging`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from linft.errors import LinftError

ENSEMBLE_RULES = ("probs", "logits")


def _check_rule(rule: str) -> None:
    if rule not in ENSEMBLE_RULES:
        raise LinftError(f"unknown ensemble rule {rule!r}; choose one of: {', '.join(ENSEMBLE_RULES)}", param="rule")


def _model_scores(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """One model's contribution in at least float32: softmax probabilities or the logits themselves."""
    x = logits.detach().to(torch.promote_types(logits.dtype, torch.float32))
    return torch.softmax(x, dim=-1) if rule == "probs" else x


def ensemble_scores(outputs: torch.Tensor | Sequence[torch.Tensor], rule: str = "probs") -> torch.Tensor:
    """The (N, C) ensemble scores of M models' logits (M, N, C): mean of softmax probabilities (``"probs"``) or
    of logits (``"logits"``)."""
    _check_rule(rule)
    if not isinstance(outputs, torch.Tensor):
        outputs = list(outputs)
        if not outputs:
            raise LinftError("no model outputs to ensemble; pass at least one (N, C) tensor of logits")
        try:
            outputs = torch.stack(list(outputs))
        except RuntimeError as exc:
            raise LinftError(f"model outputs differ in shape ({exc}); "
                             "pass logits of every model on the same examples") from None
    if outputs.dim() != 3 or outputs.shape[0] == 0:
        raise LinftError("outputs must have shape (models, examples, classes) with at least one model, "
                         f"got {tuple(outputs.shape)}")
    return _model_scores(outputs, rule).mean(dim=0)


class RunningEnsemble:
    """The ensemble of the models seen so far on one fixed evaluation set, without storing their outputs.

    ``add(logits)`` adds one model's (N, C) logits; ``scores()`` equals
    ``ensemble_scores`` of all the logits added, with the same ``rule``.
    """

    def __init__(self, rule: str = "probs"):
        _check_rule(rule)
        self.rule = rule
        self.count = 0
        self._sum: torch.Tensor | None = None

    def add(self, logits: torch.Tensor) -> None:
        """Add one model's (N, C) logits on the evaluation set."""
        if logits.dim() != 2:
            raise LinftError(f"logits must have shape (examples, classes), got {tuple(logits.shape)}")
        scores = _model_scores(logits, self.rule)
        if self._sum is None:
            self._sum = scores.clone()
        else:
            if scores.shape != self._sum.shape:
                raise LinftError(f"logits of shape {tuple(scores.shape)} do not match the first model's "
                                 f"{tuple(self._sum.shape)}; add every model's logits on the same examples")
            self._sum += scores.to(self._sum.device, self._sum.dtype)
        self.count += 1

    def scores(self) -> torch.Tensor:
        """The (N, C) ensemble scores of the models added so far."""
        if self._sum is None:
            raise LinftError("the running ensemble is empty; add at least one model's logits first")
        return self._sum / self.count

    def state_dict(self) -> dict:
        """Plain values and tensors only, for resuming."""
        return {"rule": self.rule, "count": self.count, "sum": self._sum}

    def load_state_dict(self, state: dict) -> None:
        """Continue the ensemble saved by :meth:`state_dict`."""
        _check_rule(state["rule"])
        self.rule, self.count, self._sum = state["rule"], int(state["count"]), state["sum"]

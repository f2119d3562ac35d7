"""Weight averages of fine-tuned models: small pure functions from state_dicts to a state_dict.

Weight averaging (model soups, DiWA, trajectory averaging, interpolation):

- :func:`average_state_dicts` — the weighted (default uniform) average of
  several state_dicts; the one function every weight average goes through.
- :func:`interpolate_state_dicts` — ``(1-α)·start + α·end``.
- :class:`RunningAverage` — the uniform mean of a stream of state_dicts
  (checkpoints along one trajectory) without storing them.
- :func:`greedy_soup` — Wortsman et al.'s greedy soup; :func:`soup_order` — its candidates' order, as
  model-soups' code sorts them.

Output ensembles are :mod:`linft.train.finetune.ensembles`.

Conventions:

- α is the share of the *fine-tuned* end: ``α = 0`` is the pretrained (start)
  model, ``α = 1`` the fine-tuned (end) model. (The paper's appendix writes α
  for the pretrained share.)
- Every entry of a state_dict is handled on purpose. Key sets, shapes and
  dtypes must be identical across the inputs, or a :class:`LinftError` says
  which entry differs (average only checkpoints of the same architecture and
  class set; a different class count shows up as the head's shape).
  Floating-point (and complex) entries, parameters and float buffers such as
  BatchNorm running statistics alike, are accumulated in float64 (or wider)
  and cast back to the entry's dtype; an element equal in every model is
  kept exactly (so averaging identical checkpoints is the identity, bit for
  bit, in every dtype, and equal ``±inf`` mask values stay). Integer and bool entries (BatchNorm's
  ``num_batches_tracked``, a counter whose mean means nothing) never go
  through float: the result is their element-wise maximum over the models
  with a positive weight, so equal values are kept exactly.
- Weights must be finite and non-negative with a positive sum; they are
  normalised to sum 1 (the result is ``Σ w_i x_i / Σ w_i``). A model with
  weight 0 takes no part in the result (its keys and shapes are still
  checked), so interpolation end points are exact.
- Inputs are never modified; results are new tensors on the device of the
  first state_dict's entry, with keys in the first state_dict's order.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from linft.errors import LinftError
from linft.models.checkpoints import check_state_dict

StateDict = Mapping[str, torch.Tensor]

_WHAT_TO_DO = "average only checkpoints of the same architecture and class set"


def _is_inexact(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for real floating dtypes (float64 itself included), complex128 for complex ones."""
    return torch.promote_types(dtype, torch.float64)


def check_compatible(state_dicts: Sequence[StateDict]) -> None:
    """Raise :class:`LinftError` unless every state_dict has the first one's keys, tensor entries, shapes and dtypes."""
    if len(state_dicts) == 0:
        raise LinftError("no state_dicts to average; pass at least one")
    first = state_dicts[0]
    check_state_dict(first, first, "state_dict 0", "state_dict 0", _WHAT_TO_DO)
    for i, sd in enumerate(state_dicts[1:], start=1):
        check_state_dict(sd, first, f"state_dict {i}", "state_dict 0", _WHAT_TO_DO, dtypes=True)


def _check_weights(weights, count: int) -> list[float]:
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise LinftError(f"weights must be a sequence of numbers, got {weights!r}") from None
    if len(values) != count:
        raise LinftError(f"got {len(values)} weights for {count} state_dicts; pass one weight per state_dict")
    if not all(math.isfinite(w) for w in values):
        raise LinftError(f"weights must be finite, got {values}")
    if any(w < 0 for w in values):
        raise LinftError(f"weights must be non-negative, got {values}")
    if sum(values) <= 0:
        raise LinftError(f"weights must have a positive sum, got {values}")
    return values


def average_state_dicts(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The weighted (default uniform) average ``Σ w_i sd_i / Σ w_i`` of state_dicts of one architecture.

    Float entries are accumulated in float64 and cast back to their dtype
    (elements equal in every model are kept exactly); integer and bool
    entries are the element-wise maximum over the models with
    a positive weight (never a float round-trip). Keys, shapes and dtypes must
    match (:class:`LinftError` otherwise). Inputs are not modified.
    """
    state_dicts = list(state_dicts)
    check_compatible(state_dicts)
    w = [1.0] * len(state_dicts) if weights is None else _check_weights(weights, len(state_dicts))
    used = [(wi, sd) for wi, sd in zip(w, state_dicts) if wi > 0]
    total = sum(wi for wi, _ in used)
    out: dict[str, torch.Tensor] = {}
    for key, t0 in state_dicts[0].items():
        device = t0.device
        if _is_inexact(t0):
            first = used[0][1][key].detach().to(device)
            acc = torch.zeros(t0.shape, dtype=_accumulation_dtype(t0.dtype), device=device)
            same = torch.ones(t0.shape, dtype=torch.bool, device=device)
            for wi, sd in used:
                t = sd[key].detach().to(device)
                acc.add_(t.to(acc.dtype), alpha=wi)
                same &= t == first
            out[key] = torch.where(same, first, acc.div_(total).to(t0.dtype))
        else:
            result = used[0][1][key].detach().to(device).clone()
            for _, sd in used[1:]:
                result = torch.maximum(result, sd[key].detach().to(device))
            out[key] = result
    return out


def interpolate_state_dicts(start: StateDict, end: StateDict, alpha: float) -> dict[str, torch.Tensor]:
    """``(1-α)·start + α·end``: α is the share of ``end`` (the fine-tuned model); α = 0 gives ``start`` exactly,
    α = 1 ``end``."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise LinftError(f"alpha must be a number in [0, 1], got {alpha!r}", param="alpha") from None
    if not 0.0 <= a <= 1.0:
        raise LinftError(f"alpha must lie in [0, 1] (0 = start/pretrained, 1 = end/fine-tuned), got {alpha!r}",
                         param="alpha")
    return average_state_dicts([start, end], weights=[1.0 - a, a])


class RunningAverage:
    """The uniform mean of a stream of state_dicts, without storing them.

    Float entries are summed in float64 (on the first state_dict's devices)
    and divided by ``count`` in :meth:`value`, cast back to their dtype, with
    elements equal in every update kept exactly (so it keeps a copy of the
    first state_dict and a mask); integer and bool entries keep their running
    element-wise maximum. The
    result equals ``average_state_dicts`` of the same stream. Each
    ``update`` copies what it needs, so live ``model.state_dict()`` tensors
    can be passed.
    """

    def __init__(self):
        self._template: dict[str, torch.Tensor] | None = None  # first state_dict's shapes/dtypes/devices (meta copies)
        self._acc: dict[str, torch.Tensor] = {}
        self._first: dict[str, torch.Tensor] = {}  # float entries: the first value and where every update equalled it
        self._same: dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, state_dict: StateDict) -> None:
        """Add one state_dict to the mean (its keys, shapes and dtypes must match the first one's)."""
        if self._template is None:
            check_compatible([state_dict])
            self._template = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in state_dict.items()}
            self._devices = {k: t.device for k, t in state_dict.items()}
            for key, t in state_dict.items():
                if _is_inexact(t):
                    self._acc[key] = t.detach().to(dtype=_accumulation_dtype(t.dtype), copy=True)
                    self._first[key] = t.detach().clone()
                    self._same[key] = torch.ones(t.shape, dtype=torch.bool, device=t.device)
                else:
                    self._acc[key] = t.detach().clone()
        else:
            check_compatible([self._template, _as_meta(state_dict)])
            for key, acc in self._acc.items():
                t = state_dict[key].detach().to(self._devices[key])
                if _is_inexact(t):
                    acc.add_(t.to(acc.dtype))
                    self._same[key] &= t == self._first[key]
                else:
                    self._acc[key] = torch.maximum(acc, t)
        self.count += 1

    def value(self) -> dict[str, torch.Tensor]:
        """The mean so far, as a new state_dict with the inputs' dtypes."""
        if self._template is None:
            raise LinftError("the running average is empty; update it with at least one state_dict first")
        out = {}
        for key, acc in self._acc.items():
            if _is_inexact(acc):
                mean = (acc / self.count).to(self._template[key].dtype)
                out[key] = torch.where(self._same[key], self._first[key], mean)
            else:
                out[key] = acc.clone()
        return out

    def state_dict(self) -> dict:
        """Tensors and plain values only (``torch.save`` + ``torch.load(weights_only=True)``), for resuming."""
        return {"count": self.count, "acc": dict(self._acc), "first": dict(self._first), "same": dict(self._same)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by :meth:`state_dict` (tensors stay on the device they were loaded to)."""
        self.count = int(state["count"])
        self._acc, self._first, self._same = dict(state["acc"]), dict(state["first"]), dict(state["same"])
        if self.count:
            dtypes = {k: (self._first[k].dtype if k in self._first else a.dtype) for k, a in self._acc.items()}
            self._template = {k: torch.empty(a.shape, dtype=dtypes[k], device="meta") for k, a in self._acc.items()}
            self._devices = {k: a.device for k, a in self._acc.items()}


def _as_meta(state_dict: StateDict) -> dict:
    """Shape/dtype stand-ins for the compatibility check (non-tensors kept so the check can name them)."""
    return {k: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t
            for k, t in state_dict.items()}


def soup_order(scores: Sequence[float]) -> list[int]:
    """The candidates' indices in model-soups' greedy-soup order: by decreasing held-out score, and among tied
    scores the later-listed candidate first. model-soups' ``main.py`` sorts ``(name, accuracy)`` pairs by
    accuracy (ascending, a stable sort) and then reverses the list; this is that order, not "ties by listing"."""
    ascending = sorted(range(len(scores)), key=lambda i: scores[i])
    return ascending[::-1]


def greedy_soup(candidates: Sequence[StateDict], evaluate: Callable[[StateDict], float], strict: bool = False
                ) -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """Wortsman et al.'s greedy soup: add each candidate to the uniform average if the score does not drop.

    ``candidates`` must already be sorted by decreasing validation (i.i.d.)
    accuracy (:func:`soup_order`: model-soups' order, ties later-listed first).
    The soup starts as the first candidate; each next candidate is
    tried as the uniform average of the chosen ones plus it and kept when
    ``evaluate(average) >= best`` (ties keep the candidate, as the paper's
    "does not decrease"); ``strict=True`` keeps it only when ``> best``, as
    model-soups' code does. Returns the soup's state_dict, the chosen indices
    and ``scores[i]``, the score of the trial with candidate ``i`` (``scores[0]``
    that of the first candidate alone).
    """
    candidates = list(candidates)
    check_compatible(candidates)  # fail before any evaluation

    def score(sd) -> float:
        value = float(evaluate(sd))
        if math.isnan(value):
            raise LinftError("evaluate returned nan; it must return a number such as the validation accuracy")
        return value

    chosen = [0]
    soup = average_state_dicts([candidates[0]])
    best = score(soup)
    scores = [best]
    for i in range(1, len(candidates)):
        trial = average_state_dicts([candidates[j] for j in chosen + [i]])
        s = score(trial)
        scores.append(s)
        if s > best or (s == best and not strict):
            chosen.append(i)
            soup, best = trial, s
    return soup, chosen, scores

"""Classifier heads: the fine-tuning head ``Dropout(λ) → Linear(D, C)``, the linear-probe head, and their weights.

* :func:`build_classifier` puts the paper's head on a torchvision-style
  network (``model.fc``); :func:`classifier_linear` finds its ``Linear``.
* :class:`LinearHead` is a head as plain tensors; :func:`fit_probe_head` fits
  one on frozen features (the pretrained end of an interpolation has no head
  for the task; LP-FT starts from it); :func:`classifier_head`, :func:`load_head`
  and :func:`with_head` read and replace a model's head.
* the dropout rate is checked by :func:`linft.protocol.grid.check_dropout_rate` (the protocol's one check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linft.errors import LinftError
from linft.models.linearize import LinearizedModel, escape_parameter_name
from linft.protocol.grid import check_dropout_rate


#: L2 strength of the probe head's logistic regression: mean cross-entropy + PROBE_L2/2 · ‖W‖².
PROBE_L2 = 1e-4
#: L-BFGS iterations of the probe head's fit (one full-batch ``step``).
PROBE_MAX_ITER = 200
#: L-BFGS stops earlier when the largest gradient entry falls below this.
PROBE_TOLERANCE = 1e-6


def classifier_linear(model: nn.Module) -> nn.Linear:
    """The linear layer of ``model.fc``: ``fc`` itself, or the last module of linft's
    ``Sequential(Dropout, Linear)``."""
    fc = getattr(model, "fc", None)
    linear = fc if isinstance(fc, nn.Linear) else (fc[-1] if isinstance(fc, nn.Sequential) and len(fc) else None)
    if not isinstance(linear, nn.Linear):
        raise LinftError(f"{model.__class__.__name__} has no linear classifier 'fc'; pass a torchvision-style ResNet")
    return linear


def build_classifier(model: nn.Module, num_classes: int, dropout: float, seed: int = 0) -> nn.Module:
    """Replace ``model.fc`` by the head ``Dropout(dropout) → Linear(D, num_classes)`` (in place; returned).

    The linear layer is initialised as ``nn.Linear`` does, from a generator
    seeded with ``seed`` (the global RNG is left untouched).
    """
    dropout = check_dropout_rate(dropout)
    linear = classifier_linear(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(linear.in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(dropout), head).to(linear.weight.device)
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the classifier head ``fc`` (its δ for a linearized model)."""
    if isinstance(model, LinearizedModel):
        return [model.delta[escape_parameter_name(n)] for n in model.parameter_names if n.startswith("fc.")]
    return list(model.fc.parameters())


@dataclass
class LinearHead:
    """A linear classifier ``logits = features @ weight.T + bias``: weight (C, D), bias (C,)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def to(self, device) -> "LinearHead":
        return LinearHead(self.weight.to(device), self.bias.to(device))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)


def fit_probe_head(features: torch.Tensor, labels: torch.Tensor | np.ndarray, num_classes: int,
                   l2: float = PROBE_L2, max_iter: int = PROBE_MAX_ITER) -> LinearHead:
    """A linear-probe head on frozen ``features`` (N, D): full-batch multinomial logistic regression.

    Minimises mean cross-entropy + ``l2``/2 · ‖W‖² (the bias is not
    penalised) with :class:`torch.optim.LBFGS` (strong Wolfe line search,
    ``max_iter`` iterations at most), from W = 0, b = 0, in float32 on the
    features' device: deterministic, no mini-batches, no learning rate to
    tune. This is the pretrained endpoint's head for interpolation and the
    starting head of LP-FT (:mod:`linft.train.finetune.lp_ft`); linear probing
    as a protocol method (SGD, grid, seeds) is
    :func:`linft.train.linear.driver.train_linear` with ``probe=True``.
    """
    x = features.detach().float()
    if x.dim() != 2 or len(x) == 0:
        raise LinftError(f"a probe head needs a non-empty (N, D) feature matrix, got shape {tuple(x.shape)}")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long).to(x.device)
    if y.shape != (len(x),):
        raise LinftError(f"{len(x)} feature rows but {y.numel()} labels; pass one label per row")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise LinftError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    W = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=PROBE_TOLERANCE, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, W, b), y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearHead(W.detach(), b.detach())


def classifier_head(model: nn.Module) -> LinearHead:
    """The last linear layer of ``model.fc`` (a ``Linear`` or linft's ``Sequential(Dropout, Linear)``), detached."""
    try:
        linear = classifier_linear(model)
    except LinftError:
        linear = None
    if linear is None or linear.bias is None:
        raise LinftError(f"{model.__class__.__name__} has no linear classifier 'fc' with a bias; "
                         "pass a torchvision-style ResNet checkpoint of linft finetune")
    return LinearHead(linear.weight.detach().clone(), linear.bias.detach().clone())


def load_head(model: nn.Module, head: LinearHead) -> nn.Module:
    """Copy ``head`` into the last linear layer of ``model.fc`` in place (its dtype and device kept); returns ``model``.

    The layer's parameters stay the same objects, so an optimizer built on the model keeps working.
    """
    linear = classifier_linear(model)
    if tuple(linear.weight.shape) != tuple(head.weight.shape) or linear.bias is None:
        raise LinftError(f"the head has shape {tuple(head.weight.shape)} but the model's classifier has "
                         f"{tuple(linear.weight.shape)}; fit the head on this model's features")
    with torch.no_grad():
        linear.weight.copy_(head.weight)
        linear.bias.copy_(head.bias)
    return model


def head_keys(state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """The state_dict keys ``(weight, bias)`` of the classifier head: ``fc.1.*`` (linft's head) or ``fc.*``."""
    for prefix in ("fc.1.", "fc."):
        if prefix + "weight" in state and prefix + "bias" in state:
            return prefix + "weight", prefix + "bias"
    raise LinftError("the state_dict has no classifier head (fc.1.weight / fc.weight); "
                     "pass a checkpoint of linft finetune")


def single_linear_head(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with linft's fine-tuning head ``fc.1.*`` (``Dropout → Linear``; the dropout has no entries) renamed
    to ``fc.*``, the keys of a network whose classifier is one ``Linear`` (what a backbone is built with); a state
    with ``fc.*`` already, or with no ``fc.1.*``, is returned as it is (a copy)."""
    if "fc.1.weight" not in state or "fc.weight" in state:
        return dict(state)
    return {("fc." + k[len("fc.1."):] if k.startswith("fc.1.") else k): v for k, v in state.items()}


def with_head(state: Mapping[str, torch.Tensor], head: LinearHead) -> dict[str, torch.Tensor]:
    """A copy of ``state`` whose classifier head is ``head`` (same dtype and device as the entries it replaces)."""
    wk, bk = head_keys(state)
    out = dict(state)
    if tuple(out[wk].shape) != tuple(head.weight.shape):
        raise LinftError(f"the head has shape {tuple(head.weight.shape)} but the model's {wk} has "
                         f"{tuple(out[wk].shape)}; fit the head on this model's features")
    out[wk] = head.weight.to(dtype=out[wk].dtype, device=out[wk].device).clone()
    out[bk] = head.bias.to(dtype=out[bk].dtype, device=out[bk].device).clone()
    return out

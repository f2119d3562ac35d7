"""First-order (linearized) models around a pretrained point, built on ``torch.func``.

For a network ``f(x; θ)`` and a reference point ``θ0`` (the pretrained
weights), the first-order Taylor model is::

    f_lin(x; θ0 + δ) = f(x; θ0) + J(x; θ0) δ,      J = ∂f/∂θ at θ0

It is linear in the weight change δ but as non-linear in x as the network
itself. The paper (Section 3.2) argues that fine-tuning stays close to this
regime; this module makes that measurable:

- :class:`LinearizedModel` wraps any ``nn.Module`` as a trainable first-order
  model. Only δ (zero at the start) is a parameter; ``f(x; θ0)`` and ``J δ``
  come out of one :func:`torch.func.jvp` of :func:`torch.func.functional_call`
  with primals θ0 and tangents δ.
- :func:`first_order_terms` / :func:`first_order_path`: along the weight path
  θ(α) = θ0 + α(θf − θ0) the first-order outputs are
  ``f(θ0) + α·J(θf − θ0)``, one jvp for every α.
- :func:`relative_linearity_gap`: ‖f(θf) − f_lin(θf)‖ / ‖f(θf) − f(θ0)‖.

Edge cases:

- **Dropout** is active when the module is in training mode. The network is
  called once inside the jvp, so primal and tangent are multiplied by the same
  mask (dropout's forward-mode derivative reuses the mask of its primal).
- **BatchNorm** is always frozen: it normalises with its running statistics
  and never updates them, even when the :class:`LinearizedModel` is in
  training mode (``train()`` is overridden and ``forward`` re-checks it). This
  is the paper's protocol, and a train-mode BatchNorm inside a jvp fails
  anyway (pytorch issue #85533, in-place update of the running statistics).
- **Attention**: ``nn.MultiheadAttention`` runs its composite path inside the jvp
  and ``scaled_dot_product_attention`` its math backend inside the jvp (:func:`attention_without_fast_path`):
  the fused kernels have no forward-mode derivative.
- At δ = 0 the tangent is exactly zero, so the output equals ``f(x; θ0)``
  bit for bit.

Cost: the jvp carries a tangent next to every activation, so a forward pass
costs about two ordinary forwards; a training step (backward through the jvp)
was measured in the literature at about 1.9x the time and 3x the memory of an
ordinary step.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from linft.errors import LinftError
from linft.models.checkpoints import check_state_dict

__all__ = [
    "LinearizedModel",
    "escape_parameter_name",
    "first_order_terms",
    "first_order_path",
    "relative_linearity_gap",
]


def escape_parameter_name(name: str) -> str:
    """The key under which the delta of parameter ``name`` is stored.

    ``nn.Parameter`` names cannot contain dots, so ``layer1.0.conv1.weight``
    becomes ``layer1-0-conv1-weight`` in :attr:`LinearizedModel.delta` (and
    ``delta.layer1-0-conv1-weight`` in its state_dict). The mapping back to
    the original names is kept by the model, not recomputed from the key.
    """
    return name.replace(".", "-")


def _tied_names(module: nn.Module) -> tuple[list[str], dict[str, str]]:
    """Canonical parameter names (first occurrence) and every name -> its canonical name."""
    canonical: dict[int, str] = {}
    alias: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        alias[name] = canonical.setdefault(id(p), name)
    return list(canonical.values()), alias


@contextmanager
def attention_without_fast_path():
    """Attention through operations that have a forward-mode derivative: ``nn.MultiheadAttention`` off its fused
    eval-mode kernel (``_native_multi_head_attention``), ``scaled_dot_product_attention`` on its math backend
    (the flash and memory-efficient kernels have none). Restored on exit."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _tree_add(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return a + b
    if isinstance(a, Mapping):
        return type(a)((k, _tree_add(a[k], b[k])) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a)(_tree_add(u, v) for u, v in zip(a, b))
    raise LinftError(f"cannot linearize a model whose output contains {type(a).__name__}: "
                     "return tensors (or tuples/dicts of tensors)")


def _check_state(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                 required: Sequence[str], what: str) -> None:
    """Every parameter of the model, no foreign key, the model's shapes (buffers may be absent)."""
    check_state_dict(state, reference, what, "the model", "use a checkpoint of the same architecture and class "
                     "set (strip any 'module.' prefix)", required=required)


class LinearizedModel(nn.Module):
    """``f_lin(x) = f(x; θ0) + J(x; θ0) δ`` for any ``nn.Module``; only δ is trainable.

    ``LinearizedModel(model)`` takes the current parameters of ``model`` as θ0.
    It keeps a deep copy of ``model`` (the original is not touched) in which
    every parameter has been turned into a buffer of the same name holding θ0:
    ``.to()``, ``.cuda()``, ``.double()`` move θ0 with the deltas, and
    ``lin.model.state_dict()`` is the ordinary model's state_dict at θ0.

    The deltas live in :attr:`delta`, an ``nn.ParameterDict`` keyed by the
    escaped parameter names (see :func:`escape_parameter_name`), zero at the
    start, with the ``requires_grad`` of the original parameters, so
    ``list(lin.parameters())`` is exactly the deltas and
    ``torch.optim.SGD(lin.parameters(), ...)`` trains the first-order model.
    Tied parameters share one delta.

    Dropout follows ``train()`` / ``eval()`` with one mask shared by
    ``f(x; θ0)`` and ``J δ``; BatchNorm layers stay in eval mode whatever the
    mode (frozen running statistics). The model's output must be a tensor or
    a tuple / list / dict of tensors.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise LinftError(f"LinearizedModel needs an nn.Module, got {type(model).__name__}")
        inner = copy.deepcopy(model)
        names, alias = _tied_names(inner)
        if not names:
            raise LinftError("the model has no parameters: there is nothing to linearize")
        keys = [escape_parameter_name(n) for n in names]
        if len(set(keys)) != len(keys):
            raise LinftError("two parameter names collide once dots become '-': "
                             "rename the sub-modules to linearize this model")
        originals = dict(inner.named_parameters())
        # Turn every parameter of the copy into a buffer holding θ0 (tied
        # parameters become one shared buffer registered under each name).
        theta0: dict[int, torch.Tensor] = {}
        for module in inner.modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                buf = theta0.setdefault(id(p), p.detach())
                del module._parameters[pname]
                module.register_buffer(pname, buf, persistent=True)
        self.model = inner
        self.delta = nn.ParameterDict({
            k: nn.Parameter(torch.zeros_like(originals[n].detach()), requires_grad=originals[n].requires_grad)
            for k, n in zip(keys, names)
        })
        self._names = names            # canonical parameter names, fixed order
        self._keys = keys              # their keys in self.delta
        self._alias = alias            # every parameter name (tied ones too) -> canonical name
        self.train(model.training)

    # -- modes --------------------------------------------------------------
    def train(self, mode: bool = True) -> "LinearizedModel":
        """Set training mode (dropout on/off) everywhere except BatchNorm, which stays in eval mode."""
        super().train(mode)
        self._freeze_batchnorm()
        return self

    def _freeze_batchnorm(self) -> None:
        for m in self.model.modules():
            if _is_batchnorm(m) and m.training:
                m.eval()

    # -- names --------------------------------------------------------------
    @property
    def parameter_names(self) -> list[str]:
        """The original (dotted) names of the linearized parameters, in the order used for the jvp."""
        return list(self._names)

    def theta0(self) -> dict[str, torch.Tensor]:
        """θ0 as name -> tensor (the frozen buffers, not copies)."""
        return {n: self.model.get_buffer(n) for n in self._names}

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """δ as original name -> detached tensor."""
        return {n: self.delta[k].detach() for n, k in zip(self._names, self._keys)}

    # -- forward ------------------------------------------------------------
    def taylor_terms(self, *args, **kwargs) -> tuple[Any, Any]:
        """``(f(x; θ0), J(x; θ0) δ)`` from one jvp; ``forward`` returns their sum."""
        self._freeze_batchnorm()
        primals = tuple(self.model.get_buffer(n) for n in self._names)
        tangents = tuple(self.delta[k] for k in self._keys)
        index = {n: i for i, n in enumerate(self._names)}
        alias = self._alias
        model = self.model

        def f(*params):
            # Every name, tied ones included: after .to() a tie between buffers is
            # not guaranteed to survive, so each alias gets the dual tensor itself.
            return functional_call(model, {a: params[index[c]] for a, c in alias.items()}, args, kwargs)

        with attention_without_fast_path():
            return jvp(f, primals, tangents)

    def forward(self, *args, **kwargs):
        out, tangent = self.taylor_terms(*args, **kwargs)
        return _tree_add(out, tangent)

    # -- state ----------------------------------------------------------------
    @torch.no_grad()
    def reset_delta(self) -> "LinearizedModel":
        """δ = 0 (the model is back at f(θ0))."""
        for k in self._keys:
            self.delta[k].zero_()
        return self

    @torch.no_grad()
    def delta_from_state_dict(self, state: Mapping[str, torch.Tensor]) -> "LinearizedModel":
        """Set δ = θf − θ0 from ``state``, a state_dict of the ordinary model at θf; returns self.

        Strict: every parameter key must be present with its shape, and no key
        may be foreign to the model (buffers such as BatchNorm running
        statistics may be present; they are ignored, θ0's are kept); a
        :class:`~linft.errors.LinftError` says what differs otherwise.
        """
        reference = self.model.state_dict()
        _check_state(state, reference, list(self._alias), "the fine-tuned state_dict")
        for n, k in zip(self._names, self._keys):
            d = self.delta[k]
            theta0 = self.model.get_buffer(n)
            d.copy_(state[n].to(device=d.device, dtype=d.dtype) - theta0.to(d.dtype))
        return self

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The ordinary model's state_dict with every parameter at θ0 + δ (buffers as at θ0).

        Loads strictly into the architecture that was linearized, so the
        weights of a linearized run can be evaluated as an ordinary network.
        """
        state = self.model.state_dict()
        out: dict[str, torch.Tensor] = {}
        for name, value in state.items():
            canon = self._alias.get(name)
            if canon is None:
                out[name] = value.detach().clone()
            else:
                out[name] = (self.model.get_buffer(canon) + self.delta[escape_parameter_name(canon)]).detach()
        return out


def _params_and_buffers(model: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                        alias: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``state`` checked against ``model`` and moved to the device / dtype of the model's own tensors."""
    reference = model.state_dict()
    _check_state(state, reference, list(alias), what)
    return {k: v.to(device=reference[k].device, dtype=reference[k].dtype) for k, v in state.items()}


def first_order_terms(model: nn.Module, theta0_state: Mapping[str, torch.Tensor],
                      thetaf_state: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(x; θ0), J(x; θ0)(θf − θ0))`` from one jvp, ``model`` in eval mode, no autograd graph.

    ``model`` gives the architecture (its own weights are not used and its
    mode is restored afterwards); ``theta0_state`` and ``thetaf_state`` are
    state_dicts of it (strict check, :class:`~linft.errors.LinftError`
    otherwise). Buffers (BatchNorm running statistics) are taken from
    ``theta0_state`` when present there, else from ``model``. Batch ``x``
    yourself for large splits; combine the terms with :func:`first_order_path`
    or directly: ``f_lin(θf) = f0 + jvp_out``.
    """
    names, alias = _tied_names(model)
    s0 = _params_and_buffers(model, theta0_state, "the pretrained (θ0) state_dict", alias)
    sf = _params_and_buffers(model, thetaf_state, "the fine-tuned (θf) state_dict", alias)
    buffers = {k: v for k, v in s0.items() if k not in alias}
    primals = tuple(s0[n] for n in names)
    tangents = tuple(sf[n] - s0[n] for n in names)
    index = {n: i for i, n in enumerate(names)}

    def f(*params):
        tensors = dict(buffers)
        tensors.update({a: params[index[c]] for a, c in alias.items()})
        return functional_call(model, tensors, (x,))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), attention_without_fast_path():
            f0, jvp_out = jvp(f, primals, tangents)
    finally:
        model.train(was_training)
    return f0, jvp_out


def first_order_path(model: nn.Module, theta0_state: Mapping[str, torch.Tensor],
                     thetaf_state: Mapping[str, torch.Tensor], x: torch.Tensor,
                     alphas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """First-order outputs along θ(α) = θ0 + α(θf − θ0): ``f(θ0) + α·J(θf − θ0)``, shape (A, *f0.shape).

    One jvp whatever the number of α (see :func:`first_order_terms` for the
    arguments). α = 0 is f(θ0) exactly; α = 1 is f_lin(θf). α outside [0, 1]
    extrapolates; the caller decides whether that is allowed.
    """
    a = torch.as_tensor(alphas).reshape(-1)
    if a.numel() == 0:
        raise LinftError("no α given: pass at least one value, e.g. 0, 0.5, 1", param="alphas")
    f0, jvp_out = first_order_terms(model, theta0_state, thetaf_state, x)
    a = a.to(device=f0.device, dtype=f0.dtype).reshape((-1,) + (1,) * f0.dim())
    return f0.unsqueeze(0) + a * jvp_out.unsqueeze(0)


def relative_linearity_gap(f_f: torch.Tensor, f_lin: torch.Tensor, f_0: torch.Tensor) -> float:
    """‖f(θf) − f_lin(θf)‖ / ‖f(θf) − f(θ0)‖, Frobenius norms over the whole batch.

    0 means fine-tuning moved the outputs exactly as its first-order model
    predicts; 1 means the first-order error is as large as the change itself.
    Computed in float64. Returns ``nan`` when f(θf) equals f(θ0) (nothing
    moved, the ratio is undefined). Shapes must agree (LinftError otherwise).
    """
    if not (f_f.shape == f_lin.shape == f_0.shape):
        raise LinftError(f"outputs of different shapes {tuple(f_f.shape)}, {tuple(f_lin.shape)}, {tuple(f_0.shape)}: "
                         "compute f(θf), f_lin(θf) and f(θ0) on the same batch")
    f_f, f_lin, f_0 = (t.detach().to(torch.float64) for t in (f_f, f_lin, f_0))
    den = torch.linalg.vector_norm(f_f - f_0).item()
    num = torch.linalg.vector_norm(f_f - f_lin).item()
    return float("nan") if den == 0.0 else num / den

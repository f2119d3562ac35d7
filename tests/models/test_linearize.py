"""linft.models.linearize: the torch.func first-order model, the one-jvp weight path, the linearity gap."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from linft.errors import LinftError
from linft.models.linearize import (
    LinearizedModel,
    first_order_path,
    first_order_terms,
    relative_linearity_gap,
)


def mlp(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4)).to(dtype)


def random_direction(model: nn.Module, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


def set_delta(lin: LinearizedModel, delta: dict[str, torch.Tensor], scale: float = 1.0) -> None:
    state = dict(lin.model.state_dict())            # θ0, buffers and tied names included
    for n, d in delta.items():
        state[n] = state[n] + scale * d
    lin.delta_from_state_dict(state)


def tiny_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)
    # non-trivial running statistics, so that "unchanged" means something
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


# The jvp's primal f(x; θ0) and an ordinary forward f(x; θ0) are two code paths: the dual-tensor path may run
# other kernels (linear as matmul + add instead of addmm, convolutions on other layouts) with other summation
# orders, which also depend on the CPU's ISA and the thread count. They agree to a few roundings of the dtype
# compounded over the network's depth:
#: float64 MLP, 3 layers of at most 16-term dot products, outputs of order 1: ~1e-15; bound 1e-12.
PRIMAL_TOL_F64 = dict(rtol=1e-12, atol=1e-12)
#: float32 MLP: ~1e-7 per layer; bound 1e-5 relative, 1e-6 absolute (outputs near 0).
PRIMAL_TOL_F32 = dict(rtol=1e-5, atol=1e-6)
#: float32 ResNet-10 (10 conv layers, up to 512 x 3 x 3 products each, BN in eval mode): ~1e-6; bound 1e-4
#: relative, 1e-5 absolute. A train-mode BatchNorm (batch statistics of 2 images) changes the logits by O(1).
PRIMAL_TOL_RESNET = dict(rtol=1e-4, atol=1e-5)


# -- δ = 0 ------------------------------------------------------------------

def test_zero_delta_is_exactly_the_model_mlp():
    model = mlp().eval()
    x = torch.randn(8, 6)
    lin = LinearizedModel(model).eval()
    f0, tangent = lin.taylor_terms(x)
    assert torch.equal(tangent, torch.zeros_like(tangent))  # by construction: every tangent term is J·0 = 0
    with torch.no_grad():
        expected = model(x)
        out = lin(x)
    assert torch.equal(out, f0)  # f0 + 0: the same jvp, bit for bit
    torch.testing.assert_close(out, expected, **PRIMAL_TOL_F32)  # jvp primal vs ordinary forward


def test_resnet_with_frozen_batchnorm_in_train_mode():
    model = tiny_resnet().eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    lin = LinearizedModel(model).train()
    assert lin.training and lin.model.training
    bns = [m for m in lin.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = {k: v.clone() for k, v in lin.model.state_dict().items() if "running" in k or "num_batches" in k}

    out = lin(x)                                   # jvp through BN: would fail with a train-mode BN
    f0, tangent = lin.taylor_terms(x)
    assert torch.equal(tangent, torch.zeros_like(tangent))  # δ = 0: J·0 = 0 by construction
    assert torch.equal(out, f0.detach())           # f0 + 0: the same jvp, bit for bit
    # δ = 0, frozen BN: the eval-mode network (jvp primal vs ordinary forward: see PRIMAL_TOL_RESNET)
    torch.testing.assert_close(out.detach(), expected.detach(), **PRIMAL_TOL_RESNET)
    out.square().mean().backward()
    grads = [p.grad for p in lin.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    lin.model.train()                              # even if someone bypasses LinearizedModel.train
    lin(x)
    after = lin.model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # the original model was not touched
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert len(list(model.parameters())) == len(list(lin.parameters()))


# -- first order, linear models ------------------------------------------------

def test_finite_difference_error_shrinks_like_eps_squared():
    model = mlp(torch.float64).eval()
    x = torch.randn(16, 6, dtype=torch.float64)
    direction = random_direction(model)
    lin = LinearizedModel(model).eval()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    def error(eps):
        set_delta(lin, direction, eps)
        true = torch.func.functional_call(model, {n: theta0[n] + eps * direction[n] for n in theta0}, (x,))
        with torch.no_grad():
            return (true - lin(x)).norm().item()

    e1, e2 = error(1e-2), error(5e-3)
    assert e1 > 0 and 3.0 < e1 / e2 < 5.0
    # and the first-order term itself is not negligible (the test is not vacuous)
    set_delta(lin, direction, 1e-2)
    with torch.no_grad():
        _, tangent = lin.taylor_terms(x)
    assert tangent.norm().item() > 10 * e1


def test_model_linear_in_parameters_is_its_own_linearization():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    lin = LinearizedModel(model).eval()
    set_delta(lin, random_direction(model, seed=3))
    merged = nn.Linear(5, 3).double()
    merged.load_state_dict(lin.merged_state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), merged(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(lin(x), model(x))


# -- dropout -------------------------------------------------------------------

class DropLinear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.lin.weight.data.copy_(w)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


def test_dropout_mask_is_shared_by_primal_and_tangent():
    torch.manual_seed(0)
    w0 = torch.rand(32, 8) + 0.1
    x = torch.rand(64, 8) + 0.1                     # W0 x > 0 and δ x > 0 everywhere
    model = DropLinear(w0)
    lin = LinearizedModel(model).train()
    set_delta(lin, {"lin.weight": 3.0 * w0})        # δ x = 3 W0 x
    f0, tangent = lin.taylor_terms(x)
    zero0, zero_t = f0 == 0, tangent == 0
    assert 0.3 < zero0.float().mean().item() < 0.7  # dropout is active
    assert torch.equal(zero0, zero_t)                # the same units dropped in both terms
    full = 2.0 * 4.0 * (x @ w0.T)                   # 1/(1-p) (W0 + δ) x on the kept units
    torch.testing.assert_close((f0 + tangent)[~zero0], full[~zero0])
    out = lin(x)                                     # a new mask, the same property
    kept = out != 0
    assert 0.3 < kept.float().mean().item() < 0.7
    torch.testing.assert_close(out[kept], full[kept])
    # eval mode: no dropout at all
    lin.eval()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), 4.0 * (x @ w0.T))


# -- training ------------------------------------------------------------------

def test_sgd_on_delta_decreases_the_loss():
    model = mlp()
    lin = LinearizedModel(model).train()
    torch.manual_seed(5)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin.eval()
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(lin(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in lin.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # θ0 never moved
    for n, p in model.named_parameters():
        assert torch.equal(lin.theta0()[n], p.detach())


def test_only_deltas_are_parameters_and_to_moves_theta0():
    model = mlp()
    lin = LinearizedModel(model)
    params = list(lin.parameters())
    assert len(params) == len(list(model.parameters()))
    assert all(p is lin.delta[k] for p, k in zip(params, lin.delta.keys()))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
    assert "0-weight" in lin.delta and lin.parameter_names[0] == "0.weight"
    lin.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in lin.parameters())
    assert all(t.dtype == torch.float64 for t in lin.theta0().values())
    assert lin(torch.randn(3, 6, dtype=torch.float64)).dtype == torch.float64


def test_tied_parameters_share_one_delta():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared).double()
    lin = LinearizedModel(model).eval()
    assert len(list(lin.parameters())) == 2
    direction = random_direction(model)
    set_delta(lin, direction, 1e-3)
    x = torch.randn(5, 4, dtype=torch.float64)
    true = torch.func.functional_call(model, {n: p + 1e-3 * direction[n] for n, p in model.named_parameters()}, (x,))
    with torch.no_grad():
        f0, tangent = lin.taylor_terms(x)
        assert (true - f0 - tangent).norm() < 1e-2 * tangent.norm()   # both uses get the tangent
    merged = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    merged.load_state_dict(lin.merged_state_dict(), strict=True)


# -- state dicts -----------------------------------------------------------------

def test_merged_state_dict_round_trip_and_delta_from_state_dict():
    model = tiny_resnet().eval()
    finetuned = tiny_resnet()
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    lin = LinearizedModel(model).delta_from_state_dict(finetuned.state_dict())
    fresh = tiny_resnet()
    fresh.load_state_dict(lin.merged_state_dict(), strict=True)
    for (n, p), (_, q) in zip(fresh.named_parameters(), finetuned.named_parameters()):
        # θ0 + (θf − θ0) vs θf in float32: two roundings of weights below 1.1 in magnitude (ulp 2.4e-7): < 5e-7
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    for n, b in fresh.named_buffers():
        assert torch.equal(b, model.get_buffer(n)), n        # BN statistics of θ0


def test_mismatched_state_dicts_raise_linft_error():
    model = mlp()
    lin = LinearizedModel(model)
    good = model.state_dict()
    missing = {k: v for k, v in good.items() if k != "2.bias"}
    with pytest.raises(LinftError, match="2.bias"):
        lin.delta_from_state_dict(missing)
    with pytest.raises(LinftError, match="shape"):
        lin.delta_from_state_dict({**good, "4.weight": torch.zeros(5, 16)})
    with pytest.raises(LinftError, match="module.0.weight"):
        lin.delta_from_state_dict({**good, "module.0.weight": good["0.weight"]})
    with pytest.raises(LinftError, match="shape") as info:
        first_order_terms(model, good, {**good, "4.bias": torch.zeros(5)}, torch.randn(2, 6))
    assert "\n" not in str(info.value)


# -- weight path and gap -----------------------------------------------------------

def test_first_order_path_endpoints_and_linearity():
    model = mlp(torch.float64)
    model.train()
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    direction = random_direction(model)
    thetaf = {k: theta0[k] + 0.1 * direction[k] for k in theta0}
    x = torch.randn(10, 6, dtype=torch.float64)
    alphas = [0.0, 0.25, 0.5, 1.0]
    path = first_order_path(model, theta0, thetaf, x, alphas)
    assert path.shape == (4, 10, 4)
    assert model.training                                     # mode restored
    with torch.no_grad():
        f0 = torch.func.functional_call(model.eval(), theta0, (x,))
    torch.testing.assert_close(path[0], f0, **PRIMAL_TOL_F64)  # jvp primal vs ordinary forward
    lin = LinearizedModel(model).eval().delta_from_state_dict(thetaf)
    with torch.no_grad():
        torch.testing.assert_close(path[3], lin(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path[2], 0.5 * (path[0] + path[3]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(path[1], 0.75 * path[0] + 0.25 * path[3], rtol=1e-12, atol=1e-12)
    f0_, jvp_out = first_order_terms(model, theta0, thetaf, x)
    assert torch.equal(path[0], f0_)  # α = 0: f0 + 0·J(θf − θ0), the same jvp run again, bit for bit
    torch.testing.assert_close(f0_, f0, **PRIMAL_TOL_F64)
    assert jvp_out.norm() > 0


def test_relative_linearity_gap():
    f0 = torch.zeros(4, 3)
    ff = torch.ones(4, 3)
    assert relative_linearity_gap(ff, ff, f0) == 0.0
    assert relative_linearity_gap(ff, f0, f0) == pytest.approx(1.0)
    assert relative_linearity_gap(ff, 0.5 * ff, f0) == pytest.approx(0.5)
    assert math.isnan(relative_linearity_gap(f0, f0, f0))
    with pytest.raises(LinftError):
        relative_linearity_gap(ff, ff[:2], f0)
    # the gap of a real network is small for a small step and grows with it
    model = mlp(torch.float64)
    theta0 = model.state_dict()
    direction = random_direction(model)
    x = torch.randn(20, 6, dtype=torch.float64)
    gaps = []
    for scale in (1e-3, 1e-1):
        thetaf = {k: theta0[k] + scale * direction[k] for k in theta0}
        f0_, j = first_order_terms(model, theta0, thetaf, x)
        with torch.no_grad():
            f_f = torch.func.functional_call(model.eval(), thetaf, (x,))
        gaps.append(relative_linearity_gap(f_f, f0_ + j, f0_))
    assert gaps[0] < 1e-2 and gaps[0] < gaps[1]

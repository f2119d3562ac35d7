"""The linear fine-tuning model as pure functions: inverted dropout, the logits, the initial parameters."""

import torch

from linft.train.linear.model import initial_parameters, inverted_dropout, linear_ft_logits

from helpers import C, D, K


def test_dropout_scaling_and_evaluation_identity():
    x = torch.arange(1.0, 9.0).view(2, 4)
    keep = torch.tensor([[True, False, True, False], [False, False, False, True]])
    torch.testing.assert_close(inverted_dropout(x, keep, 0.75), torch.tensor([[4.0, 0, 12, 0], [0, 0, 0, 32]]))
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(5, K, D, generator=g)
    v, V, b = torch.randn(K, D, generator=g), torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    expected = sum(v[k] * phi[:, k] for k in range(K)) @ V.T + b
    # the same sum in another order: float32 rounding only, within assert_close's float32 defaults
    torch.testing.assert_close(linear_ft_logits(phi, v, V, b), expected)
    torch.testing.assert_close(linear_ft_logits(phi, v, V, b, torch.ones(5, D, dtype=torch.bool), 0.0), expected)
    # inverted dropout keeps the expectation (0.03 is 4.5 standard errors of this mean)
    ones = torch.ones(200_000)
    mean = inverted_dropout(ones, torch.rand(200_000, generator=g) >= 0.9, 0.9).mean()
    assert abs(mean.item() - 1.0) < 0.03


def test_initial_parameters_follow_nn_linear_and_the_v_init():
    gen = lambda: torch.Generator().manual_seed(3)
    v, V, b = initial_parameters(K, 400, 50, gen(), "normal")
    bound = 1 / 400**0.5
    assert V.abs().max() <= bound and b.abs().max() <= bound and V.abs().max() > 0.9 * bound
    assert v.shape == (K, 400) and abs(v.std().item() - 1.0) < 0.1
    last, V2, b2 = initial_parameters(K, 400, 50, gen(), "last")
    assert torch.equal(V2, V) and torch.equal(b2, b)  # the same stream whatever v is
    assert torch.equal(last, torch.cat([torch.zeros(K - 1, 400), torch.ones(1, 400)]))
    probe = initial_parameters(K, 400, 50, gen(), "normal", probe=True)[0]
    assert torch.equal(probe, last)

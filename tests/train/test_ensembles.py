"""Output ensembles (linft.train.finetune.ensembles) match independent computations and hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from linft.errors import LinftError
from linft.train.finetune.ensembles import RunningEnsemble, ensemble_scores
from helpers import refused


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_ensemble_rules_match_independent_computations():
    logits = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    x = logits.double().numpy()
    np.testing.assert_allclose(ensemble_scores(logits).numpy(), np_softmax(x).mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ensemble_scores(list(logits), rule="logits").numpy(), x.mean(axis=0),
                               rtol=1e-6, atol=1e-7)
    one = logits[:1]
    torch.testing.assert_close(ensemble_scores(one), torch.softmax(logits[0], -1))
    assert torch.equal(ensemble_scores(one, rule="logits"), logits[0])  # the mean of one value is that value, exactly
    assert ensemble_scores(logits.half()).dtype == torch.float32


def test_ensemble_rules_can_disagree_on_the_argmax():
    # one confident model for class 1, two mild ones for class 0
    logits = torch.tensor([[[0.0, 10.0]], [[2.0, 0.0]], [[2.0, 0.0]]])
    assert ensemble_scores(logits, rule="logits").argmax(-1).item() == 1  # mean logits (4/3, 10/3)
    assert ensemble_scores(logits, rule="probs").argmax(-1).item() == 0  # mean probs ≈ (0.587, 0.413)
    p = 1 / (1 + math.exp(-2))
    torch.testing.assert_close(ensemble_scores(logits)[0, 0], torch.tensor((2 * p + 1 / (1 + math.exp(10))) / 3))


def test_running_ensemble_equals_ensemble_scores():
    logits = torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(2))
    for rule in ("probs", "logits"):
        running = RunningEnsemble(rule)
        for m in range(5):
            running.add(logits[m])
            assert running.count == m + 1
            torch.testing.assert_close(running.scores(), ensemble_scores(logits[: m + 1], rule=rule),
                                       rtol=1e-6, atol=1e-7)


def test_ensemble_errors():
    with refused("rule"):
        ensemble_scores(torch.zeros(1, 2, 3), rule="vote")
    with refused("rule"):
        RunningEnsemble("vote")
    with pytest.raises(LinftError, match=r"shape \(models, examples, classes\)"):
        ensemble_scores(torch.zeros(2, 3))
    with pytest.raises(LinftError, match="at least one"):
        ensemble_scores([])
    with pytest.raises(LinftError, match="same examples"):
        ensemble_scores([torch.zeros(2, 3), torch.zeros(4, 3)])
    running = RunningEnsemble()
    with pytest.raises(LinftError, match="empty"):
        running.scores()
    running.add(torch.zeros(2, 3))
    with pytest.raises(LinftError, match="same examples"):
        running.add(torch.zeros(4, 3))

"""linft.protocol.schedule.Schedule and linft.protocol.grid.Grid: the paper's protocol as data, written once, and the
grid's one validator (errors by kind and parameter)."""

import math
from dataclasses import replace

import pytest

from linft.errors import LinftError
from linft.protocol.grid import DOMAINNET_LRS, PAPER_GRID, Grid, GridPoint, check_dropout_rate
from linft.protocol.schedule import DOMAINNET, PAPER, Schedule, decay_shrinkage

DOMAINS = ["art", "photo", "sketch"]


def test_the_papers_schedule_and_grid():
    """Section 4 and appendix A.2 of the paper."""
    assert (PAPER.steps, PAPER.batch_size, PAPER.eval_every, PAPER.momentum) == (10_000, 32, 300, 0.9)
    assert PAPER.milestone_steps() == (5_000,)
    assert (PAPER_GRID.lrs, PAPER_GRID.weight_decays, PAPER_GRID.seeds) == ((1e-3, 5e-4), (1e-4, 5e-5, 1e-5), 3)
    assert (DOMAINNET.steps, DOMAINNET.milestone_steps()) == (30_000, (15_000, 25_000))
    assert DOMAINNET_LRS == (3e-3, 5e-3)
    assert PAPER.eval_steps()[:3] == [0, 300, 600] and PAPER.eval_steps()[-1] == 9_999


def test_schedule_check_names_the_parameter():
    for name in ("steps", "batch_size", "eval_every"):
        with pytest.raises(LinftError) as err:
            Schedule(**{name: 0}).check()
        assert err.value.param == name
    with pytest.raises(LinftError) as err:
        Schedule(lr_milestones=(1.5,)).check()
    assert err.value.param == "lr_milestones"


def test_paper_milestones_are_compared_as_steps():
    assert Schedule(steps=10_000, lr_milestones=(5_000,)).has_paper_milestones()  # the same steps as 0.5
    assert Schedule(steps=40).has_paper_milestones()
    assert not Schedule(steps=4, lr_milestones=(0.25, 0.75)).has_paper_milestones()
    assert not Schedule(lr_milestones=()).has_paper_milestones()


def test_points_are_dropouts_x_lr_x_weight_decay_then_probes():
    grid = Grid(dropouts=(0.0, 0.9), lrs=(1e-3, 5e-4), weight_decays=(1e-4,), probe=True)
    assert grid.points() == [GridPoint(1e-3, 1e-4, 0.0), GridPoint(5e-4, 1e-4, 0.0), GridPoint(1e-3, 1e-4, 0.9),
                             GridPoint(5e-4, 1e-4, 0.9), GridPoint(1e-3, 1e-4, 0.0, True),
                             GridPoint(5e-4, 1e-4, 0.0, True)]


def test_runs_are_domains_x_seeds_x_points():
    grid = Grid(lrs=(1e-3,), weight_decays=(1e-4, 1e-5), seeds=2, test_domains=("sketch", "art"))
    runs = grid.runs(DOMAINS)
    assert len(runs) == 2 * 2 * 2
    assert [(d, s) for d, s, _ in runs[:4]] == [("sketch", 0), ("sketch", 0), ("sketch", 1), ("sketch", 1)]
    assert [p.weight_decay for _, _, p in runs[:2]] == [1e-4, 1e-5]
    assert len(PAPER_GRID.runs(DOMAINS)) == 3 * 3 * 6  # every domain by default


@pytest.mark.parametrize("change, param", [
    (dict(lrs=()), "lrs"), (dict(weight_decays=()), "weight_decays"), (dict(seeds=0), "seeds"),
    (dict(dropouts=()), "dropouts"), (dict(seeds=1.5), "seeds"), (dict(lrs=(1e-3, -1.0)), "lrs"),
    (dict(lrs=(math.nan,)), "lrs"), (dict(weight_decays=(-1e-4,)), "weight_decays"),
    (dict(lrs=(1e-3, 1e-3)), "lrs"), (dict(dropouts=(0.5, 0.5)), "dropouts"), (dict(dropouts=(1.0,)), "dropout"),
    (dict(test_domains=("clipart",)), "test_domains"), (dict(test_domains=("art", "art")), "test_domains"),
])
def test_a_grid_that_cannot_run_is_one_error_naming_its_parameter(change, param):
    with pytest.raises(LinftError) as err:
        Grid(**change).runs(DOMAINS)
    assert err.value.param == param


def test_probing_alone_is_a_grid():
    assert len(Grid(dropouts=(), probe=True, seeds=1).runs(DOMAINS)) == 3 * 6


@pytest.mark.parametrize("rate", [1.0, -0.1, math.nan, "x"])
def test_check_dropout_rate(rate):
    with pytest.raises(LinftError) as err:
        check_dropout_rate(rate)
    assert err.value.param == "dropout"
    assert check_dropout_rate("0.9") == 0.9


def test_decay_shrinkage_is_the_product_formula():
    """No momentum, no milestone: (1 - lr wd)^steps kept; momentum 0.9 multiplies the step by 10; a milestone at
    half runs the second half at lr/10."""
    flat = Schedule(steps=100, momentum=0.0, lr_milestones=(1,))
    assert decay_shrinkage(flat, 0.1, 0.01) == pytest.approx(1 - (1 - 1e-3) ** 100, rel=1e-12)
    with_momentum = Schedule(steps=100, momentum=0.9, lr_milestones=(0.5,))
    kept = (1 - 1e-2) ** 50 * (1 - 1e-3) ** 50
    assert decay_shrinkage(with_momentum, 0.1, 0.01) == pytest.approx(1 - kept, rel=1e-12)
    assert decay_shrinkage(flat, 0.1, 0.0) == 0.0


def test_the_papers_weight_decays_barely_shrink_a_weight():
    """Why the demo's linear selections tie between weight decays: at the paper's largest lr and weight decay the
    decay takes about 0.5% off a weight over 10,000 steps (0.04% over the demo's 800)."""
    assert decay_shrinkage(PAPER, 1e-3, 1e-4) == pytest.approx(1 - math.exp(-1e-3 * 1e-4 * 10 * 5500), rel=1e-3)
    assert decay_shrinkage(replace(PAPER, steps=800), 1e-3, 1e-4) < 5e-4

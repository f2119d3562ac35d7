"""linft.protocol.schedule: milestones as fractions or step numbers (the official code's schedules)."""

import pytest

from linft.protocol.schedule import check_milestones, lr_at, milestone_steps
from helpers import refused


def test_fractions_and_step_numbers():
    assert milestone_steps((0.5,), 10_000) == (5000,)
    assert milestone_steps((5000, 10000), 10_001) == (5000, 10000)  # the official 10,001 updates
    assert milestone_steps((15000, 25000), 30_000) == (15000, 25000)  # its DomainNet schedule
    assert milestone_steps((0.8333,), 30_000) == (24999,)  # what a fraction gives there: not 25,000
    # the official last update (step 10,000) runs at lr/100
    assert lr_at(10_000, 1.0, milestone_steps((5000, 10000), 10_001)) == pytest.approx(0.01)
    assert lr_at(4999, 1.0, (5000, 10000)) == 1.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2500.5])
def test_bad_milestones_are_refused(bad):
    with refused("lr_milestones"):
        check_milestones((bad,))

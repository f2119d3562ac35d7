"""What a fine-tuning run is: runs that compute the same thing share an id and a label, runs that compute different
things do not (issue 19), and the configurations extend the protocol's one Schedule."""

from dataclasses import asdict, fields

from linft.protocol.identity import run_id
from linft.protocol.schedule import DOMAINNET, PAPER, Schedule
from linft.train.finetune.model import FineTuneConfig, FineTuneRun, finetune_label
from linft.train.finetune.run import run_identity, sweep_runs
from linft.train.linear.engine import LinearGridConfig

DOMAINS = ["art", "photo", "sketch"]
GRID = dict(seeds=1, lrs=(1e-3,), weight_decays=(1e-4,), test_domains=("sketch",))


def _id(run: FineTuneRun, config: FineTuneConfig = FineTuneConfig()) -> str:
    return run_id(**run_identity(run, "resnet50", "w" * 64, "d" * 64, config))


def test_official_stochastic_depth_at_rate_0_is_the_plain_run():
    plain = sweep_runs(DOMAINS, **GRID)
    official = sweep_runs(DOMAINS, stochastic_depth=0.0, stochastic_depth_mode="official", **GRID)
    assert official == plain  # the same run: same id, header and label
    assert [_id(r) for r in official] == [_id(r) for r in plain]
    assert FineTuneRun("sketch", 0, 1e-3, 1e-4, stochastic_depth_mode="official").stochastic_depth_mode == "row"
    # at a positive rate the two modes compute different things: two ids, two labels
    row, off = (sweep_runs(DOMAINS, stochastic_depth=0.1, stochastic_depth_mode=m, **GRID)[0]
                for m in ("row", "official"))
    assert _id(row) != _id(off)
    assert finetune_label(row, "DEFAULT") != finetune_label(off, "DEFAULT")


def test_runs_differing_only_in_lr_milestones_have_two_labels():
    run = sweep_runs(DOMAINS, **GRID)[0]
    paper = finetune_label(run, "DEFAULT", FineTuneConfig())
    assert paper == "full FT, dropout 0"  # the paper's milestones: labelled as before
    assert finetune_label(run, "DEFAULT", FineTuneConfig(steps=3)) == paper
    assert finetune_label(run, "DEFAULT", FineTuneConfig(lr_milestones=(5000,))) == paper  # the same steps as 0.5
    other = FineTuneConfig(steps=4, lr_milestones=(0.25, 0.75))
    assert finetune_label(run, "DEFAULT", other) == "full FT, lr ÷10 at steps 1/3, dropout 0"
    assert finetune_label(run, "DEFAULT", FineTuneConfig(**asdict(DOMAINNET))) == \
        "full FT, lr ÷10 at steps 15000/25000, dropout 0"
    assert finetune_label(run, "DEFAULT", FineTuneConfig(lr_milestones=())) == "full FT, constant lr, dropout 0"
    assert _id(run, other) != _id(run, FineTuneConfig(steps=4))


def test_sweep_runs_is_the_grid_with_a_variant():
    runs = sweep_runs(DOMAINS, dropouts=(0.0, 0.9), seeds=2, last_layer_lr_mult=10.0)
    assert len(runs) == 3 * 2 * 2 * 6  # every domain x seeds x dropouts x the paper's lr x weight decay
    assert {(r.lr, r.weight_decay) for r in runs} == {(lr, wd) for lr in (1e-3, 5e-4) for wd in (1e-4, 5e-5, 1e-5)}
    assert {r.last_layer_lr_mult for r in runs} == {10.0}


def test_configs_are_schedules_whose_defaults_are_the_papers():
    """The schedule's fields are declared once (Schedule) and keep their keywords in both configurations."""
    names = [f.name for f in fields(Schedule)]
    for cls in (LinearGridConfig, FineTuneConfig):
        assert issubclass(cls, Schedule)
        assert cls().schedule() == PAPER
        config = cls(steps=40, eval_every=15, lr_milestones=(0.25,), batch_size=5, momentum=0.5)
        assert config.schedule() == Schedule(40, 5, 15, 0.5, (0.25,))
        assert config.milestone_steps() == (10,)
        assert [f.name for f in fields(cls)][:len(names)] == names
    assert FineTuneConfig(**asdict(DOMAINNET)).schedule() == DOMAINNET
    assert LinearGridConfig().schedule() == FineTuneConfig().schedule() == PAPER

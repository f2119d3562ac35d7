"""``linft status`` on the demo's folder: the demo writes the plan of its fine-tuning before it trains, so runs not
started yet are counted as to do."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from linft.cli.main import main
from linft.data.shapes import DEMO_STYLES
from linft.demo import DEMO_FINETUNE, run_demo
from linft.train.sweeps.status import sweep_status


class Stop(Exception):
    pass


def test_status_on_the_demo_folder_shows_the_fine_tuning_runs_to_do(tmp_path, one_thread):
    def say(line: str) -> None:  # the demo stops as its first fine-tuning run is about to start
        if line.startswith("run 1/"):
            raise Stop(line)

    tiny = dict(per_class=3, linear_steps=4, seeds=1, finetune_steps=3, finetune_eval_every=2)
    with pytest.raises(Stop):
        run_demo(tmp_path / "demo", say=say, progress=True, **tiny)
    # 4 held-out domains x dropout rates x learning rates x weight decays x seeds, none started
    to_do = 4 * len(DEMO_FINETUNE["dropouts"]) * len(DEMO_FINETUNE["lrs"]) * len(DEMO_FINETUNE["weight_decays"]) \
        * DEMO_FINETUNE["seeds"]
    status = sweep_status(tmp_path / "demo")
    counts = status.counts()
    assert counts["to do"] == to_do and counts["running"] == counts["interrupted"] == 0
    assert counts["done"] > 0  # the linear runs, finished before
    planned = [r for r in status.runs if r.state == "to do"]
    assert sorted(r.test_domain for r in planned) == sorted(DEMO_STYLES * (to_do // 4))
    assert all(r.label.startswith("full FT") for r in planned)

    result = CliRunner().invoke(main, ["status", str(tmp_path / "demo"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"]["to do"] == to_do
    text = CliRunner().invoke(main, ["status", str(tmp_path / "demo")]).output
    assert f"{to_do} to do" in text.splitlines()[0]

"""Watching the linear grid: one summary line per evaluation, and grids whose runs diverge (all, or some)."""

import os
import re
import tempfile

import numpy as np
import pytest
from click.testing import CliRunner

from linft.cli.main import main
from linft.errors import LinftError
from linft.protocol.records import read_records
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.train.linear.driver import train_linear
from linft.train.linear.engine import LinearGridConfig

from conftest import make_image_folder
from helpers import synthetic_cache

CONFIG = LinearGridConfig(steps=12, batch_size=4, eval_every=5)  # evaluations at steps 0, 5, 10, 11
# lr 1e30 with weight decay 1e-3 diverges by construction: the first step moves V by lr x a cross-entropy gradient
# that is not zero (softmax outputs are never one-hot), |V| ~ 1e29 or more; the second step's decay term
# lr x wd x V ~ 1e56 overflows float32, so the loss is not finite by step 1 and the run is flagged at step 5.
HUGE_LR = 1e30


def test_one_summary_line_per_evaluation_over_the_grid(tmp_path):
    lines = []
    res = train_linear(synthetic_cache(tmp_path), tmp_path / "runs", dropouts=(0.0, 0.9), probe=True, lrs=(0.05,),
                       weight_decays=(1e-3,), seeds=2, config=CONFIG, device="cpu", progress=False, say=lines.append)
    assert res.trained == 18 and res.usable == 18 and res.divergence is None
    assert len(lines) == 4  # one per evaluation step, not one per run
    records = read_records([tmp_path / "runs"])
    for line, step in zip(lines, (0, 5, 10, 11)):
        at = [r for r in records if r["step"] == step]
        iid, ood = [iid_accuracy(r) for r in at], [ood_accuracy(r) for r in at]
        assert line == (f"step {step} of 12: 18 runs, loss median {np.median([r['loss'] for r in at]):.3g}, "
                        f"i.i.d. best {100 * max(iid):.1f}% median {100 * np.median(iid):.1f}%, "
                        f"o.o.d. best {100 * max(ood):.1f}% median {100 * np.median(ood):.1f}%, 0 diverged")


def test_every_run_diverging_is_said_in_one_line(tmp_path):
    lines = []
    res = train_linear(synthetic_cache(tmp_path), tmp_path / "runs", lrs=(HUGE_LR,), weight_decays=(1e-3,), seeds=2,
                       config=CONFIG, device="cpu", progress=False, say=lines.append)
    assert (res.trained, res.diverged, res.usable) == (6, 6, 0)
    assert res.divergence == "all 6 runs diverged (linear FT, dropout 0.9; lr 1e+30; weight decay 0.001)"
    assert lines[-1].endswith("6 runs, all diverged")
    again = train_linear(synthetic_cache(tmp_path), tmp_path / "runs", lrs=(HUGE_LR,), weight_decays=(1e-3,), seeds=2,
                         config=CONFIG, device="cpu", progress=False)
    assert (again.trained, again.usable, again.divergence) == (0, 0, res.divergence)  # done, and still nothing


def test_some_runs_diverging_leaves_the_others_usable(tmp_path):
    res = train_linear(synthetic_cache(tmp_path), tmp_path / "runs", lrs=(0.05, HUGE_LR), weight_decays=(1e-3,),
                       seeds=2, config=CONFIG, device="cpu", progress=False)
    assert (res.trained, res.diverged, res.usable) == (12, 6, 6)
    assert res.divergence == "6 of 12 runs diverged (linear FT, dropout 0.9; lr 1e+30; weight decay 0.001)"


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("lin")
    folder = make_image_folder(root / "toy")
    small = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8",
             "--workers", "0", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, ["extract", str(folder), "--out", str(root / "c.h5"), *small])
    assert result.exit_code == 0, result.output
    return root / "c.h5"


def train(cache_file, out, *extra):
    args = ["train-linear", cache_file, "--seeds", "1", "--steps", "7", "--eval-every", "3", "--batch-size", "2",
            "--weight-decay", "0.001", "--device", "cpu", "--out", out, *extra]
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_all_diverged_exits_1_with_one_line(cache_file, tmp_path):
    result = train(cache_file, tmp_path / "r", "--lr", HUGE_LR, "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    said = [line for line in result.stderr.splitlines() if "diverged (" in line]
    assert said == ["all 3 runs diverged (linear FT, dropout 0.9; lr 1e+30; weight decay 0.001): no usable result; "
                    "try a smaller --lr"]
    assert result.stdout.strip() == ""  # no empty table


def test_cli_some_diverged_prints_the_table_and_a_note(cache_file, tmp_path):
    result = train(cache_file, tmp_path / "r", "--lr", "0.01", "--lr", HUGE_LR, "--quiet")
    assert result.exit_code == 0, result.output
    assert "note: 3 of 6 runs diverged (linear FT, dropout 0.9; lr 1e+30; weight decay 0.001)" in result.stderr
    assert "| linear FT, dropout 0.9 |" in result.stdout


def test_cli_lines_while_training_and_quiet_is_silent(cache_file, tmp_path):
    loud = train(cache_file, tmp_path / "loud", "--lr", "0.01")
    assert loud.exit_code == 0, loud.output
    evals = [line for line in loud.stderr.splitlines() if line.startswith("step ")]
    assert [int(re.match(r"step (\d+) of 7: 3 runs", line).group(1)) for line in evals] == [0, 3, 6]
    assert re.search(r"^training: 7/7 step \(100%\), .* in \d+:\d\d$", loud.stderr, re.M)  # no terminal: plain lines
    quiet = train(cache_file, tmp_path / "quiet", "--lr", "0.01", "--quiet")
    assert quiet.exit_code == 0 and len(quiet.stderr.strip().splitlines()) == 1  # only the result line


def _unwritable_folders(tmp_path):
    """Existing folders a process cannot write: one without write permission (not for root, who writes anyway) and
    sysfs's /sys/kernel (where even root may create nothing)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return [p for p in (locked, "/sys/kernel") if os.path.isdir(p) and not _can_make_folder(p)]


def _can_make_folder(folder) -> bool:
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
        return True
    except OSError:
        return False


def test_an_unwritable_tensorboard_folder_is_refused_before_training(tmp_path):
    folders = _unwritable_folders(tmp_path)
    if not folders:
        pytest.skip("no unwritable folder on this machine")
    (tmp_path / "a-file").write_text("x")
    for tb in [*folders, tmp_path / "a-file", tmp_path / "a-file" / "below"]:
        with pytest.raises(LinftError) as info:
            train_linear(synthetic_cache(tmp_path), tmp_path / "runs", dropouts=(0.0,), lrs=(0.05,),
                         weight_decays=(1e-3,), seeds=1, config=CONFIG, device="cpu", progress=False,
                         tensorboard_dir=tb)
        assert info.value.param == "tensorboard_dir" and str(tb) in str(info.value), str(info.value)
        assert not (tmp_path / "runs").exists()  # nothing trained, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"] and not os.listdir(tmp_path / "locked")

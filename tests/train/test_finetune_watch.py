"""Watching fine-tuning: one line per evaluation through the hooks, TensorBoard from the same records, divergence."""

import pytest
from click.testing import CliRunner

from linft.cli.main import main
from linft.data.folders import load_image_folder
from linft.protocol.records import read_records
from linft.protocol.schedule import lr_at
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.protocol.sinks import tensorboard_run_name
from linft.train.finetune.run import train_run
from linft.train.finetune.hooks import watch_hooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun

CFG = FineTuneConfig(steps=5, batch_size=2, eval_every=2, image_size=32, eval_batch_size=64, workers=0)
RUN = FineTuneRun("photo", seed=0, lr=0.01, weight_decay=1e-4)  # evaluations at 0, 2, 4; lr ÷10 from step 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def test_one_line_per_evaluation_and_tensorboard_from_the_same_records(shapes_root, tmp_path):
    lines = []
    tb = tmp_path / "tb" if _has_tensorboard() else None
    outcome = train_run(load_image_folder(shapes_root), tmp_path / "runs", RUN, backbone="demo-resnet", weights="none",
                        config=CFG, device="cpu", progress=False, hooks=watch_hooks(lines.append, tb))
    records = [r for r in read_records([outcome.run_dir]) if r["run_id"] == outcome.run_id]
    assert [r["step"] for r in records] == [0, 2, 4]
    evals = [line for line in lines if " step " in line]
    assert len(evals) == 3
    best = (-1.0, 0)
    for line, r in zip(evals, records):
        iid = iid_accuracy(r)
        best = max(best, (iid, -r["step"]))
        lr = lr_at(r["step"], RUN.lr, (2,))
        assert line == (f"{outcome.run_id[:8]} photo seed 0: step {r['step']} of 5, lr {lr:.3g}, loss {r['loss']:.4g}, "
                        f"i.i.d. {100 * iid:.1f}% (best {100 * best[0]:.1f}% at step {-best[1]}), "
                        f"o.o.d. {100 * ood_accuracy(r):.1f}%")
    if tb is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tb / tensorboard_run_name(records[0])))
        events.Reload()
        iid = events.Scalars("accuracy/iid")
        assert [e.step for e in iid] == [0, 2, 4]
        # float32 in the event file: equal to the records' accuracies to float32's resolution
        assert [e.value for e in iid] == pytest.approx([iid_accuracy(r) for r in records], rel=1e-6)


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_args(data_root, out, *extra):
    return [str(a) for a in ("finetune", data_root, "--backbone", "demo-resnet", "--weights", "none", "--steps", 3,
                             "--eval-every", 2, "--batch-size", 2, "--image-size", 32, "--workers", 0,
                             "--device", "cpu", "--seeds", 1, "--weight-decay", 0, "--test-domains", "photo",
                             "--out", out, *extra)]


def test_cli_lines_per_evaluation_and_quiet(shapes_root, tmp_path):
    loud = CliRunner().invoke(main, tiny_args(shapes_root, tmp_path / "loud", "--lr", 1e-3))
    assert loud.exit_code == 0, loud.output
    assert [line.split(": ")[1].split(",")[0] for line in loud.stderr.splitlines() if " seed 0: step " in line] == \
        ["step 0 of 3", "step 2 of 3"]
    quiet = CliRunner().invoke(main, tiny_args(shapes_root, tmp_path / "quiet", "--lr", 1e-3, "--quiet"))
    assert quiet.exit_code == 0 and " step " not in quiet.stderr


def test_cli_all_diverged_exits_1_with_one_line(shapes_root, tmp_path):
    # lr 1e12: the first update scales the weights by ~1e12, so the next forward overflows float32 within a few
    # layers and the evaluation at step 2 finds a loss that is not finite
    result = CliRunner().invoke(main, tiny_args(shapes_root, tmp_path / "runs", "--lr", 1e12, "--quiet"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    said = [line for line in result.stderr.splitlines() if "diverged (" in line]
    assert said == ["the run diverged (from scratch, dropout 0; lr 1e+12; weight decay 0): no usable result; "
                    "try a smaller --lr"]

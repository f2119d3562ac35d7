"""linft status: done / running / interrupted / diverged / to do runs of a sweep folder, read while jobs write it."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from linft.cli.main import main
from linft.data.folders import load_image_folder
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.train.finetune.run import train_run
from linft.train.finetune.hooks import RunHooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun
from linft.train.finetune.run_folder import RunFolder
from linft.train.sweeps.plan import write_plan
from linft.train.sweeps.status import describe_status, sweep_status

from conftest import make_image_folder
from helpers import rec

HOURS_AGO = time.time() - 2 * 3600  # far beyond the default 30 minutes: files this old belong to no running job


def write_records(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def age(paths, when: float) -> None:
    for p in paths:
        os.utime(p, (when, when))


def run_folder(out: Path, rid: str, records, checkpoint: bool) -> RunFolder:
    rf = RunFolder(out / rid)
    rf.root.mkdir(parents=True)
    rf.run_json.write_text(json.dumps({"run_id": rid}))
    write_records(rf.records, records)
    if checkpoint:
        rf.checkpoint.write_bytes(b"state")
    return rf


def r(step, run_id, iid_a, final=False, **kw):
    """A record of ``run_id`` at ``step`` (10 steps in all) whose i.i.d. accuracy is (iid_a + iid_a) / 20."""
    return rec(step, iid_a, iid_a, 20, 5, run_id=run_id, final=final, hparams={"steps": 10}, **kw)


@pytest.fixture
def sweep(tmp_path):
    """One run in every state, in run folders and in a linear records file, and a plan with one run not started."""
    out = tmp_path / "sweep"
    run_folder(out, "done", [r(0, "done", 5), r(5, "done", 9), r(9, "done", 7, final=True),
                             # a derived record of the run (its trajectory ensemble) counts with it, not as a run
                             r(9, "traj", 10, final=True, method="linear-ft-trajectory-ensemble")], False)
    run_folder(out, "diverged", [r(0, "diverged", 10), {**r(5, "diverged", 0, final=True), "status": "diverged"}],
               False)
    run_folder(out, "running", [r(0, "running", 4), r(5, "running", 6)], True)
    old = run_folder(out, "interrupted", [r(0, "interrupted", 3)], True)
    age([old.records, old.checkpoint, old.run_json], HOURS_AGO)
    write_records(out / "linear" / "records.jsonl", [r(0, "lin-done", 2), r(0, "lin-running", 1),
                                                     r(9, "lin-done", 8, final=True), r(3, "lin-running", 2)])
    write_plan(out, {rid: {"label": "m", "test_domain": "c", "seed": 0, "grid": {"lr": 1}}
                     for rid in ("done", "diverged", "running", "interrupted", "later")})
    return out


def test_every_state_of_a_sweep(sweep):
    status = sweep_status(sweep)
    assert status.counts() == {"done": 2, "running": 2, "interrupted": 1, "diverged": 1, "to do": 1}
    state = {s.run_id: s for s in status.runs}
    assert {k: v.state for k, v in state.items()} == {
        "done": "done", "diverged": "diverged", "running": "running", "interrupted": "interrupted",
        "lin-done": "done", "lin-running": "running", "later": "to do"}
    assert (state["running"].last_step, state["running"].steps) == (5, 10)
    assert state["lin-running"].last_step == 3 and state["interrupted"].last_step == 0
    # the best i.i.d. so far: run "done" at step 5 (18/20), not the diverged run's early 20/20
    [best] = status.best
    assert (best["run_id"], best["step"], best["iid"]) == ("done", 5, 0.9)
    assert best["ood"] == ood_accuracy(r(5, "done", 9)) and best["iid"] == iid_accuracy(r(5, "done", 9))
    text = describe_status(status)
    assert "2 done, 2 running, 1 interrupted, 1 diverged, 1 to do" in text
    assert "step 5 of 10" in text and "re-run the same command" in text


def test_a_run_is_running_while_its_files_change(sweep):
    assert {s.run_id for s in sweep_status(sweep, stale_after=1).runs if s.state == "interrupted"} >= {"interrupted"}
    rf = RunFolder(sweep / "interrupted")
    rf.records.write_text(rf.records.read_text() + json.dumps(r(5, "interrupted", 6)) + "\n")  # the job writes again
    state = {s.run_id: s for s in sweep_status(sweep).runs}["interrupted"]
    assert (state.state, state.last_step) == ("running", 5)


def test_cli_status_json_and_text(sweep):
    result = CliRunner().invoke(main, ["status", str(sweep), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["counts"] == {"done": 2, "running": 2, "interrupted": 1, "diverged": 1, "to do": 1}
    assert CliRunner().invoke(main, ["status", str(sweep)]).exit_code == 0
    missing = CliRunner().invoke(main, ["status", str(sweep / "nowhere")])
    assert missing.exit_code == 2 and missing.output.startswith("Error:") and "Traceback" not in missing.output


def test_real_fine_tuning_runs_done_interrupted_and_running(shapes_root, tmp_path, one_thread):
    ds, out = load_image_folder(shapes_root), tmp_path / "ft"
    config = FineTuneConfig(steps=5, batch_size=2, eval_every=2, image_size=32, eval_batch_size=64, workers=0)

    def stop_at_checkpoint_2(step, path):
        if step == 2:
            raise KeyboardInterrupt  # a job killed right after its checkpoint of step 2

    runs = [FineTuneRun("photo", seed=s, lr=1e-3, weight_decay=0.0) for s in range(3)]
    done = train_run(ds, out, runs[0], backbone="demo-resnet", weights="none", config=config, device="cpu",
                     progress=False)
    folders = []
    for run in runs[1:]:
        before = set(out.iterdir())
        with pytest.raises(KeyboardInterrupt):
            train_run(ds, out, run, backbone="demo-resnet", weights="none", config=config, device="cpu",
                      progress=False, hooks=RunHooks(on_checkpoint=stop_at_checkpoint_2))
        [root] = [p for p in out.iterdir() if p.is_dir() and p not in before]
        folders.append(RunFolder(root))
    stale = folders[0]
    age([stale.records, stale.checkpoint, stale.run_json, stale.selected], HOURS_AGO)
    states = {s.run_id: (s.state, s.last_step) for s in sweep_status(out).runs}
    assert states == {done.run_id: ("done", 4), stale.run_id: ("interrupted", 2), folders[1].run_id: ("running", 2)}


HOLD = """
import sys, time
from pathlib import Path
from linft.cache.extract import extract_features

def hold(done, total):  # keep the .partial file open for writing until the test says so
    if done < total:
        Path(sys.argv[3]).write_text(str(done))
        while not Path(sys.argv[4]).exists():
            time.sleep(0.05)

extract_features(sys.argv[1], sys.argv[2], backbone="resnet18", weights="none", image_size=32, batch_size=4,
                 workers=0, device="cpu", progress=False, on_checkpoint=hold)
"""


def test_partial_cache_read_while_another_process_writes_it(tmp_path):
    data = make_image_folder(tmp_path / "toy")
    cache, marker, release = tmp_path / "sweep" / "c.h5", tmp_path / "held", tmp_path / "release"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", HOLD, str(data), str(cache), str(marker), str(release)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert writer.poll() is None and time.time() < deadline, writer.communicate()[1][-2000:]
            time.sleep(0.1)
        partial = cache.with_name("c.h5.partial")
        info = CliRunner().invoke(main, ["cache", "info", str(partial)])
        assert info.exit_code == 0, info.output
        assert f"UNFINISHED ({marker.read_text()} of 18 images)" in info.output
        [entry] = sweep_status(tmp_path / "sweep").caches
        assert (entry["state"], entry["done"], entry["total"]) == ("extracting", int(marker.read_text()), 18)
    finally:
        release.write_text("go")
        _, err = writer.communicate(timeout=240)
    assert writer.returncode == 0, err[-2000:]
    assert cache.exists() and not cache.with_name("c.h5.partial").exists()


@pytest.mark.parametrize("entry", [1, "run", [1, 2], None,
                                   {"label": "m", "test_domain": "c", "seed": 0, "grid": 5},
                                   {"label": "m", "test_domain": "c", "seed": "zero", "grid": {}},
                                   {"label": ["m"], "test_domain": "c", "seed": 0, "grid": {}}])
def test_a_plan_whose_entries_are_not_plan_entries_is_refused(sweep, entry):
    plan = sweep / "planned.json"
    plan.write_text(json.dumps({"runs": {"later": entry}}))
    before = plan.read_bytes()
    for args in (["status", str(sweep)], ["status", str(sweep), "--json"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output and result.output.startswith("Error:"), result.output
        assert "planned.json" in result.output and "later" in result.output
    assert plan.read_bytes() == before

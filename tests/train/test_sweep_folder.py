"""SweepFolder names the files of a sweep folder as existing outputs name them (tests/compat), and the plan writer
keeps what was planned before."""

from __future__ import annotations

import json
from pathlib import Path

from linft.train.finetune.run_folder import RunFolder
from linft.train.sweeps.folder import SweepFolder
from linft.train.sweeps.plan import read_plan_file, write_plan

COMPAT = Path(__file__).parents[1] / "compat"


def test_names_are_those_of_existing_outputs():
    """identity.json lists the records files of the pinned pipeline's folders (``ft/plain`` is a fine-tuning sweep
    with ensembles across runs, ``linear`` a linear one, run folders written ``<run>``); the same files come from
    SweepFolder. tests/compat/records holds those files of release 0.2, each named ``records.jsonl``."""
    files = set(json.loads((COMPAT / "identity.json").read_text())["records"])
    out = Path("OUT")
    ft, linear = SweepFolder(out / "ft" / "plain"), SweepFolder(out / "linear")
    assert str(ft.across_runs_records.relative_to(out)) in files
    assert str(linear.records.relative_to(out)) in files
    assert str(ft.run("<run>").records.relative_to(out)) in files
    assert ft.run("0123456789abcdef") == RunFolder(out / "ft" / "plain" / "0123456789abcdef")
    on_disk = {p.relative_to(COMPAT / "records") for p in (COMPAT / "records").rglob("*") if p.is_file()}
    assert on_disk and {p.name for p in on_disk} == {ft.records.name}
    assert Path("ft", "plain_" + ft.across_runs.name, ft.across_runs_records.name) in on_disk  # folder flattened
    # not in the pinned outputs, named as README and every release since they exist: the plan and submitit's logs
    assert ft.plan == out / "ft" / "plain" / "planned.json"
    assert ft.submitit == out / "ft" / "plain" / "submitit" and ft.submitit_jobs == ft.submitit / "%j"


def test_plans_found_under_a_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_plan(tmp_path / "a", {"r1": {"label": "m", "test_domain": "x", "seed": 0, "grid": {}}})
    write_plan(tmp_path / "a" / "b", {"r2": {"label": "m", "test_domain": "x", "seed": 0, "grid": {}}})
    assert SweepFolder(tmp_path).plans() == [tmp_path / "a" / "b" / "planned.json", tmp_path / "a" / "planned.json"]


def test_plan_keeps_runs_planned_before_and_is_left_untouched_when_complete(tmp_path):
    entry = {"label": "m", "test_domain": "x", "seed": 0, "grid": {"lr": 0.1}}
    path = write_plan(tmp_path, {"r1": entry})
    assert path == SweepFolder(tmp_path).plan and read_plan_file(path) == {"r1": entry}
    write_plan(tmp_path, {"r2": {**entry, "seed": 1}})
    assert read_plan_file(path) == {"r1": entry, "r2": {**entry, "seed": 1}}
    before = path.stat().st_mtime_ns
    path.write_text(path.read_text())  # same content, known time
    stamp = path.stat().st_mtime_ns
    write_plan(tmp_path, {"r1": entry})
    assert path.stat().st_mtime_ns == stamp and stamp >= before
    path.write_text("{not json")
    assert read_plan_file(path) == {}  # an unreadable plan adds no run

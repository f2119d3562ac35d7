"""``linft report`` decides "already holds a report" under its output lock: a report another process wrote while
this one read its records is never silently replaced (issue 20, section 4)."""

import json
import os
import socket
import subprocess
import sys

from click.testing import CliRunner

import linft.analysis.report as report_module
from linft.analysis.report import write_report
from linft.cli.main import main
from linft.locks import LOCK_NAME
from linft.protocol.records import RecordWriter

from conftest import assert_one_line_error
from helpers import full_grid_records


def _records(folder):
    with RecordWriter(folder / "records.jsonl") as w:
        for r in full_grid_records():
            w.write(r)
    return folder


def test_a_report_written_between_the_first_check_and_the_lock_is_not_replaced(tmp_path, monkeypatch):
    """Deterministic race: the other report lands while this one reads its records (after the early check, before
    the lock). Today's code checked only before, so it replaced that report and exited 0."""
    runs, rep = _records(tmp_path / "runs"), tmp_path / "rep"
    real_read = report_module.read_records

    def read_then_race(paths):
        records = real_read(paths)
        rep.mkdir(exist_ok=True)
        (rep / "summary.md").write_text("the other report")
        return records
    monkeypatch.setattr(report_module, "read_records", read_then_race)
    result = CliRunner().invoke(main, ["report", str(runs), "--out", str(rep)])
    assert_one_line_error(result, "already holds a report (summary.md)", "force")
    assert (rep / "summary.md").read_text() == "the other report"
    assert sorted(p.name for p in rep.iterdir()) == ["summary.md"]  # no lock, no staging folder left behind
    # with force the race is settled the other way: the new report replaces it whole
    paths = write_report([runs], rep, force=True)
    assert paths["summary"].read_text().startswith("# linft report")


def test_a_report_while_another_process_holds_the_lock_is_refused_and_changes_nothing(tmp_path):
    runs, rep = _records(tmp_path / "runs"), tmp_path / "rep"
    rep.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (rep / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "command": "linft report", "started": "now"}))
        before = sorted(os.listdir(rep))
        result = CliRunner().invoke(main, ["report", str(runs), "--out", str(rep)])
        assert_one_line_error(result, "being written by another linft process", str(holder.pid))
        assert sorted(os.listdir(rep)) == before
    finally:
        holder.kill()
        holder.wait()

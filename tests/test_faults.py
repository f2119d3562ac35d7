"""Faults of the environment, made for real in a child process: a file-size limit (what a full disk or a quota
does to a write), a lock held by another process, sizes and read-only file systems in messages."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from linft.errors import LinftError
from linft.locks import lock_path, output_lock
from linft.output import human_bytes, writable_folder
from helpers import refused

# The child lowers its file-size limit (RLIMIT_FSIZE) and ignores SIGXFSZ: every write past the limit then fails
# with EFBIG, the way writes fail on a full disk, at an exact point.
LIMITED = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from linft.errors import LinftError
    try:
        exec(sys.argv[2])
    except LinftError as exc:
        print("Error:", exc)
        sys.exit(2)
""")


def limited(limit: int, code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_partial(tmp_path):
    proc = limited(100_000, """
        import torch
        from linft.runtime import atomic_save
        atomic_save({"x": torch.zeros(100_000)}, "ck.pt")
    """, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("Error: cannot write ck.pt (file too large") and proc.stdout.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_records_that_cannot_be_written_are_one_line_and_the_file_stays_readable(tmp_path):
    from linft.protocol.records import RecordWriter, read_records
    good = {"run_id": "r0", "step": 0, "splits": {"a_in": [1, 2], "a_out": [1, 2], "b_in": [3, 4], "b_out": [1, 1]},
            "test_domain": "a", "train_domains": ["b"],
            "seed": 0, "label": "m", "final": False}
    with RecordWriter(tmp_path / "records.jsonl") as w:
        w.write(good)
    size = (tmp_path / "records.jsonl").stat().st_size
    proc = limited(size + 100, """
        from linft.protocol.records import RecordWriter
        with RecordWriter("records.jsonl") as w:
            for step in range(1, 100):
                w.write({**%r, "step": step, "pad": "x" * 60})
    """ % good, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write run records to records.jsonl (file too large" in proc.stdout
    assert "finished runs are kept" in proc.stdout
    records = read_records([tmp_path / "records.jsonl"])  # a torn last line is skipped, the rest is intact
    assert records[0]["step"] == 0 and [r["step"] for r in records] == list(range(len(records)))
    with RecordWriter(tmp_path / "records.jsonl") as w:  # appending again drops the torn line first
        w.write({**good, "step": 50})
    assert read_records([tmp_path / "records.jsonl"])[-1]["step"] == 50


def test_sizes_in_messages_are_never_zero_gib():
    assert human_bytes(0) == "0 B" and human_bytes(512) == "512 B"
    assert human_bytes(3 * 2**20 + 2**19) == "3.5 MiB" and human_bytes(3 * 2**30) == "3.00 GiB"


def test_a_lock_names_its_owner_and_a_dead_owners_lock_is_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from linft.locks import output_lock
        with output_lock({str(tmp_path / 'out')!r}, folder=True):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LinftError, match=rf"being written by another linft process \(pid {child.pid} on "
                                             rf"{socket.gethostname()}.*delete .*\.linft\.lock"):
            with output_lock(tmp_path / "out", folder=True):
                pass
    finally:
        child.kill()
        child.wait()
    lock = lock_path(tmp_path / "out", folder=True)
    assert json.loads(lock.read_text())["pid"] == child.pid  # a killed owner leaves its lock behind ...
    with output_lock(tmp_path / "out", folder=True):  # ... which the next command takes over
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def read_only_mount():
    """A folder on a file system mounted read-only on this machine, or None."""
    try:
        lines = open("/proc/mounts").read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and "ro" in fields[3].split(",") and os.path.isdir(fields[1]):
            return fields[1]
    return None


@pytest.mark.skipif(read_only_mount() is None, reason="no read-only mount on this machine")
def test_a_read_only_file_system_is_named_as_such():
    folder = read_only_mount()
    with refused("out_dir") as err:
        writable_folder(folder)
    assert "(read-only file system)" in str(err.value)


def test_a_terminated_command_releases_its_lock(tmp_path):
    """Slurm's time limit sends SIGTERM: the command leaves through its clean-up, so the lock is gone and a
    resubmitted job (maybe on another host, where a dead owner cannot be checked) is not refused."""
    import signal
    script = textwrap.dedent(f"""
        import time
        import click
        from linft.cli.main import LinftGroup
        from linft.locks import output_lock

        class Group(LinftGroup):  # linft's group (its signal handling and errors) with one test command
            def get_command(self, ctx, name):
                return click.Group.get_command(self, ctx, name)

        @click.command()
        def hold():
            with output_lock({str(tmp_path / 'out')!r}, folder=True):
                print("locked", flush=True)
                time.sleep(60)
        group = Group(commands={{"hold": hold}})
        group(["hold"])
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    lock = lock_path(tmp_path / "out", folder=True)
    assert lock.exists()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 130
    assert "interrupted; re-run the same command to resume" in child.stderr.read()
    assert not lock.exists()


def test_a_stale_lock_taken_over_by_one_process_is_not_taken_from_it(tmp_path):
    """Two processes saw the same dead owner; one took the lock over. The other must not remove that new lock."""
    from linft.locks import take_over_stale
    out = tmp_path / "out"
    out.mkdir()
    lock = lock_path(out, folder=True)
    dead = {"pid": 2**22 + 7, "host": socket.gethostname(), "started": "then", "command": "killed"}
    lock.write_text(json.dumps(dead))
    with output_lock(out, folder=True):  # took it over from the dead owner
        mine = json.loads(lock.read_text())
        take_over_stale(lock, dead)  # the slower process, acting on what it read before
        assert json.loads(lock.read_text()) == mine
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from linft.locks import output_lock
            from linft.errors import LinftError
            try:
                with output_lock({str(out)!r}, folder=True):
                    print("taken")
            except LinftError as exc:
                print(exc)
        """)], capture_output=True, text=True, timeout=120)
        assert f"being written by another linft process (pid {os.getpid()}" in proc.stdout
    assert not lock.exists() and sorted(p.name for p in out.iterdir()) == []


def test_nested_locks_of_one_process_match_however_the_path_is_spelled(tmp_path):
    (tmp_path / "x").mkdir()
    with output_lock(tmp_path / "a", folder=True):
        with output_lock(tmp_path / "x" / ".." / "a", folder=True):
            pass
        assert lock_path(tmp_path / "a", folder=True).exists()
    assert not lock_path(tmp_path / "a", folder=True).exists()


def test_a_report_on_a_full_disk_names_the_report_and_keeps_the_previous_one(tmp_path):
    from linft.analysis.report import write_report
    from linft.protocol.records import RecordWriter
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import full_grid_records
    with RecordWriter(tmp_path / "runs" / "records.jsonl") as w:
        for r in full_grid_records():
            w.write(r)
    before = {p.name: p.read_bytes() for p in write_report([tmp_path / "runs"], tmp_path / "rep").values()}
    proc = limited(2000, f"""
        from linft.analysis.report import write_report
        write_report([{str(tmp_path / 'runs')!r}], {str(tmp_path / 'rep')!r}, force=True)
    """, tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith(f"Error: cannot write the report to {tmp_path / 'rep'} (file too large")
    assert ".partial" not in proc.stdout and "previous report, if any, is unchanged" in proc.stdout
    assert {p.name: p.read_bytes() for p in (tmp_path / "rep").iterdir()} == before


@pytest.mark.parametrize("pid", [2**63, 10**30, -(2**63)])
def test_a_lock_of_an_out_of_range_pid_is_a_dead_owners_lock(tmp_path, pid):
    lock = lock_path(tmp_path / "out", folder=True)
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then", "command": "x"}))
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with output_lock(tmp_path / "out", folder=True):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("folder", [True, False])
def test_a_lock_path_that_is_a_folder_is_refused_and_left_where_it_is(tmp_path, folder):
    target = tmp_path / ("out" if folder else "out.h5")
    lock = lock_path(target, folder=folder)
    (lock / "mine").mkdir(parents=True)
    (lock / "mine" / "data.txt").write_text("keep")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(LinftError, match="folder"):
        with output_lock(target, folder=folder):
            pass
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (lock / "mine" / "data.txt").read_text() == "keep"


@pytest.mark.parametrize("length", [200, 230, 250, 255])
def test_a_legal_output_file_name_of_any_length_is_locked_and_written(tmp_path, length):
    from linft.output import atomic_write_text

    target = tmp_path / ("x" * (length - 3) + ".h5")
    assert len(target.name) == length
    with output_lock(target):
        atomic_write_text(target, "done")
        assert len(os.listdir(tmp_path)) == 2  # the output and its lock
    assert os.listdir(tmp_path) == [target.name] and target.read_text() == "done"
    other = tmp_path / ("x" * (length - 4) + "y.h5")  # another long name: another lock
    assert lock_path(other) != lock_path(target)

"""Record sinks: every record written to a records file also reaches the sinks; TensorBoard event files read back."""

import sys

import pytest

from linft.errors import LinftError
from linft.protocol.records import RecordWriter, read_records
from linft.protocol.selection import iid_accuracy, ood_accuracy
from linft.protocol.sinks import TENSORBOARD_INSTALL, TensorBoardSink, record_scalars, tensorboard_run_name

from helpers import rec


class ListSink:
    def __init__(self):
        self.records, self.closed = [], 0

    def write(self, record):
        self.records.append(record)

    def close(self):
        self.closed += 1


def two_runs():
    """Run r1: steps 0, 5 (final); run r2: step 0, then diverged at 5."""
    return [rec(0, 6, 4, 20, 5, run_id="r1", loss=0.9), rec(0, 5, 5, 10, 5, run_id="r2", loss=1.2),
            rec(5, 8, 7, 30, 6, run_id="r1", loss=0.4, final=True),
            {**rec(5, 0, 0, 0, 0, run_id="r2", final=True), "status": "diverged", "loss": None}]


def test_every_record_reaches_every_sink_and_the_file_stays_the_reference(tmp_path):
    sinks = [ListSink(), ListSink()]
    with RecordWriter(tmp_path / "records.jsonl", sinks=sinks) as writer:
        for r in two_runs():
            writer.write(r)
    on_disk = read_records([tmp_path / "records.jsonl"])
    assert on_disk == two_runs()
    for sink in sinks:
        assert sink.records == two_runs() and sink.closed == 1


def test_scalars_of_a_record():
    ok, diverged = two_runs()[2], two_runs()[3]
    assert record_scalars(ok) == {"accuracy/iid": iid_accuracy(ok), "accuracy/ood": ood_accuracy(ok), "loss/train": 0.4}
    assert record_scalars(diverged) == {"diverged": 1.0}
    assert tensorboard_run_name(ok) == "m/c/seed0_lr1_r1"


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = two_runs()
    with RecordWriter(tmp_path / "records.jsonl", sinks=[TensorBoardSink(tmp_path / "tb")]) as writer:
        for r in records:
            writer.write(r)
    r1 = EventAccumulator(str(tmp_path / "tb" / tensorboard_run_name(records[0])))
    r1.Reload()
    assert set(r1.Tags()["scalars"]) == {"accuracy/iid", "accuracy/ood", "loss/train"}
    for tag, of in (("accuracy/iid", iid_accuracy), ("accuracy/ood", ood_accuracy)):
        events = r1.Scalars(tag)
        assert [e.step for e in events] == [0, 5]
        # TensorBoard stores scalars as float32: equal to the record's accuracy to float32's resolution
        assert [e.value for e in events] == pytest.approx([of(records[0]), of(records[2])], rel=1e-6)
    r2 = EventAccumulator(str(tmp_path / "tb" / tensorboard_run_name(records[1])))
    r2.Reload()
    assert [(e.step, e.value) for e in r2.Scalars("diverged")] == [(5, 1.0)]
    assert [e.step for e in r2.Scalars("accuracy/iid")] == [0]


def test_missing_tensorboard_is_one_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what an import finds without the package
    with pytest.raises(LinftError, match="pip install 'linft\\[tensorboard\\]'") as info:
        TensorBoardSink(tmp_path / "tb")
    assert TENSORBOARD_INSTALL in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "tb").exists()  # a refusal leaves nothing on disk

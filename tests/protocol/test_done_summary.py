"""One wording of "N trained, M already done" (linft.protocol.records.done_summary) for every command and the demo."""

from __future__ import annotations

from linft.protocol.records import done_summary


def test_the_wording():
    assert done_summary(3, 5) == "3 runs trained, 5 already done"
    assert done_summary(1, 0) == "1 run trained, 0 already done"
    assert done_summary(72, 0, diverged=72) == "72 runs trained (72 diverged), 0 already done"
    assert done_summary(4, 2, verb="submitted", failed=1) == "4 runs submitted (1 failed), 2 already done"
    assert done_summary(6, 12, verb="extracted", unit="image") == "6 images extracted, 12 already done"
    assert done_summary(22, 0, verb="written", unit="record") == "22 records written, 0 already done"
    assert done_summary(12_000, 1_000, verb="extracted", unit="image") == "12,000 images extracted, 1,000 already done"


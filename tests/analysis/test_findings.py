"""The paper's claims checked on records (linft.analysis.findings): paired differences against the formula, which
labels are compared, the sentences, and summary.md's closing section."""

from __future__ import annotations

import json
import math
import re

import pytest

from linft.analysis.aggregate import run_results
from linft.analysis.findings import (Finding, finding_sentence, findings, findings_text, paired_difference,
                                     with_dropout)
from linft.analysis.report import write_report
from linft.protocol.records import RECORDS_FILE

from helpers import rec


def _run(label, method, dropout, seed, c_total, grid=1, iid=8):
    """A final record of held-out c with o.o.d. accuracy c_total / 50 (c_in + c_out of 40 + 10)."""
    return rec(0, iid, iid, c_total - 5, 5, label=label, method=method, dropout=dropout, seed=seed, grid={"lr": grid},
               run_id=f"{label}-{seed}-{grid}", final=True)


def test_paired_difference_is_the_mean_and_sample_se_of_the_per_seed_differences():
    records = [_run("linear FT, dropout 0.9", "linear-ft", 0.9, s, c) for s, c in ((0, 30), (1, 40), (2, 45))]
    records += [_run("linear FT, dropout 0", "linear-ft", 0.0, s, c) for s, c in ((0, 25), (1, 30))]
    mean, se, n = paired_difference(run_results(records), "toy", "linear FT, dropout 0.9", "linear FT, dropout 0")
    diffs = [(30 - 25) / 50, (40 - 30) / 50]  # seed 2 has no partner: left out
    assert n == 2
    assert mean == pytest.approx(sum(diffs) / 2, abs=1e-12)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    assert se == pytest.approx(sd / math.sqrt(n), abs=1e-12)


def test_the_difference_is_taken_at_the_grid_point_selection_chose():
    """Per seed the grid point with the best i.i.d. accuracy (lr 2 here), not the best o.o.d. one (lr 1)."""
    records = [_run("full FT, dropout 0.9", "finetune", 0.9, 0, 45, grid=1, iid=5),
               _run("full FT, dropout 0.9", "finetune", 0.9, 0, 20, grid=2, iid=9),
               _run("full FT, dropout 0", "finetune", 0.0, 0, 30)]
    mean, se, n = paired_difference(run_results(records), "toy", "full FT, dropout 0.9", "full FT, dropout 0")
    assert (mean, se, n) == (pytest.approx((20 - 30) / 50, abs=1e-12), None, 1)
    oracle = paired_difference(run_results(records), "toy", "full FT, dropout 0.9", "full FT, dropout 0", "oracle")
    assert oracle[0] == pytest.approx((45 - 30) / 50, abs=1e-12)


def test_no_shared_pair_gives_none():
    records = [_run("linear FT, dropout 0.9", "linear-ft", 0.9, 0, 30),
               _run("linear probe", "linear-probe", 0.0, 1, 30)]
    assert paired_difference(run_results(records), "toy", "linear FT, dropout 0.9", "linear probe") is None


def test_with_dropout_rewrites_the_rate_only():
    assert with_dropout("full FT, dropout 0.9, 10x head lr", 0) == "full FT, dropout 0, 10x head lr"
    assert with_dropout("linear probe", 0) == "linear probe"


def _paper_records():
    out = []
    for s in (0, 1):
        out += [_run("full FT, dropout 0", "finetune", 0.0, s, 30 + s),
                _run("full FT, dropout 0.9", "finetune", 0.9, s, 36 + s),
                _run("full FT, dropout 0, trajectory ensemble", "finetune-trajectory-ensemble", 0.0, s, 33),
                _run("full FT, dropout 0.9, trajectory average", "finetune-trajectory-average", 0.9, s, 40),
                _run("linear FT, dropout 0", "linear-ft", 0.0, s, 30),
                _run("linear FT, dropout 0.9", "linear-ft", 0.9, s, 34 + 2 * s),
                _run("linear probe", "linear-probe", 0.0, s, 30)]
    return out


def test_the_comparisons_are_the_papers():
    found = {(f.claim, f.label, f.other) for f in findings(run_results(_paper_records()))}
    assert found == {
        ("dropout", "full FT, dropout 0.9", "full FT, dropout 0"),
        ("dropout", "linear FT, dropout 0.9", "linear FT, dropout 0"),
        # an ensemble of dropout-0 runs against dropout; the average of dropout-0.9 runs is not the paper's comparison
        ("ensembles and weight averages", "full FT, dropout 0, trajectory ensemble", "full FT, dropout 0.9"),
        ("linear FT vs probe", "linear FT, dropout 0", "linear probe"),
        ("linear FT vs probe", "linear FT, dropout 0.9", "linear probe"),
    }


def test_a_label_the_paper_does_not_name_is_compared_with_nothing():
    """"m" and "m, dropout 0.9" (no rate at dropout 0 in the label, no "linear FT" prefix): no comparison at all,
    in particular never a label with itself."""
    records = [_run("m", "linear-ft", 0.0, s, 30) for s in (0, 1)]
    records += [_run("m, dropout 0.9", "linear-ft", 0.9, s, 35) for s in (0, 1)]
    assert findings(run_results(records)) == []


def test_the_comparisons_hold_when_labels_carry_their_model():
    """Records of two models: labels get a "<model>: " prefix; the probe is found with the same prefix."""
    records = []
    for weights in ("a", "b"):
        pair = (_run("linear FT, dropout 0.9", "linear-ft", 0.9, 0, 34), _run("linear probe", "linear-probe", 0, 0, 30))
        for r in pair:
            records.append({**r, "backbone": "resnet50", "weights": weights, "source": weights,
                            "run_id": r["run_id"] + weights})
    probes = [f for f in findings(run_results(records)) if f.claim == "linear FT vs probe"]
    assert len(probes) == 2 and all(f.other.endswith(": linear probe") and f.label[:3] == f.other[:3] for f in probes)


def test_sentences_say_who_beat_whom_with_the_size_and_its_se():
    def say(difference, se, n=4):
        return finding_sentence(Finding("dropout", "toy", "A", "B", difference, se, n))

    assert say(0.05, 0.01) == ("toy: A beat B o.o.d.: +5.0 ± 1.0 points (mean ± SE of 4 differences paired by "
                               "held-out domain and seed).")
    assert say(-0.05, 0.02).startswith("toy: A did not beat B o.o.d.: -5.0 ± 2.0 points (")
    assert say(-0.01, 0.02).endswith("; within two standard errors, not a clear loss.")
    assert say(0.04, 0.02).endswith("; within two standard errors, not a clear win.")  # exactly 2 SE: not clear
    assert say(0.0, 0.0) == ("toy: A tied with B o.o.d. (+0.0 ± 0.0 points; mean ± SE of 4 differences paired by "
                             "held-out domain and seed).")
    assert say(0.02, None, 1) == ("toy: A beat B o.o.d.: +2.0 points (a single held-out domain and seed: no SE).")
    assert say(0.0004, 0.0001).startswith("toy: A beat B o.o.d.: +0.04 ± 0.01 points")  # not shown as +0.0 ± 0.0


def test_findings_text_orders_claims_as_the_paper():
    claims = [re.split(" beat | did not beat | tied with ", line.split(": ", 1)[1])[0]
              for line in findings_text(run_results(_paper_records()))]
    assert claims[:2] == ["full FT, dropout 0.9", "linear FT, dropout 0.9"]
    assert claims[2] == "full FT, dropout 0, trajectory ensemble"
    assert claims[3:] == ["linear FT, dropout 0", "linear FT, dropout 0.9"]


def test_summary_ends_with_the_findings_under_the_given_title(tmp_path):
    (tmp_path / "runs").mkdir()
    records = _paper_records()
    (tmp_path / "runs" / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = write_report([tmp_path / "runs"], tmp_path / "report", findings_title="What this demo shows")
    text = paths["summary"].read_text()
    tail = text[text.index("**What this demo shows**"):]
    assert tail.splitlines()[-1].startswith("- toy: linear FT, dropout 0.9 beat linear probe o.o.d.: +10.0 ± 2.0")
    assert [line for line in tail.splitlines() if line.startswith("- ")] == [
        f"- {line}" for line in findings_text(run_results(records))]


def test_summary_has_no_findings_section_when_nothing_compares(tmp_path):
    (tmp_path / "runs").mkdir()
    records = [_run("linear FT, dropout 0.9", "linear-ft", 0.9, 0, 30)]
    (tmp_path / "runs" / RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report([tmp_path / "runs"], tmp_path / "report")["summary"].read_text()
    assert "What these records show" not in text

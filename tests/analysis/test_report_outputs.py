"""What a report hands to other tools: strict JSON, flat CSVs with stated units, figures only when there is something
to draw (PNG and PDF, percent on every axis), and summary.md stating its tie and standard-error rules."""

import csv
import json
import math
import warnings

import pytest
from click.testing import CliRunner

from linft.analysis.aggregate import domainbed_table, run_results, tie_counts
from linft.analysis.report import summary_tables, write_report
from linft.cli.main import main
from linft.protocol.records import RecordWriter
from linft.output import json_text

from helpers import full_grid_records, grid_records, rec


def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (as strict parsers such as jq or JSON.parse do)."""
    return json.loads(text, parse_constant=refuse)


def write(folder, records):
    with RecordWriter(folder / "records.jsonl") as w:
        for r in records:
            w.write(r)
    return folder


def test_json_text_writes_null_for_nan_and_infinities():
    text = json_text({"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": "x"}})
    assert strict(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": "x"}}


def test_summary_rows_and_cli_json_are_strict(tmp_path):
    # held out on c only: the average column has no value (a and b were never held out)
    runs = write(tmp_path / "runs", grid_records())
    rows = summary_tables([runs])["rows"]
    average = next(r for r in rows if r["test_domain"] == "average")
    assert average["ood"] == [None, None] and average["iid"] == [None, None]
    assert strict(json.dumps(rows)) == rows  # even a plain json.dumps of the rows is strict
    cell = next(r for r in rows if r["test_domain"] == "c")
    assert cell["ood"] == pytest.approx([0.55, 0.05])
    result = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep"), "--json"])
    assert result.exit_code == 0, result.output
    assert strict(result.output)["summary"].endswith("summary.md")


def test_runs_csv_has_flat_columns_and_fractions(tmp_path):
    linear = grid_records()
    linear[0]["grid"] = {"lr": 1, "weight_decay": 0.5}  # one run with an extra hyper-parameter
    soups = [rec(0, 7, 7, 20, 5, label="m, soup", method="linear-ft-soup", grid={}, seed=s, run_id=f"s{s}",
                 final=True, hparams={"members": 2}) for s in (0, 1)]
    runs = write(tmp_path / "runs", linear + soups)
    paths = write_report([runs], tmp_path / "rep")
    with open(paths["runs"], newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == ["dataset", "model", "label", "method", "test_domain", "seed", "dropout", "lr", "weight_decay",
                      "step", "iid_acc", "ood_acc", "status"]
    assert "{" not in paths["runs"].read_text()  # no Python repr of a dict
    table = [dict(zip(header, r)) for r in rows]
    first = next(r for r in table if r["label"] == "m" and r["seed"] == "0" and r["lr"] == "1")
    assert (first["weight_decay"], first["dropout"], first["iid_acc"], first["ood_acc"]) == ("0.5", "0.0", "0.6",
                                                                                                 "0.4")
    assert next(r for r in table if r["label"] == "m" and r["lr"] == "2")["weight_decay"] == ""  # absent: blank
    soup = [r for r in table if r["method"] == "linear-ft-soup"]
    assert len(soup) == 2 and all(r["lr"] == r["weight_decay"] == r["dropout"] == "" for r in soup)
    assert all(0 <= float(r["iid_acc"]) <= 1 and 0 <= float(r["ood_acc"]) <= 1 for r in table)
    with open(paths["table"], newline="") as fh:
        assert next(csv.reader(fh)) == ["dataset", "label", "test_domain", "iid_acc_mean", "iid_acc_se",
                                        "ood_acc_mean", "ood_acc_se", "seeds"]
    summary = paths["summary"].read_text()
    assert "accuracies are fractions in [0, 1] in every CSV (columns named *_acc*) and percent in the markdown" \
        in summary


def test_a_single_held_out_domain_draws_no_empty_figure(tmp_path):
    # two dropout rates, but only c held out: no average column, hence no dropout curve and no cloud
    records = grid_records() + [{**r, "label": "m, dropout 0.9", "run_id": "d" + r["run_id"],
                                 "hparams": {"dropout": 0.9}} for r in grid_records()]
    runs = write(tmp_path / "runs", records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = write_report([runs], tmp_path / "rep")
    assert not caught, [str(w.message) for w in caught]
    assert set(paths) == {"runs", "table", "clouds_csv", "summary"}
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["clouds.csv", "runs.csv", "summary.md",
                                                                       "table.csv"]
    assert "dropout" not in paths["summary"].read_text().split("Files:")[1]


def test_every_figure_as_png_and_pdf(tmp_path):
    records = full_grid_records() + [{**r, "label": "m, dropout 0.9", "run_id": "d" + r["run_id"],
                                      "hparams": {"dropout": 0.9}} for r in full_grid_records()]
    paths = write_report([write(tmp_path / "runs", records)], tmp_path / "rep")
    for name in ("clouds", "dropout"):
        assert paths[f"{name}_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert paths[f"{name}_pdf"].read_bytes()[:5] == b"%PDF-" and paths[f"{name}_pdf"].suffix == ".pdf"
        assert paths[f"{name}_pdf"].name in paths["summary"].read_text()


def tied_records():
    """Held out c, two seeds; seed 0: grid points lr 2 and lr 1 tie at i.i.d. 0.7 (written in that order) with
    o.o.d. 0.2 and 0.6; seed 1: no tie, lr 1 wins (i.i.d. 0.8, o.o.d. 0.5)."""
    return [rec(0, 7, 7, 10, 0, grid={"lr": 2}, seed=0, run_id="t20", final=True),
            rec(0, 7, 7, 30, 0, grid={"lr": 1}, seed=0, run_id="t10", final=True),
            rec(0, 8, 8, 25, 0, grid={"lr": 1}, seed=1, run_id="t11", final=True),
            rec(0, 5, 5, 40, 0, grid={"lr": 2}, seed=1, run_id="t21", final=True)]


def test_ties_go_to_the_first_grid_point_and_are_counted():
    results = run_results(tied_records())
    cell = domainbed_table(results)[("toy", "m")]["c"]
    # seed 0: the tie goes to lr 1 (the first grid point in sorted order, not the first written): o.o.d. 0.6
    assert cell["ood"] == pytest.approx(((0.6 + 0.5) / 2, 0.05))
    assert tie_counts(results) == {("toy", "m"): (1, 2)}


def test_summary_states_ties_and_the_standard_error_and_domainbed_is_an_option(tmp_path):
    runs = write(tmp_path / "runs", full_grid_records())
    summary = write_report([runs], tmp_path / "rep")["summary"].read_text()
    assert "Ties: within a run, the earliest of the evaluation steps with the best score" in summary
    assert "the first grid point in sorted order" in summary
    assert "SE = std(x, ddof=1) / sqrt(n)" in summary and "| m | 55.0 ± 5.0 |" in summary
    # DomainBed's convention: per-seed o.o.d. 0.5 and 0.6, SE = 0.1 / (2 sqrt 2) = 3.5 points
    result = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "db"), "--se", "domainbed"])
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "db" / "summary.md").read_text()
    assert f"{100 * 0.1 / (2 * math.sqrt(2)):.1f}" == "3.5" and "| m | 55.0 ± 3.5 |" in summary
    assert "SE = std(x, ddof=0) / sqrt(n)" in summary and "DomainBed's SE, ddof=0" in summary
    with open(tmp_path / "db" / "table.csv", newline="") as fh:
        average = next(r for r in csv.DictReader(fh) if r["test_domain"] == "average")
    assert float(average["ood_acc_se"]) == pytest.approx(0.1 / (2 * math.sqrt(2)))
    bad = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "x"), "--se", "ddof0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_an_existing_report_is_refused_unless_forced_and_then_replaced_whole(tmp_path):
    from conftest import assert_one_line_error
    runs = write(tmp_path / "runs", full_grid_records() + [
        {**r, "label": "m, dropout 0.9", "run_id": "d" + r["run_id"], "hparams": {"dropout": 0.9}}
        for r in full_grid_records()])
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "summary.md").write_text("my own notes")
    (rep / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["report", str(runs), "--out", str(rep)])
    assert_one_line_error(result, "already holds a report (summary.md)", "--force")
    assert (rep / "summary.md").read_text() == "my own notes"
    assert sorted(p.name for p in rep.iterdir()) == ["mine.txt", "summary.md"]
    first = write_report([runs], rep, force=True)
    assert "dropout_png" in first and (rep / "dropout.pdf").exists()
    # a report of other records replaces the whole report: the dropout figure it does not draw is gone
    only = write(tmp_path / "only", full_grid_records())
    second = write_report([only], rep, force=True)
    assert "dropout_png" not in second and not (rep / "dropout.png").exists() and not (rep / "dropout.pdf").exists()
    assert (rep / "mine.txt").read_text() == "keep me" and not list(rep.glob(".*"))


def test_what_a_killed_report_left_aside_is_cleared_by_the_next_one(tmp_path):
    """A report killed while writing aside leaves ``.report.partial`` (a folder, or anything in its place): the next
    forced report clears it and is complete. (A write that fails half-way through the staged files, leaving the
    previous report as it was, is tests/test_faults.py's full-disk test.)"""
    runs = write(tmp_path / "runs", full_grid_records())
    rep = tmp_path / "rep"
    before = sorted(write_report([runs], rep))
    for leftover in ("file", "folder"):
        staging = rep / ".report.partial"
        if leftover == "file":
            staging.write_text("in the way")
        else:
            (staging / "sub").mkdir(parents=True)
            (staging / "sub" / "clouds.png").write_text("torn")
        assert sorted(write_report([runs], rep, force=True)) == before
        assert not staging.exists() and not list(rep.glob(".*"))

"""write_report: the files of a report from run records (tables, CSVs, plots) and `linft report`."""

import csv
import json

import pytest
from click.testing import CliRunner

from linft.analysis.report import summary_tables, write_report
from linft.cli.main import main
from linft.errors import LinftError
from linft.protocol.records import RecordWriter

from helpers import full_grid_records, grid_records


@pytest.fixture
def runs(tmp_path):
    """Records of three labels: m and "m, dropout 0.9" on every held-out domain, partial on c only."""
    with RecordWriter(tmp_path / "runs" / "records.jsonl") as w:
        for r in full_grid_records():
            w.write(r)
        for r in full_grid_records():
            w.write({**r, "label": "m, dropout 0.9", "run_id": "o" + r["run_id"], "hparams": {"dropout": 0.9}})
        for r in grid_records():  # a method run on one held-out domain only
            w.write({**r, "label": "partial", "run_id": "p" + r["run_id"]})
    return tmp_path / "runs"


def test_write_report_and_its_files(runs, tmp_path):
    paths = write_report([runs], tmp_path / "rep")
    for name in ("summary", "table", "runs", "clouds_csv", "clouds_png", "clouds_pdf", "dropout_png", "dropout_pdf"):
        assert paths[name].exists() and paths[name].parent == tmp_path / "rep", name
    assert "interpolation_png" not in paths and "figure9_png" not in paths  # no interpolation records, one model
    summary = paths["summary"].read_text()
    assert "| m | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 |" in summary
    assert "| m, dropout 0.9 |" in summary
    assert "| partial | — | — | 55.0 ± 5.0 | — |" in summary
    assert "partial on toy: no usable run for held-out a, b" in summary
    assert "| toy | m | 12 | 0 | 0 | 8 | 0 of 6 |" in summary
    assert "| toy | partial | 4 | 0 | 0 | 0 | 0 of 2 |" in summary
    with open(paths["runs"], newline="") as fh:
        run_rows = list(csv.DictReader(fh))
    assert len(run_rows) == 12 + 12 + 4 and {r["status"] for r in run_rows} == {"ok"}
    with open(paths["clouds_csv"], newline="") as fh:
        cloud_rows = list(csv.DictReader(fh))
    # 2 grid points ^ 3 held-out domains for both m labels; partial has no cloud (it lacks a and b)
    assert sorted({r["label"] for r in cloud_rows}) == ["m", "m, dropout 0.9"] and len(cloud_rows) == 2 * 8
    with open(paths["table"], newline="") as fh:
        table = {(r["label"], r["test_domain"]): r for r in csv.DictReader(fh)}
    assert float(table[("m", "average")]["ood_acc_mean"]) == pytest.approx(0.55)
    assert float(table[("m", "average")]["ood_acc_se"]) == pytest.approx(0.05)
    assert table[("m", "average")]["seeds"] == "2"


def test_summary_tables_and_rerun_rewrite_the_same_files(runs, tmp_path):
    short = summary_tables([runs])
    assert "| m | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 |" in short["markdown"]
    assert {(row["label"], row["test_domain"]) for row in short["rows"]} >= {("m", "a"), ("m", "average")}
    first = write_report([runs], tmp_path / "rep")
    texts = {k: p.read_text() for k, p in first.items() if p.suffix in (".md", ".csv")}
    again = write_report([runs], tmp_path / "rep", force=True)  # the same code path twice: the same text files
    assert {k: p.read_text() for k, p in again.items() if p.suffix in (".md", ".csv")} == texts


def test_report_cli(runs, tmp_path):
    result = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep2"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["summary"].endswith("summary.md")
    plain = CliRunner().invoke(main, ["report", str(runs), "--out", str(tmp_path / "rep3")])
    assert plain.exit_code == 0 and "| m | 55.0 ± 5.0 |" in plain.output
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "none")])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_empty_records_are_refused(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "records.jsonl").write_text("")
    with pytest.raises(LinftError, match="are empty; train something first"):
        write_report([tmp_path / "runs"], tmp_path / "rep")
    assert not (tmp_path / "rep").exists()

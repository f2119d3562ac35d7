"""write_report: the files of a report from run records (tables, CSVs, plots) and `linft report`."""

import csv
import json
from itertools import product

import pytest
from click.testing import CliRunner

from linft.analysis.report import summary_tables, write_report
from linft.cli.main import main
from linft.errors import LinftError
from linft.protocol.records import RecordWriter


def rec(step, a_out, b_out, c_in, c_out, **kw):
    """A record with training domains a, b (out splits of 10) and held-out c (in 40, out 10)."""
    r = {"method": "linear-ft", "label": kw.pop("label", "m"), "dataset": "toy", "source": kw.pop("source", "p"),
         "test_domain": "c", "train_domains": ["a", "b"], "grid": kw.pop("grid", {"lr": 1}), "seed": kw.pop("seed", 0),
         "run_id": kw.pop("run_id", "r1"), "attempt": kw.pop("attempt", "x"), "step": step, "status": "ok",
         "final": kw.pop("final", False), "hparams": {"dropout": kw.pop("dropout", 0.0)},
         "splits": {"a_in": [0, 40], "a_out": [a_out, 10], "b_in": [0, 40], "b_out": [b_out, 10],
                    "c_in": [c_in, 40], "c_out": [c_out, 10]}}
    r.update(kw)
    return r


def _grid_records():
    """2 grid points x 2 seeds for held-out c, final records only: per seed the best i.i.d. grid point has o.o.d.
    25/50 (seed 0) and 30/50 (seed 1), so 55.0 ± 5.0."""
    out = []
    for (g, seed), (a, c) in zip(product((1, 2), (0, 1)), [(6, 20), (8, 30), (7, 25), (5, 40)]):
        out.append(rec(0, a, a, c, 0, grid={"lr": g}, seed=seed, run_id=f"{g}-{seed}", final=True))
    return out


def _held_out(r, test):
    """The same record with ``test`` held out: a's and b's roles go to the other two domains, c's to ``test``."""
    x, y = [d for d in "abc" if d != test]
    sp = r["splits"]
    splits = {f"{x}_in": sp["a_in"], f"{x}_out": sp["a_out"], f"{y}_in": sp["b_in"], f"{y}_out": sp["b_out"],
              f"{test}_in": sp["c_in"], f"{test}_out": sp["c_out"]}
    return {**r, "test_domain": test, "train_domains": [x, y], "splits": splits, "run_id": test + r["run_id"]}


def _full_grid_records():
    return [_held_out(r, t) for t in "abc" for r in _grid_records()]


@pytest.fixture
def runs(tmp_path):
    """Records of three labels: m and other on every held-out domain, partial on c only."""
    with RecordWriter(tmp_path / "runs" / "records.jsonl") as w:
        for r in _full_grid_records():
            w.write(r)
        for r in _full_grid_records():
            w.write({**r, "label": "other", "run_id": "o" + r["run_id"], "hparams": {"dropout": 0.9}})
        for r in _grid_records():  # a method run on one held-out domain only
            w.write({**r, "label": "partial", "run_id": "p" + r["run_id"]})
    return tmp_path / "runs"


def test_write_report_and_its_files(runs, tmp_path):
    paths = write_report([runs], tmp_path / "rep")
    for name in ("summary", "table", "runs", "clouds_csv", "clouds_png", "dropout_png"):
        assert paths[name].exists() and paths[name].parent == tmp_path / "rep", name
    assert "interpolation_png" not in paths  # no interpolation records
    summary = paths["summary"].read_text()
    assert "| m | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 |" in summary and "| other |" in summary
    assert "| partial | — | — | 55.0 ± 5.0 | — |" in summary
    assert "partial on toy: no usable run for held-out a, b" in summary
    assert "| toy | m | 12 | 0 | 0 | 8 |" in summary and "| toy | partial | 4 | 0 | 0 | 0 |" in summary
    with open(paths["runs"], newline="") as fh:
        run_rows = list(csv.DictReader(fh))
    assert len(run_rows) == 12 + 12 + 4 and {r["status"] for r in run_rows} == {"ok"}
    with open(paths["clouds_csv"], newline="") as fh:
        cloud_rows = list(csv.DictReader(fh))
    # 2 grid points ^ 3 held-out domains for m and other; partial has no cloud (it lacks a and b)
    assert sorted({r["label"] for r in cloud_rows}) == ["m", "other"] and len(cloud_rows) == 2 * 8
    with open(paths["table"], newline="") as fh:
        table = {(r["label"], r["test_domain"]): r for r in csv.DictReader(fh)}
    assert float(table[("m", "average")]["ood_mean"]) == pytest.approx(0.55)
    assert float(table[("m", "average")]["ood_se"]) == pytest.approx(0.05) and table[("m", "average")]["seeds"] == "2"


def test_summary_tables_and_rerun_rewrite_the_same_files(runs, tmp_path):
    short = summary_tables([runs])
    assert "| m | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 |" in short["markdown"]
    assert {(row["label"], row["test_domain"]) for row in short["rows"]} >= {("m", "a"), ("m", "average")}
    first = write_report([runs], tmp_path / "rep")
    texts = {k: p.read_text() for k, p in first.items() if p.suffix in (".md", ".csv")}
    again = write_report([runs], tmp_path / "rep")  # the same code path twice: the same text files
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

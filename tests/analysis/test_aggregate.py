"""Selection, aggregation, records and reports against hand-computed answers."""

import json
from itertools import product

import numpy as np
import pytest
from click.testing import CliRunner

from linft.cli.main import main
from linft.errors import LinftError
from linft.protocol import (
    cloud_points, cloud_points_brute_force, group_runs, iid_accuracy, mean_and_se, ood_accuracy, select_by_iid,
    select_oracle,
)
from linft.records import RecordWriter, finished_run_ids, read_records
from linft.report import cloud_tables, domainbed_table, run_results, write_report


def rec(step, a_out, b_out, c_in, c_out, **kw):
    """A record with training domains a, b (out splits of 10) and held-out c (in 40, out 10)."""
    r = {"method": "m", "label": kw.pop("label", "m"), "dataset": "toy", "cache_provenance": kw.pop("prov", "p"),
         "test_domain": "c", "train_domains": ["a", "b"], "grid": kw.pop("grid", {"lr": 1}), "seed": kw.pop("seed", 0),
         "run_id": kw.pop("run_id", "r1"), "attempt": kw.pop("attempt", "x"), "step": step, "status": "ok",
         "final": kw.pop("final", False), "hparams": {"dropout": kw.pop("dropout", 0.0)},
         "splits": {"a_in": [0, 40], "a_out": [a_out, 10], "b_in": [0, 40], "b_out": [b_out, 10],
                    "c_in": [c_in, 40], "c_out": [c_out, 10]}}
    r.update(kw)
    return r


def test_accuracies_by_hand():
    r = rec(0, a_out=7, b_out=9, c_in=20, c_out=5)
    assert iid_accuracy(r) == pytest.approx((0.7 + 0.9) / 2)
    assert ood_accuracy(r) == pytest.approx(25 / 50)


def test_selection_best_iid_earliest_on_ties_and_oracle():
    runs = [rec(0, 5, 5, 10, 1), rec(300, 8, 6, 30, 5), rec(600, 6, 8, 40, 10), rec(900, 9, 9, 0, 0)]
    assert select_by_iid(runs[:3])["step"] == 300  # iid 0.7 at 300 and 600: the earlier wins
    assert select_by_iid(list(reversed(runs)))["step"] == 900
    assert select_oracle(runs)["step"] == 600
    with pytest.raises(LinftError):
        select_by_iid([])


def test_mean_and_standard_error():
    m, se = mean_and_se([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7) and se == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1) / np.sqrt(3))
    assert mean_and_se([0.4]) == (0.4, 0.0)


def test_cloud_equals_brute_force_and_counts_1296():
    rng = np.random.default_rng(0)
    table = {e: {h: tuple(rng.random(2)) for h in range(6)} for e in "abcd"}
    pts, exact = cloud_points(table)
    assert exact and pts.shape == (1296, 2)
    np.testing.assert_allclose(pts, cloud_points_brute_force(table))
    uneven = {"a": {0: (0.1, 0.2)}, "b": {0: (0.3, 0.5), 1: (0.5, 0.9), 2: (0.0, 0.0)}}
    np.testing.assert_allclose(cloud_points(uneven)[0], [[0.2, 0.35], [0.3, 0.55], [0.05, 0.1]])


def test_cloud_samples_above_the_exact_limit():
    table = {e: {h: (h / 10, 1 - h / 10) for h in range(10)} for e in range(4)}
    pts, exact = cloud_points(table, max_exact=100, samples=500, seed=1)
    assert not exact and pts.shape == (500, 2)
    np.testing.assert_allclose(pts.sum(1), 1.0)  # every sampled point is a real combination
    np.testing.assert_array_equal(pts, cloud_points(table, max_exact=100, samples=500, seed=1)[0])


def test_records_round_trip_torn_line_and_attempts(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        w.write(rec(0, 1, 1, 1, 1, attempt="old"))  # an interrupted attempt
        w.write(rec(0, 2, 2, 2, 2, attempt="new"))
        w.write(rec(5, 3, 3, 3, 3, attempt="new", final=True))
    with open(path, "a") as fh:
        fh.write('{"method": "m", "trunc')  # a killed writer's last line
    records = read_records([tmp_path])
    assert len(records) == 3 and records[1] == rec(0, 2, 2, 2, 2, attempt="new")
    runs = group_runs(records)
    assert [r["step"] for r in runs["r1"]] == [0, 5] and all(r["attempt"] == "new" for r in runs["r1"])
    assert finished_run_ids([path]) == {"r1"}
    assert finished_run_ids([tmp_path / "missing.jsonl"]) == set()
    with RecordWriter(path) as w:  # appending after a torn line keeps the file readable
        w.write(rec(9, 1, 1, 1, 1, attempt="later", run_id="r2", final=True))
    assert [r["run_id"] for r in read_records([path])] == ["r1", "r1", "r1", "r2"]
    (tmp_path / "other.jsonl").write_text('{"some": "log"}\n')
    with pytest.raises(LinftError, match="is not a linft run record"):
        read_records([tmp_path])
    (tmp_path / "other.jsonl").unlink()
    (tmp_path / "bad.jsonl").write_text("not json\n{}\n")
    with pytest.raises(LinftError, match="line 1 is not JSON"):
        read_records([tmp_path / "bad.jsonl"])
    with pytest.raises(LinftError, match="does not exist"):
        read_records([tmp_path / "nope"])


def _grid_records():
    """2 grid points x 2 seeds for held-out c, final records only."""
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


def test_domainbed_table_selects_per_seed_by_iid():
    table = domainbed_table(run_results(_grid_records()))
    cell = table[("toy", "m")]["c"]
    # seed 0: grid 2 (iid .7) beats grid 1 (.6) -> ood 25/50; seed 1: grid 1 (.8) beats grid 2 (.5) -> 30/50
    assert cell["iid"][0] == pytest.approx(0.75) and cell["ood"][0] == pytest.approx(0.55)
    assert cell["ood"][1] == pytest.approx(np.std([0.5, 0.6], ddof=1) / np.sqrt(2))
    # a and b were never held out: no average over the dataset's domains can be given
    assert np.isnan(table[("toy", "m")]["average"]["ood"][0])
    only_c = domainbed_table([r for r in run_results(_grid_records()) if True], "iid")
    assert only_c[("toy", "m")]["average"]["n"] == 0


def test_cloud_tables_average_seeds_and_drop_diverged():
    records = _full_grid_records()
    clouds = cloud_tables(run_results(records))
    assert clouds[("toy", "m")]["c"][(("lr", 1),)] == pytest.approx((0.7, 0.5))
    assert cloud_points(clouds[("toy", "m")])[0].shape == (8, 2)  # 2 grid points ^ 3 domains
    assert domainbed_table(run_results(records))[("toy", "m")]["average"]["ood"][0] == pytest.approx(0.55)
    records[3]["status"] = "diverged"  # held-out a, grid 2, seed 1
    clouds = cloud_tables(run_results(records))
    assert list(clouds[("toy", "m")]["a"]) == [(("lr", 1),)] and len(clouds[("toy", "m")]["c"]) == 2


def test_records_of_different_caches_never_mix():
    records = _grid_records()
    records[0]["cache_provenance"] = "other"
    with pytest.raises(LinftError, match="different sources"):
        run_results(records)


def test_write_report_and_cli(tmp_path):
    with RecordWriter(tmp_path / "runs" / "records.jsonl") as w:
        for r in _full_grid_records():
            w.write(r)
        for r in _full_grid_records():
            w.write({**r, "label": "other", "run_id": "o" + r["run_id"], "hparams": {"dropout": 0.9}})
        for r in _grid_records():  # a method run on one held-out domain only
            w.write({**r, "label": "partial", "run_id": "p" + r["run_id"]})
    paths = write_report([tmp_path / "runs"], tmp_path / "rep")
    for name in ("summary", "table", "runs", "clouds_csv", "clouds_png", "dropout_png"):
        assert paths[name].exists()
    summary = paths["summary"].read_text()
    assert "| m | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 | 55.0 ± 5.0 |" in summary and "| other |" in summary
    assert "| partial | — | — | 55.0 ± 5.0 | — |" in summary
    assert "partial on toy: no usable run for held-out a, b" in summary
    result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep2"), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["summary"].endswith("summary.md")
    bad = CliRunner().invoke(main, ["report", str(tmp_path / "none")])
    assert bad.exit_code != 0 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_a_domain_without_usable_runs_blanks_the_average_and_the_cloud():
    records = _grid_records()
    for d, other in (("a", "c"),):
        for r in _grid_records():  # held-out a, all diverged
            r = {**r, "test_domain": d, "train_domains": ["b", other], "run_id": "a" + r["run_id"], "status": "diverged"}
            r["splits"] = {**r["splits"], "a_in": [0, 40], "a_out": [0, 10], "c_out": [5, 10]}
            records.append(r)
    results = run_results(records)
    table = domainbed_table(results)
    assert np.isnan(table[("toy", "m")]["average"]["ood"][0])
    assert ("toy", "m") not in cloud_tables(results)
    from linft.report import missing_domains
    assert missing_domains(results) == {("toy", "m"): ["a", "b"]}


def test_oracle_selects_grid_points_by_ood():
    table = domainbed_table(run_results(_grid_records(), "oracle"), "oracle")
    # per seed the grid point with the best o.o.d.: seed 0 -> 25/50 (grid 2), seed 1 -> 40/50 (grid 2)
    assert table[("toy", "m")]["c"]["ood"][0] == pytest.approx(0.65)

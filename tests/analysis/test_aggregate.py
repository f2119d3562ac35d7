"""Aggregation of run records: DomainBed's table, the seed-averaged cloud tables, the cloud against a brute force."""

from itertools import product

import numpy as np
import pytest

from linft.analysis.aggregate import cloud_points, cloud_tables, domainbed_table, missing_domains, run_results
from linft.errors import LinftError

from helpers import refused, full_grid_records, grid_records


def cloud_points_brute_force(table: dict) -> np.ndarray:
    """The paper's cloud by its definition: every choice of one grid point per held-out domain (itertools.product,
    domains and grid points in sorted order), and the point (mean over domains of i.i.d., of o.o.d.)."""
    domains = sorted(table)
    points = []
    for choice in product(*(sorted(table[e]) for e in domains)):
        chosen = [table[e][h] for e, h in zip(domains, choice)]
        points.append((np.mean([iid for iid, _ in chosen]), np.mean([ood for _, ood in chosen])))
    return np.array(points, dtype=float).reshape(-1, 2)


def test_brute_force_reference_by_hand():
    table = {"x": {0: (0.2, 0.4), 1: (0.6, 0.0)}, "y": {"g": (0.4, 0.8)}}
    np.testing.assert_allclose(cloud_points_brute_force(table), [[0.3, 0.6], [0.5, 0.4]])


def test_cloud_equals_brute_force_and_counts_1296():
    rng = np.random.default_rng(0)
    table = {e: {h: tuple(rng.random(2)) for h in range(6)} for e in "abcd"}
    pts, exact = cloud_points(table)
    assert exact and pts.shape == (1296, 2)
    # the library sums domain by domain and divides once, the brute force takes np.mean of each choice: the same
    # point up to float64 rounding (~1e-16), far inside assert_allclose's rtol of 1e-7
    np.testing.assert_allclose(pts, cloud_points_brute_force(table))
    uneven = {"a": {0: (0.1, 0.2)}, "b": {0: (0.3, 0.5), 1: (0.5, 0.9), 2: (0.0, 0.0)}}
    np.testing.assert_allclose(cloud_points(uneven)[0], [[0.2, 0.35], [0.3, 0.55], [0.05, 0.1]])
    np.testing.assert_allclose(cloud_points(uneven)[0], cloud_points_brute_force(uneven))
    empty, exact = cloud_points({})
    assert exact and empty.shape == (0, 2)


def test_cloud_samples_above_the_exact_limit():
    table = {e: {h: (h / 10, 1 - h / 10) for h in range(10)} for e in range(4)}
    pts, exact = cloud_points(table, max_exact=100, samples=500, seed=1)
    assert not exact and pts.shape == (500, 2)
    np.testing.assert_allclose(pts.sum(1), 1.0)  # every sampled point is a real combination
    all_points = {tuple(p) for p in np.round(cloud_points_brute_force(table), 12)}
    assert all(tuple(p) in all_points for p in np.round(pts, 12))
    # the same call twice (same code path, same seed): the same samples, bit for bit
    np.testing.assert_array_equal(pts, cloud_points(table, max_exact=100, samples=500, seed=1)[0])


def test_domainbed_table_selects_per_seed_by_iid():
    table = domainbed_table(run_results(grid_records()))
    cell = table[("toy", "m")]["c"]
    # seed 0: grid 2 (iid .7) beats grid 1 (.6) -> ood 25/50; seed 1: grid 1 (.8) beats grid 2 (.5) -> 30/50
    assert cell["iid"][0] == pytest.approx(0.75) and cell["ood"][0] == pytest.approx(0.55)
    assert cell["ood"][1] == pytest.approx(np.std([0.5, 0.6], ddof=1) / np.sqrt(2))
    assert cell["n"] == 2
    # a and b were never held out: no average over the dataset's domains can be given
    assert np.isnan(table[("toy", "m")]["average"]["ood"][0])
    assert table[("toy", "m")]["average"]["n"] == 0


def test_cloud_tables_average_seeds_and_drop_diverged():
    records = full_grid_records()
    clouds = cloud_tables(run_results(records))
    assert clouds[("toy", "m")]["c"][(("lr", 1),)] == pytest.approx((0.7, 0.5))
    assert cloud_points(clouds[("toy", "m")])[0].shape == (8, 2)  # 2 grid points ^ 3 domains
    assert domainbed_table(run_results(records))[("toy", "m")]["average"]["ood"][0] == pytest.approx(0.55)
    records[3]["status"] = "diverged"  # held-out a, grid 2, seed 1
    clouds = cloud_tables(run_results(records))
    assert list(clouds[("toy", "m")]["a"]) == [(("lr", 1),)] and len(clouds[("toy", "m")]["c"]) == 2


def test_records_of_different_sources_never_mix():
    records = grid_records()
    records[0]["source"] = "other"
    with pytest.raises(LinftError, match="m on toy come from different sources"):
        run_results(records)
    assert len(run_results([{**r, "label": "n"} if r is records[0] else r for r in records])) == 4  # other labels may


def test_a_domain_without_usable_runs_blanks_the_average_and_the_cloud():
    records = grid_records()
    for r in grid_records():  # held-out a, all diverged
        r = {**r, "test_domain": "a", "train_domains": ["b", "c"], "run_id": "a" + r["run_id"], "status": "diverged"}
        r["splits"] = {**r["splits"], "a_in": [0, 40], "a_out": [0, 10], "c_out": [5, 10]}
        records.append(r)
    results = run_results(records)
    table = domainbed_table(results)
    assert np.isnan(table[("toy", "m")]["average"]["ood"][0])
    assert ("toy", "m") not in cloud_tables(results)
    assert missing_domains(results) == {("toy", "m"): ["a", "b"]}


def test_oracle_selects_grid_points_by_ood():
    table = domainbed_table(run_results(grid_records(), "oracle"), "oracle")
    # per seed the grid point with the best o.o.d.: seed 0 -> 25/50 (grid 2), seed 1 -> 40/50 (grid 2)
    assert table[("toy", "m")]["c"]["ood"][0] == pytest.approx(0.65)
    with refused("selection"):
        run_results(grid_records(), "best")

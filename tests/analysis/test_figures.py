"""What the paper's figures draw, against hand computations: Figure 2's series and single points, Figure 9's
two pretrained models side by side, the dropout series; and the figures draw exactly those points, in percent."""

import numpy as np
import pytest

from linft.analysis.aggregate import domainbed_table, run_results
from linft.analysis.figures import ROLE_STYLES, dropout_points, figure2_points, figure9_points, figure_role
from linft.analysis.plots import clouds_figure, dropout_figure, figure9_figure
from linft.analysis.report import write_report
from linft.errors import LinftError
from linft.protocol.records import RecordWriter

from helpers import held_out, rec


def run(label, method, test, seed, iid_out, ood_in, grid=None, dropout=0.0, **kw):
    """One finished run held out on ``test``: i.i.d. accuracy iid_out/10, o.o.d. accuracy ood_in/50."""
    r = rec(0, iid_out, iid_out, ood_in, 0, label=label, method=method, grid={} if grid is None else grid,
            seed=seed, dropout=dropout, final=True, run_id=f"{label}|{test}|{seed}|{grid}|{kw.get('source', '')}",
            **kw)
    return held_out(r, test)


# (held-out domain, grid lr) -> (iid_out, ood_in): a has two grid points, b and c one
BASE = {("a", 1): (6, 10), ("a", 2): (8, 5), ("b", 1): (5, 15), ("c", 1): (7, 20)}
# the base cloud by hand: lr 1 or lr 2 on a (b and c have one grid point), i.i.d. and o.o.d. averaged over a, b, c
BASE_CLOUD = [((0.6 + 0.5 + 0.7) / 3, (0.2 + 0.3 + 0.4) / 3), ((0.8 + 0.5 + 0.7) / 3, (0.1 + 0.3 + 0.4) / 3)]
# across-run records, grid {}: (held-out domain, seed) -> (iid_out, ood_in); seeds differ per domain on purpose,
# so that "seeds averaged, then domains" differs from a mean over all records
SINGLE = {("a", 0): (6, 20), ("a", 1): (8, 25), ("b", 0): (7, 10), ("c", 0): (5, 15), ("c", 1): (6, 20),
          ("c", 2): (7, 35)}
SINGLE_POINT = (((0.6 + 0.8) / 2 + 0.7 + (0.5 + 0.6 + 0.7) / 3) / 3,
                ((0.4 + 0.5) / 2 + 0.2 + (0.3 + 0.4 + 0.7) / 3) / 3)
POOLED = (np.mean([v[0] / 10 for v in SINGLE.values()]), np.mean([v[1] / 50 for v in SINGLE.values()]))


def figure2_records(**kw):
    """Every series of Figure 2: baseline, very large dropout, trajectory ensemble and average (runs with a grid),
    and the across-run ensemble, soup and greedy soup (grid {}, one record per held-out domain and seed)."""
    out = []
    for label, method, dropout, shift in (("full FT, dropout 0", "finetune", 0.0, 0),
                                          ("full FT, dropout 0.9", "finetune", 0.9, 1),
                                          ("full FT, dropout 0, trajectory ensemble", "finetune-trajectory-ensemble",
                                           0.0, 2),
                                          ("full FT, dropout 0, trajectory average", "finetune-trajectory-average",
                                           0.0, 3)):
        out += [run(label, method, d, 0, i, o + shift, grid={"lr": g}, dropout=dropout, **kw)
                for (d, g), (i, o) in BASE.items()]
    for kind, shift in (("ensemble", 0), ("soup", 1), ("greedy-soup", 2)):
        label = {"ensemble": "ensemble of runs", "soup": "weight average of runs", "greedy-soup": "greedy soup"}[kind]
        out += [run(f"full FT, dropout 0, {label}", f"finetune-{kind}", d, s, i, o + shift, **kw)
                for (d, s), (i, o) in SINGLE.items()]
    return out


def test_figure2_series_markers_and_points_by_hand():
    points = figure2_points(run_results(figure2_records()))
    by_label = {label: fp for (_, _, label), fp in points.items()}
    expected_roles = {"full FT, dropout 0": ("baseline", "o", False), "full FT, dropout 0.9": ("dropout", "D", False),
                      "full FT, dropout 0, trajectory ensemble": ("trajectory ensemble", "^", False),
                      "full FT, dropout 0, trajectory average": ("trajectory average", "*", False),
                      "full FT, dropout 0, ensemble of runs": ("ensemble", "^", True),
                      "full FT, dropout 0, weight average of runs": ("soup", "*", True),
                      "full FT, dropout 0, greedy soup": ("greedy soup", "P", True)}
    assert {k: (fp.role, fp.marker, fp.single) for k, fp in by_label.items()} == expected_roles
    for label, shift in (("full FT, dropout 0", 0), ("full FT, dropout 0.9", 1 / 50)):
        # every record of the dropout label has an o.o.d. accuracy 1/50 higher, so every cloud point has too
        expected = [(i, o + shift) for i, o in BASE_CLOUD]
        np.testing.assert_allclose(sorted(map(tuple, by_label[label].points)), sorted(expected))
    for label, shift in (("ensemble of runs", 0), ("weight average of runs", 1), ("greedy soup", 2)):
        fp = by_label[f"full FT, dropout 0, {label}"]
        # one point: seeds averaged per held-out domain, then domains averaged (not the mean of all records)
        assert fp.points.shape == (1, 2)
        np.testing.assert_allclose(fp.points[0], (SINGLE_POINT[0], SINGLE_POINT[1] + shift / 50))
    assert abs(POOLED[1] - SINGLE_POINT[1]) > 0.01  # the two averages differ on these records


def test_the_clouds_figure_draws_those_points_in_percent():
    points = figure2_points(run_results(figure2_records()))
    fig = clouds_figure(points)
    (ax,) = [a for a in fig.axes if a.get_visible() and a.collections]
    drawn = np.concatenate([c.get_offsets() for c in ax.collections])
    expected = np.concatenate([fp.points for fp in points.values()])
    np.testing.assert_allclose(sorted(map(tuple, drawn)), sorted(map(tuple, 100 * expected)))
    assert ax.get_xlabel() == "i.i.d. accuracy (%)" and ax.get_ylabel() == "o.o.d. accuracy (%)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "full FT, dropout 0, weight average of runs (1 point)" in legend and "full FT, dropout 0 (2)" in legend
    assert clouds_figure({}) is None


def test_roles_from_methods():
    assert figure_role("finetune-trajectory-ensemble", 0.0) == "trajectory ensemble"  # not the across-run one
    assert figure_role("linear-ft-greedy-soup", None) == "greedy soup"
    assert figure_role("linear-ft", 0.9) == "dropout" and figure_role("linear-probe", 0.0) == "baseline"
    assert set(ROLE_STYLES) == {"baseline", "dropout", "trajectory ensemble", "trajectory average", "ensemble",
                                "soup", "greedy soup", "stochastic depth"}


def two_weights(more=()):
    """Naive and advanced fine-tuning of ResNet #1 and #2 (two weights of one backbone, two sources); ResNet #2's
    o.o.d. accuracy is 10/50 higher on every record."""
    out = []
    for weights, source, bonus in (("IMAGENET1K_V1", "s1", 0), ("IMAGENET1K_V2", "s2", 10)):
        for label, dropout in (("full FT, dropout 0", 0.0), ("full FT, dropout 0.9", 0.9)):
            out += [run(label, "finetune", d, 0, i, o + bonus + (5 if dropout else 0), grid={"lr": g}, dropout=dropout,
                        backbone="resnet50", weights=weights, source=source) for (d, g), (i, o) in BASE.items()]
    return out + list(more)


def test_figure9_two_pretrained_models_side_by_side(tmp_path):
    records = two_weights(more=[run("full FT, dropout 0.5", "finetune", d, 0, i, o, grid={"lr": g}, dropout=0.5,
                                    backbone="resnet50", weights="IMAGENET1K_V2", source="s2")
                                for (d, g), (i, o) in BASE.items()])  # a label only one model has
    results = run_results(records)
    assert {r.label for r in results} == {f"resnet50/{w}: full FT, dropout {p}" for w in ("IMAGENET1K_V1",
                                          "IMAGENET1K_V2") for p in ("0", "0.9")} | {
        "resnet50/IMAGENET1K_V2: full FT, dropout 0.5"}
    table = domainbed_table(results)
    # each model's rows apart: ResNet #2 naive is 10/50 above ResNet #1 naive on every held-out domain
    assert table[("toy", "resnet50/IMAGENET1K_V2: full FT, dropout 0")]["c"]["ood"][0] == pytest.approx(0.4 + 0.2)
    assert table[("toy", "resnet50/IMAGENET1K_V1: full FT, dropout 0")]["c"]["ood"][0] == pytest.approx(0.4)
    points = figure9_points(results)
    assert {k: (fp.role, fp.marker) for k, fp in points.items()} == {
        ("toy", "resnet50/IMAGENET1K_V1", "full FT, dropout 0"): ("naive", "o"),
        ("toy", "resnet50/IMAGENET1K_V2", "full FT, dropout 0"): ("naive", "o"),
        ("toy", "resnet50/IMAGENET1K_V1", "full FT, dropout 0.9"): ("advanced", "D"),
        ("toy", "resnet50/IMAGENET1K_V2", "full FT, dropout 0.9"): ("advanced", "D")}  # dropout 0.5: V2 only
    for (_, model, label), fp in points.items():
        bonus = (0.2 if model.endswith("V2") else 0) + (0.1 if label.endswith("0.9") else 0)
        np.testing.assert_allclose(sorted(map(tuple, fp.points)), sorted((i, o + bonus) for i, o in BASE_CLOUD))
    chosen = figure9_points(results, naive=["full FT, dropout 0.9"], advanced=[])
    assert {k[2] for k in chosen} == {"full FT, dropout 0.9"} and {fp.role for fp in chosen.values()} == {"naive"}
    fig = figure9_figure(points)
    (ax,) = fig.axes
    drawn = np.concatenate([c.get_offsets() for c in ax.collections])
    expected = np.concatenate([fp.points for fp in points.values()])
    np.testing.assert_allclose(sorted(map(tuple, drawn)), sorted(map(tuple, 100 * expected)))

    with RecordWriter(tmp_path / "runs" / "records.jsonl") as w:
        for r in records:
            w.write(r)
    paths = write_report([tmp_path / "runs"], tmp_path / "rep")
    assert paths["figure9_png"].stat().st_size > 0 and paths["figure9_pdf"].read_bytes()[:4] == b"%PDF"
    summary = paths["summary"].read_text()
    assert "| resnet50/IMAGENET1K_V1: full FT, dropout 0 |" in summary
    assert "| resnet50/IMAGENET1K_V2: full FT, dropout 0 |" in summary


def test_one_model_one_label_from_two_sources_is_refused():
    records = two_weights()
    for r in records:
        if r["weights"] == "IMAGENET1K_V2" and r["test_domain"] == "a":
            r["weights"] = "IMAGENET1K_V1"  # the same backbone and weights as s1, another source: ambiguous
    with pytest.raises(LinftError, match="dropout 0 on toy with resnet50/IMAGENET1K_V1.* come from different sources"):
        run_results(records)
    single = run_results([r for r in two_weights() if r["weights"] == "IMAGENET1K_V1"])
    assert {r.label for r in single} == {"full FT, dropout 0", "full FT, dropout 0.9"}  # one model: labels as recorded
    assert figure9_points(single) == {}


def test_dropout_series_by_hand_and_drawn_with_distinct_styles():
    records = figure2_records()
    records += [{**r, "label": "linear FT, dropout " + ("0.5" if r["hparams"]["dropout"] == 0 else "0.9"),
                 "method": "linear-ft", "hparams": {"dropout": 0.5 if r["hparams"]["dropout"] == 0 else 0.9},
                 "run_id": "lin" + r["run_id"]} for r in records if r["method"] == "finetune"]
    points = dropout_points(run_results(records))
    assert set(points) == {("toy", "", "finetune", "full FT"), ("toy", "", "linear-ft", "linear FT")}
    full = points[("toy", "", "finetune", "full FT")]
    # one seed: the average column is the mean over domains of the best-i.i.d. grid point (lr 2 on a, i.i.d. .8)
    assert full["rates"] == [0.0, 0.9]
    assert full["ood"][0] == pytest.approx(((0.1 + 0.3 + 0.4) / 3, 0.0))
    assert full["ood"][1] == pytest.approx(((0.1 + 0.3 + 0.4) / 3 + 1 / 50, 0.0))
    fig = dropout_figure(points)
    ood_ax, iid_ax = fig.axes[:2]
    lines = [c.lines[0] for c in ood_ax.containers]  # the data line of each errorbar (not its caps)
    assert len(lines) == 2 and len({(ln.get_marker(), ln.get_linestyle()) for ln in lines}) == 2
    assert sorted(100 * m for m, _ in full["ood"]) == pytest.approx(sorted(lines[0].get_ydata()))
    assert ood_ax.get_ylabel().startswith("o.o.d. accuracy (%)") and iid_ax.get_ylabel().startswith("i.i.d.")

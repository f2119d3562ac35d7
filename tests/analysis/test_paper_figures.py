"""The paper's Figures 3 to 10 as their own figures: which series each draws (pure functions of records, against
the labels picked by hand), and that no legend of any figure the report can draw overlaps a panel."""

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from linft.analysis.aggregate import run_results
from linft.analysis.figures import (ROLE_STYLES, figure2_points, figure3_points, figure4_points, figure5_points,
                                    figure6_points, figure7_points, figure8_points, figure10_points, label_variant,
                                    members_dropout)
from linft.analysis.plots import layout
from linft.analysis.report import FIGURES, png_size, report_figures, write_report
from linft.protocol.records import RecordWriter

from helpers import held_out, rec

# held-out domain -> (grid lr -> (iid_out of 10, ood_in of 50)); two grid points on a, one on b and c
BASE = {("a", 1): (6, 10), ("a", 2): (8, 5), ("b", 1): (5, 15), ("c", 1): (7, 20)}

#: (label, method, dropout) of every toy series on dataset "toy"
TOY = [("full FT, dropout 0", "finetune", 0.0), ("full FT, dropout 0.9", "finetune", 0.9),
       ("full FT, dropout 0, trajectory ensemble", "finetune-trajectory-ensemble", 0.0),
       ("full FT, dropout 0.9, trajectory ensemble", "finetune-trajectory-ensemble", 0.9),
       ("full FT, dropout 0.9, trajectory average", "finetune-trajectory-average", 0.9),
       ("full FT, 10x head lr, dropout 0", "finetune", 0.0), ("full FT, 10x head lr, dropout 0.9", "finetune", 0.9),
       ("full FT, 10x head lr, dropout 0.9, trajectory average", "finetune-trajectory-average", 0.9),
       ("full FT, stochastic depth 0.1, dropout 0", "finetune", 0.0),
       ("full FT, stochastic depth 0.2, dropout 0", "finetune", 0.0),
       ("linear FT, dropout 0", "linear-ft", 0.0), ("linear FT, dropout 0.9", "linear-ft", 0.9),
       ("linear probe", "linear-probe", 0.0),
       ("from scratch, dropout 0", "scratch", 0.0), ("from scratch, dropout 0.5", "scratch", 0.5)]
DOMAINNET = [("full FT, dropout 0", "finetune", 0.0), ("full FT, dropout 0.5", "finetune", 0.5)]


def series(label, method, dropout, shift, dataset="toy", **kw):
    """Every held-out domain and grid point of one label, finished, with o.o.d. accuracies shifted by ``shift``."""
    out = []
    for (test, lr), (iid, ood) in BASE.items():
        r = rec(0, iid, iid, ood + shift, 0, label=label, method=method, grid={"lr": lr}, dropout=dropout,
                final=True, dataset=dataset, run_id=f"{dataset}|{label}|{lr}|{kw}", **kw)
        out.append(held_out(r, test))
    return out


def all_records():
    """Records of every figure a report draws: the toy series, DomainNet, two pretrained models, interpolation."""
    out = [r for i, s in enumerate(TOY) for r in series(*s, i)]
    out += [r for i, s in enumerate(DOMAINNET) for r in series(*s, i, dataset="DomainNet")]
    for weights in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        out += [r for s in TOY[:2] for r in series(*s, 1, dataset="two", backbone="resnet50", weights=weights,
                                                   source=weights)]
    for alpha in (0.0, 0.5, 1.0):
        r = rec(0, 5, 5, 20 + int(10 * alpha), 0, label="weight interpolation", method="interpolation-weights",
                grid={"alpha": alpha}, final=True, dataset="interp", run_id=f"interp{alpha}")
        out.append(r)
    return out


@pytest.fixture(scope="module")
def results():
    return run_results(all_records())


def labels(points):
    return {(k[0], k[2]): fp.role for k, fp in points.items()}


def test_label_variant_reads_what_finetune_label_writes():
    assert label_variant("full FT, 10x head lr, dropout 0.9") == (10.0, 0.0)
    assert label_variant("full FT, stochastic depth 0.2 (official), dropout 0") == (1.0, 0.2)
    assert label_variant("full FT, dropout 0.9, trajectory average") == (1.0, 0.0)


def test_cloud_figures_pick_their_series(results):
    fig2 = figure2_points(results)
    assert labels(figure6_points(results)) == {
        ("toy", "full FT, 10x head lr, dropout 0"): "baseline", ("toy", "full FT, 10x head lr, dropout 0.9"): "dropout",
        ("toy", "full FT, 10x head lr, dropout 0.9, trajectory average"): "trajectory average"}
    assert labels(figure7_points(results)) == {
        ("toy", "full FT, dropout 0"): "baseline", ("toy", "full FT, dropout 0.9"): "dropout",
        ("toy", "full FT, dropout 0.9, trajectory ensemble"): "trajectory ensemble",
        ("toy", "full FT, dropout 0.9, trajectory average"): "trajectory average"}  # datasets without them: left out
    fig10 = figure10_points(results)
    assert {k for k, role in labels(fig10).items() if role == "stochastic depth"} == {
        ("toy", "full FT, stochastic depth 0.1, dropout 0"), ("toy", "full FT, stochastic depth 0.2, dropout 0")}
    assert all(fp.marker == "o" for fp in fig10.values() if fp.role in ("baseline", "stochastic depth"))
    assert ("toy", "full FT, dropout 0, trajectory ensemble") not in labels(fig10)
    assert {k[0] for k in fig10} == {"toy"}  # only datasets with stochastic depth get a panel
    assert labels(figure8_points(results)) == {
        ("toy", "linear FT, dropout 0"): "baseline", ("toy", "linear FT, dropout 0.9"): "dropout",
        ("toy", "linear probe"): "baseline", ("toy", "full FT, dropout 0"): "baseline",
        ("toy", "full FT, dropout 0.9"): "dropout"}
    for key, fp in figure7_points(results).items():  # the same clouds as Figure 2's, with Figure 2's markers
        np.testing.assert_array_equal(fp.points, fig2[key].points)
        assert fp.marker == ROLE_STYLES[fp.role][0]


def test_without_their_series_the_cloud_figures_are_empty(results):
    labels = ("full FT, dropout 0", "full FT, dropout 0.9")
    plain = [r for r in results if r.dataset == "toy" and r.base_label in labels]
    assert figure6_points(plain) == figure7_points(plain) == figure8_points(plain) == figure10_points(plain) == {}


def test_dropout_rate_figures_split_by_dataset_and_method(results):
    assert set(figure3_points(results)) == {("toy", "", "finetune", "full FT"), ("toy", "", "linear-ft", "linear FT"),
                                            ("toy", "", "finetune", "full FT, 10x head lr"),
                                            ("toy", "", "finetune-trajectory-ensemble", "full FT, trajectory ensemble"),
                                            *(("two", f"resnet50/{w}", "finetune", "full FT")
                                              for w in ("IMAGENET1K_V1", "IMAGENET1K_V2"))}
    assert set(figure4_points(results)) == {("DomainNet", "", "finetune", "full FT")}
    five = figure5_points(results)
    assert set(five) == {("toy", "", "scratch", "from scratch")} and five[next(iter(five))]["rates"] == [0.0, 0.5]


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_no_legend_overlaps_a_panel_in_any_figure_the_report_draws(results):
    curves = [r for r in results if r.method.startswith("interpolation-")]
    kept = [r for r in results if not r.method.startswith("interpolation-")]
    figures = report_figures(kept, curves, figure2_points(kept))
    assert set(figures) == set(FIGURES)  # every figure the report can draw is checked
    for name, fig in figures.items():
        layout(fig)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        assert legends, name
        panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(overlaps(box, p) for p in panels), name
        for ax in fig.axes:  # a text written in a panel stays inside it (never over its title or a neighbour)
            inside = ax.get_window_extent(renderer)
            for text in ax.texts:
                box = text.get_window_extent(renderer)
                assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
                    (name, text.get_text())
        for i, a in enumerate(fig.axes):  # no panel (with its labels and title) over another
            for b in fig.axes[i + 1:]:
                if a.axison and b.axison:
                    assert not overlaps(a.get_tightbbox(renderer), b.get_tightbbox(renderer)), name


def test_summary_embeds_each_figure_with_its_size(tmp_path):
    with RecordWriter(tmp_path / "runs" / "records.jsonl") as w:
        for r in all_records():
            if r["dataset"] == "toy":
                w.write(r)
    paths = write_report([tmp_path / "runs"], tmp_path / "report")
    summary = paths["summary"].read_text()
    drawn = sorted(k[:-4] for k in paths if k.endswith("_png"))
    assert drawn == sorted(["clouds", "figure6", "figure7", "figure8", "figure10", "dropout", "figure5"])
    for name in drawn:
        w, h = png_size(paths[f"{name}_png"])
        assert f"![{FIGURES[name]}]({name}.png)" in summary and f"{w}×{h} px" in summary
    assert "figure4" not in summary and "figure9" not in summary  # absent records: not drawn, not listed


def test_figure7_takes_across_run_ensembles_of_dropout_models_by_their_source_label():
    """Across-run records carry no dropout rate (their members' hparams may differ); Figure 7 reads it from the
    label they were made from: the ensemble of dropout-0.9 runs is drawn, that of dropout-0 runs is not."""
    records = [r for s in TOY[:2] for r in series(*s, 0)]
    for label, shift in (("full FT, dropout 0", 1), ("full FT, dropout 0.9", 2)):
        for test in "abc":
            r = rec(0, 7, 7, 20 + shift, 0, label=f"{label}, ensemble of runs", method="finetune-ensemble", grid={},
                    final=True, run_id=f"across|{label}", hparams={"members": 2, "rule": "probs"})
            records.append(held_out(r, test))
    results = run_results(records)
    assert {r.dropout for r in results if r.method == "finetune-ensemble"} == {None}
    assert members_dropout(next(r for r in results if r.label == "full FT, dropout 0.9, ensemble of runs"),
                           {(r.dataset, r.label): r for r in results}) == 0.9
    assert labels(figure7_points(results)) == {
        ("toy", "full FT, dropout 0"): "baseline", ("toy", "full FT, dropout 0.9"): "dropout",
        ("toy", "full FT, dropout 0.9, ensemble of runs"): "ensemble"}

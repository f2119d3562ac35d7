"""linft.demo: the whole pipeline on the built-in benchmark, end to end (tiny sizes), and its reuse of work."""

from linft.analysis.aggregate import run_results
from linft.analysis.findings import findings_text
from linft.cache import open_cache
from linft.demo import run_demo
from linft.protocol.records import read_records


def test_demo_runs_end_to_end(tmp_path):
    lines = []
    tiny = dict(per_class=3, linear_steps=20, seeds=1, finetune_steps=3, finetune_eval_every=2)
    result = run_demo(tmp_path / "demo", say=lines.append, progress=False, **tiny)
    cache = open_cache(result.cache)
    assert cache.features.shape[0] == 4 * 7 * 3
    assert not any("skipping" in line for line in lines)  # every stage is built
    summary = (result.report / "summary.md").read_text()
    for label in ("linear FT, dropout 0.9", "linear probe", "full FT, tensor augmentation, dropout 0",
                  "full FT, tensor augmentation, dropout 0.9",
                  "full FT, tensor augmentation, dropout 0.9, trajectory ensemble",
                  "full FT, tensor augmentation, dropout 0.9, trajectory average"):
        assert f"| {label} |" in summary
    notes = summary[summary.index("**Notes**"):]  # how the demo differs from the paper's protocol
    for fragment in ("not the paper's protocol", "3 steps, evaluated every 2", "tensor augmentation",
                     "instead of DomainBed's PIL augmentation", "No ensembles or soups across runs"):
        assert fragment in notes
    # the summary ends with the paper's claims on the demo's own numbers: one line per comparison, each recomputed
    findings = summary[summary.index("**What this demo shows**"):].splitlines()
    assert [line for line in findings if line.startswith("- ")] == [
        f"- {line}" for line in findings_text(run_results(read_records([result.out / "runs"])))]
    assert any("full FT, tensor augmentation, dropout 0.9" in line and "full FT, tensor augmentation, dropout 0 " in
               line for line in findings)
    assert any("linear probe o.o.d." in line for line in findings)
    assert "Weight decay in linear fine-tuning" in notes
    assert (result.report / "clouds.png").stat().st_size > 0
    assert (result.report / "dropout.png").stat().st_size > 0
    assert (result.report / "interpolation.png").stat().st_size > 0
    records = read_records([result.out / "runs"])
    assert {r["method"] for r in records} >= {"linear-ft", "linear-probe", "finetune", "interpolation-weights",
                                              "interpolation-representation", "interpolation-linearized",
                                              "finetune-trajectory-ensemble", "finetune-trajectory-average"}
    ft = [r for r in records if r["method"] == "finetune"]
    assert {r["hparams"]["augment"] for r in ft} == {"tensor"} and {r["grid"]["lr"] for r in ft} == {1e-3}
    again = []
    run_demo(tmp_path / "demo", say=again.append, progress=False, **tiny)
    assert any("using the demo benchmark already" in line for line in again)
    assert len(read_records([result.out / "runs"])) == len(records)  # nothing trained or written twice

    # --across-runs: the runs of lr 5e-4 are added, and ensembles and soups across the two runs of each domain
    across = []
    run_demo(tmp_path / "demo", say=across.append, progress=False, across_runs=True, **tiny)
    after = read_records([result.out / "runs"])
    assert [r for r in after if r in records] == records  # what was there is kept as it was
    assert {r["grid"]["lr"] for r in after if r["method"] == "finetune"} == {1e-3, 5e-4}
    methods = {r["method"] for r in after}
    assert {"finetune-ensemble", "finetune-soup", "finetune-greedy-soup"} <= methods
    assert all(len(r["members"]) == 2 for r in after if r["method"] == "finetune-soup")
    assert any("ensembles, soups and greedy soups across" in line for line in across)
    assert "Ensembles and soups across runs: over the 2 grid runs" in (result.report / "summary.md").read_text()

"""linft.demo: the whole pipeline on the built-in benchmark, end to end (tiny sizes), and its reuse of work."""

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
    for label in ("linear FT, dropout 0.9", "linear probe", "full FT, dropout 0", "full FT, dropout 0.9"):
        assert f"| {label} |" in summary
    assert (result.report / "clouds.png").stat().st_size > 0
    assert (result.report / "dropout.png").stat().st_size > 0
    assert (result.report / "interpolation.png").stat().st_size > 0
    records = read_records([result.out / "runs"])
    assert {r["method"] for r in records} >= {"linear-ft", "linear-probe", "finetune", "interpolation-weights",
                                              "interpolation-representation", "interpolation-linearized"}
    again = []
    run_demo(tmp_path / "demo", say=again.append, progress=False, **tiny)
    assert any("using the demo benchmark already" in line for line in again)
    assert len(read_records([result.out / "runs"])) == len(records)  # nothing trained or written twice

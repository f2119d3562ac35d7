"""Run records: the one builder (make_record), the writer, the reader (torn lines, records of earlier releases),
and the one "skip what is done" rule."""

import csv
import json

import pytest
from click.testing import CliRunner

from linft.analysis.aggregate import run_results
from linft.analysis.report import write_report
from linft.cli.main import main
from linft.errors import LinftError
from linft.protocol.records import (DERIVED, METHODS, REQUIRED_FIELDS, RecordWriter, RunHeader, derived,
                                    derived_from,
                                    finished_run_ids, make_record, read_records, record_problem)

from conftest import assert_one_line_error
from helpers import rec


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
    assert finished_run_ids([path]) == {"r1"}
    assert finished_run_ids([tmp_path / "missing.jsonl"]) == set()
    with RecordWriter(path) as w:  # appending after a torn line keeps the file readable
        w.write(rec(9, 1, 1, 1, 1, attempt="later", run_id="r2", final=True))
    assert [r["run_id"] for r in read_records([path])] == ["r1", "r1", "r1", "r2"]
    assert path.read_text().endswith("\n") and "trunc" not in path.read_text()
    assert finished_run_ids([path, tmp_path / "missing.jsonl"]) == {"r1", "r2"}
    (tmp_path / "other.jsonl").write_text('{"some": "log"}\n')
    with pytest.raises(LinftError, match="is not a linft run record"):
        read_records([tmp_path])
    (tmp_path / "other.jsonl").unlink()
    (tmp_path / "bad.jsonl").write_text("not json\n{}\n")
    with pytest.raises(LinftError, match="line 1 is not JSON"):
        read_records([tmp_path / "bad.jsonl"])
    with pytest.raises(LinftError, match="does not exist"):
        read_records([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(LinftError, match="no run records"):
        read_records([tmp_path / "empty"])


# --------------------------------------------------------------------------- make_record


def header(method: str, **extra) -> RunHeader:
    return RunHeader(method=method, label=f"{method} label", dataset="toy", source="abc:def", backbone="resnet18",
                     weights="DEFAULT", test_domain="c", train_domains=["a", "b"], hparams={"lr": 0.1, "seed": 0},
                     grid={"lr": 0.1}, seed=0, run_id="0123456789abcdef", attempt="att", extra=extra)


EVERY_METHOD = list(METHODS) + [derived(m, METHODS[m], kind)[0] for m in METHODS for kind in DERIVED]


def test_every_record_built_from_a_header_has_the_schema_fields(tmp_path):
    splits = {"a_in": [1, 2], "a_out": [1, 1], "b_in": [0, 2], "b_out": [1, 1], "c_in": [2, 3], "c_out": [0, 1]}
    assert len(EVERY_METHOD) == len(METHODS) * (1 + len(DERIVED))
    with RecordWriter(tmp_path / "records.jsonl") as w:
        for method in EVERY_METHOD:
            record = make_record(header(method, cache="x.h5"), 7, splits, loss=0.5, final=True, alpha=0.25)
            for key in (*REQUIRED_FIELDS, "source", "method", "label"):
                assert key in record, (method, key)
            assert record["method"] == method and record["source"] == "abc:def" and record["label"] == f"{method} label"
            assert (record["step"], record["splits"], record["loss"], record["status"], record["final"]) == \
                (7, splits, 0.5, "ok", True)
            assert record["cache"] == "x.h5" and record["alpha"] == 0.25 and "extra" not in record  # extras flattened
            w.write(record)
    back = read_records([tmp_path / "records.jsonl"])
    assert [r["method"] for r in back] == EVERY_METHOD
    assert back[0] == make_record(header(EVERY_METHOD[0], cache="x.h5"), 7, splits, loss=0.5, final=True, alpha=0.25)
    defaults = make_record(header("finetune"), 3, splits)
    assert (defaults["loss"], defaults["status"], defaults["final"]) == (None, "ok", False)


def test_a_point_without_accuracy_is_a_diverged_record(tmp_path):
    """splits None (non-finite logits, :func:`split_counts`) is a valid JSON record with no accuracy: status
    diverged, no splits, no loss; the reader and the tables take it as a diverged run, never as a number."""
    record = make_record(header("interpolation-weights"), 0, None, loss=float("nan"), final=True)
    assert (record["splits"], record["status"], record["loss"], record["final"]) == ({}, "diverged", None, True)
    assert record_problem(record) is None
    with RecordWriter(tmp_path / "records.jsonl") as w:
        w.write(record)
    text = (tmp_path / "records.jsonl").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in a record"))
    back = read_records([tmp_path])
    assert back == [record]
    assert [(r.status, r.iid != r.iid) for r in run_results(back)] == [("diverged", True)]


@pytest.mark.parametrize("method", ["linear", "finetune-bogus", "soup", "linear-ft-soup-soup", ""])
def test_make_record_refuses_an_unknown_method(method):
    with pytest.raises(LinftError, match=f"unknown record method '{method}'"):
        make_record(header(method), 0, {})


def test_derived_from_inverts_derived_labels():
    for kind in DERIVED:
        assert derived_from(derived("finetune", "full FT, dropout 0.9", kind)[1], kind) == "full FT, dropout 0.9"
    assert derived_from("full FT, dropout 0.9, trajectory average", "ensemble") is None  # another kind's label
    assert derived_from("full FT, dropout 0.9", "soup") is None
    assert derived_from("full FT, weight average of runs", "stew") is None


def test_derived_refuses_an_unknown_kind():
    assert derived("finetune", "full FT", "soup") == ("finetune-soup", "full FT, weight average of runs")
    with pytest.raises(LinftError, match="unknown derived kind 'stew'"):
        derived("finetune", "full FT", "stew")


# --------------------------------------------------------------------------- records of the previous release

#: Records as the previous release wrote them, by hand: linear records named their source "cache_provenance" (and
#: carried the cache path), fine-tuning records "source". Dataset "toy" with domains a and b, both held out.
#: Linear FT (dropout 0.9): 2 seeds x 2 grid points (lr) per held-out domain, evaluated at steps 0 and 300.
#: Full FT: 1 seed, 1 grid point per held-out domain, steps 0 and 50. Splits: "<domain>_in" 40, "<domain>_out" 10.
PREVIOUS_RELEASE = "\n".join([
    # held-out a (i.i.d. = b_out, o.o.d. = a_in + a_out)
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 0, "run_id": "la00", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [20, 40], "a_out": [5, 10], "b_in": [20, 40], "b_out": [5, 10]}, "loss": 1.1, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 0, "run_id": "la00", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [30, 40], "a_out": [8, 10], "b_in": [32, 40], "b_out": [8, 10]}, "loss": 0.4, '
    '"status": "ok", "final": true}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 0, "run_id": "la01", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [20, 40], "a_out": [5, 10], "b_in": [20, 40], "b_out": [5, 10]}, "loss": 1.1, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 0, "run_id": "la01", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [25, 40], "a_out": [5, 10], "b_in": [36, 40], "b_out": [9, 10]}, "loss": 0.3, '
    '"status": "ok", "final": true}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 1, "run_id": "la10", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [10, 40], "a_out": [2, 10], "b_in": [24, 40], "b_out": [6, 10]}, "loss": 1.2, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 1, "run_id": "la10", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [35, 40], "a_out": [9, 10], "b_in": [28, 40], "b_out": [7, 10]}, "loss": 0.5, '
    '"status": "ok", "final": true}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 1, "run_id": "la11", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [20, 40], "a_out": [4, 10], "b_in": [36, 40], "b_out": [9, 10]}, "loss": 1.0, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", '
    '"train_domains": ["b"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 1, "run_id": "la11", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [40, 40], "a_out": [10, 10], "b_in": [24, 40], "b_out": [6, 10]}, "loss": 0.6, '
    '"status": "ok", "final": true}',
    # held-out b (i.i.d. = a_out, o.o.d. = b_in + b_out)
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 0, "run_id": "lb00", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [16, 40], "a_out": [4, 10], "b_in": [10, 40], "b_out": [1, 10]}, "loss": 1.2, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 0, "run_id": "lb00", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [28, 40], "a_out": [7, 10], "b_in": [30, 40], "b_out": [6, 10]}, "loss": 0.5, '
    '"status": "ok", "final": true}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 0, "run_id": "lb01", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [12, 40], "a_out": [3, 10], "b_in": [10, 40], "b_out": [1, 10]}, "loss": 1.3, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 0, "run_id": "lb01", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [24, 40], "a_out": [6, 10], "b_in": [35, 40], "b_out": [10, 10]}, "loss": 0.7, '
    '"status": "ok", "final": true}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 1, "run_id": "lb10", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [20, 40], "a_out": [5, 10], "b_in": [15, 40], "b_out": [5, 10]}, "loss": 1.1, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.001, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.001, "weight_decay": 0.0001}, "seed": 1, "run_id": "lb10", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [20, 40], "a_out": [5, 10], "b_in": [40, 40], "b_out": [10, 10]}, "loss": 0.9, '
    '"status": "ok", "final": true}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 1, "run_id": "lb11", "attempt": "t1", "step": 0, '
    '"splits": {"a_in": [8, 40], "a_out": [2, 10], "b_in": [10, 40], "b_out": [2, 10]}, "loss": 1.4, '
    '"status": "ok", "final": false}',
    '{"method": "linear-ft", "label": "linear FT, dropout 0.9", "dataset": "toy", "cache": "features_cache/toy.h5", '
    '"cache_provenance": "9d3c7a", "backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", '
    '"train_domains": ["a"], "hparams": {"lr": 0.0005, "weight_decay": 0.0001, "dropout": 0.9, "probe": false}, '
    '"grid": {"lr": 0.0005, "weight_decay": 0.0001}, "seed": 1, "run_id": "lb11", "attempt": "t1", "step": 300, '
    '"splits": {"a_in": [32, 40], "a_out": [8, 10], "b_in": [28, 40], "b_out": [7, 10]}, "loss": 0.4, '
    '"status": "ok", "final": true}',
    # full fine-tuning of the same release: "source" = <dataset files>:<weights>
    '{"method": "finetune", "label": "full FT", "dataset": "toy", "source": "5a1e0c9b:7b3e9f1a", '
    '"backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", "train_domains": ["b"], '
    '"hparams": {"lr": 0.0001, "weight_decay": 0.0001, "dropout": 0.0, "steps": 51}, '
    '"grid": {"lr": 0.0001, "weight_decay": 0.0001}, "seed": 0, "run_id": "fa0", "attempt": "fa0", "step": 0, '
    '"splits": {"a_in": [20, 40], "a_out": [5, 10], "b_in": [24, 40], "b_out": [6, 10]}, "loss": 0.7, '
    '"status": "ok", "final": false}',
    '{"method": "finetune", "label": "full FT", "dataset": "toy", "source": "5a1e0c9b:7b3e9f1a", '
    '"backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "a", "train_domains": ["b"], '
    '"hparams": {"lr": 0.0001, "weight_decay": 0.0001, "dropout": 0.0, "steps": 51}, '
    '"grid": {"lr": 0.0001, "weight_decay": 0.0001}, "seed": 0, "run_id": "fa0", "attempt": "fa0", "step": 50, '
    '"splits": {"a_in": [30, 40], "a_out": [9, 10], "b_in": [36, 40], "b_out": [9, 10]}, "loss": 0.2, '
    '"status": "ok", "final": true}',
    '{"method": "finetune", "label": "full FT", "dataset": "toy", "source": "5a1e0c9b:7b3e9f1a", '
    '"backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", "train_domains": ["a"], '
    '"hparams": {"lr": 0.0001, "weight_decay": 0.0001, "dropout": 0.0, "steps": 51}, '
    '"grid": {"lr": 0.0001, "weight_decay": 0.0001}, "seed": 0, "run_id": "fb0", "attempt": "fb0", "step": 0, '
    '"splits": {"a_in": [28, 40], "a_out": [7, 10], "b_in": [25, 40], "b_out": [5, 10]}, "loss": 0.6, '
    '"status": "ok", "final": false}',
    '{"method": "finetune", "label": "full FT", "dataset": "toy", "source": "5a1e0c9b:7b3e9f1a", '
    '"backbone": "demo-resnet", "weights": "DEFAULT", "test_domain": "b", "train_domains": ["a"], '
    '"hparams": {"lr": 0.0001, "weight_decay": 0.0001, "dropout": 0.0, "steps": 51}, '
    '"grid": {"lr": 0.0001, "weight_decay": 0.0001}, "seed": 0, "run_id": "fb0", "attempt": "fb0", "step": 50, '
    '"splits": {"a_in": [28, 40], "a_out": [7, 10], "b_in": [35, 40], "b_out": [9, 10]}, "loss": 0.3, '
    '"status": "ok", "final": true}',
]) + "\n"

#: The table by hand (best i.i.d. step of each run, earliest on ties; per seed the grid point of best i.i.d.):
#: linear, held-out a: seed 0: la00 step 300 (iid .8), la01 step 300 (iid .9, ood 30/50) -> la01: .9, .6
#:                     seed 1: la10 step 300 (iid .7), la11 step 0 (iid .9, ood 24/50)   -> la11: .9, .48
#:                     iid .9 ± 0, ood .54 ± .06
#: linear, held-out b: seed 0: lb00 step 300 (iid .7, ood 36/50), lb01 step 300 (iid .6)  -> lb00: .7, .72
#:                     seed 1: lb10 step 0 (tie .5/.5: earliest; ood 20/50), lb11 step 300 (iid .8, ood 35/50)
#:                                                                                         -> lb11: .8, .7
#:                     iid .75 ± .05, ood .71 ± .01
#: linear, average: per seed over a, b: iid .8 and .85 -> .825 ± .025; ood .66 and .59 -> .625 ± .035
#: full FT: a: step 50 (iid .9, ood 39/50 = .78); b: step 0 (tie .7/.7: earliest; ood 30/50 = .6); one seed
#:          average iid .8, ood .69
EXPECTED = {  # (label, test domain): (iid mean, iid se, ood mean, ood se, seeds)
    ("linear FT, dropout 0.9", "a"): (0.9, 0.0, 0.54, 0.06, 2),
    ("linear FT, dropout 0.9", "b"): (0.75, 0.05, 0.71, 0.01, 2),
    ("linear FT, dropout 0.9", "average"): (0.825, 0.025, 0.625, 0.035, 2),
    ("full FT", "a"): (0.9, 0.0, 0.78, 0.0, 1),
    ("full FT", "b"): (0.7, 0.0, 0.6, 0.0, 1),
    ("full FT", "average"): (0.8, 0.0, 0.69, 0.0, 1),
}


def test_previous_release_records_are_read_by_the_report(tmp_path):
    lines = PREVIOUS_RELEASE.splitlines()
    old = [json.loads(line) for line in lines]
    # the fixture is the previous format: linear records without "source", fine-tuning records without the cache's
    assert all("source" not in r and "cache_provenance" in r for r in old if r["method"] == "linear-ft")
    assert all("source" in r and "cache_provenance" not in r for r in old if r["method"] == "finetune")
    path = tmp_path / "old" / "records.jsonl"
    path.parent.mkdir()
    path.write_text(PREVIOUS_RELEASE)

    records = read_records([path])
    assert len(records) == len(lines) == 20
    assert {r["source"] for r in records if r["method"] == "linear-ft"} == {"9d3c7a"}  # read as today's "source"
    assert finished_run_ids([path]) == {"la00", "la01", "la10", "la11", "lb00", "lb01", "lb10", "lb11", "fa0", "fb0"}
    assert {(r.label, r.source) for r in run_results(records)} == {("linear FT, dropout 0.9", "9d3c7a"),
                                                                   ("full FT", "5a1e0c9b:7b3e9f1a")}

    paths = write_report([tmp_path / "old"], tmp_path / "rep")
    with open(paths["table"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = {(r["label"], r["test_domain"]): (float(r["iid_acc_mean"]), float(r["iid_acc_se"]),
                                            float(r["ood_acc_mean"]), float(r["ood_acc_se"]), int(r["seeds"]))
           for r in rows}
    assert {r["dataset"] for r in rows} == {"toy"} and set(got) == set(EXPECTED)
    for key, expected in EXPECTED.items():
        assert got[key] == pytest.approx(expected, abs=1e-12), key
    summary = paths["summary"].read_text()
    assert "| linear FT, dropout 0.9 | 54.0 ± 6.0 | 71.0 ± 1.0 | 62.5 ± 3.5 |" in summary  # o.o.d.
    assert "| linear FT, dropout 0.9 | 90.0 ± 0.0 | 75.0 ± 5.0 | 82.5 ± 2.5 |" in summary  # i.i.d.
    assert "| full FT | 78.0 ± 0.0 | 60.0 ± 0.0 | 69.0 ± 0.0 |" in summary
    assert "| full FT | 90.0 ± 0.0 | 70.0 ± 0.0 | 80.0 ± 0.0 |" in summary

    result = CliRunner().invoke(main, ["report", str(path), "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert "| linear FT, dropout 0.9 | 54.0 ± 6.0 | 71.0 ± 1.0 | 62.5 ± 3.5 |" in result.output
    assert (tmp_path / "cli" / "table.csv").read_text() == paths["table"].read_text()


# --------------------------------------------------------------------------- records that cannot be used

#: A change to one record (of :func:`helpers.rec`: training domains a, b, held-out c) and what the error names.
BAD_RECORDS = {
    "splits empty": (lambda r: r.update(splits={}), "splits"),
    "splits a list": (lambda r: r.update(splits=[1, 2]), "splits"),
    "totals 0": (lambda r: r.update(splits={k: [0, 0] for k in r["splits"]}), "held-out domain 'c'"),
    "split of one number": (lambda r: r["splits"].update(c_in=[1]), "c_in"),
    "split a text": (lambda r: r["splits"].update(a_out="x"), "a_out"),
    "more correct than total": (lambda r: r["splits"].update(c_out=[11, 10]), "c_out"),
    "negative count": (lambda r: r["splits"].update(b_out=[-1, 10]), "b_out"),
    "step a text": (lambda r: r.update(step="abc"), "step"),
    "step negative": (lambda r: r.update(step=-3), "step"),
    "step a fraction": (lambda r: r.update(step=1.5), "step"),
    "seed null": (lambda r: r.update(seed=None), "seed"),
    "unknown held-out domain": (lambda r: r.update(test_domain="nowhere"), "nowhere_in"),
    "no training domain": (lambda r: r.update(train_domains=[]), "train_domains"),
    "training domains a text": (lambda r: r.update(train_domains="a"), "train_domains"),
    "held out and trained on": (lambda r: r.update(train_domains=["a", "b", "c"]), "train_domains"),
    "run_id null": (lambda r: r.update(run_id=None), "run_id"),
    "label a number": (lambda r: r.update(label=3), "label"),
    "grid a text": (lambda r: r.update(grid="x"), "grid"),
    "unknown status": (lambda r: r.update(status="weird"), "status"),
    "final a text": (lambda r: r.update(final="yes"), "final"),
    "loss a text": (lambda r: r.update(loss="abc"), "loss"),
}


@pytest.mark.parametrize("bad", BAD_RECORDS)
def test_a_record_that_cannot_be_used_is_refused_naming_file_and_line(tmp_path, bad):
    change, fragment = BAD_RECORDS[bad]
    records = [rec(0, 1, 1, 1, 1), rec(5, 2, 2, 2, 2, final=True)]
    change(records[1])
    path = tmp_path / "runs" / "records.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(LinftError, match=f"{path} line 2") as caught:
        read_records([path])
    assert fragment in str(caught.value)
    for args in (["report", str(path.parent), "--out", str(tmp_path / "rep")], ["status", str(path.parent)]):
        assert_one_line_error(CliRunner().invoke(main, args), f"{path} line 2", fragment)
    assert not (tmp_path / "rep").exists()


def test_records_that_are_not_utf8_text_are_refused_naming_file_and_line(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(json.dumps(rec(0, 1, 1, 1, 1)).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(LinftError, match=f"{path} line 2 is not UTF-8 text"):
        read_records([path])
    h5 = tmp_path / "cache.h5"  # an HDF5 file passed to report by mistake
    h5.write_bytes(b"\x89HDF\r\n\x1a\n\x00\x00\x00\x00\xff\xff\xff\xff")
    assert_one_line_error(CliRunner().invoke(main, ["report", str(h5), "--out", str(tmp_path / "rep")]),
                          f"{h5} line 1")
    assert not (tmp_path / "rep").exists()


def test_a_diverged_record_may_have_no_splits():
    diverged = {**rec(3, 1, 1, 1, 1, final=True), "splits": {}, "status": "diverged", "loss": None}
    assert record_problem(diverged) is None
    assert record_problem(rec(0, 1, 1, 1, 1)) is None
    assert record_problem({**diverged, "status": "ok"}) is not None

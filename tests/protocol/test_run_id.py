"""linft.protocol.identity: the one run-id recipe (a formula, and the ids that release 0.2 wrote) and the one header
builder (attempt, schema)."""

import hashlib
import json
from pathlib import Path

from linft.protocol.identity import (SCHEMA_VERSION, image_source, new_keys_unless_default, run_header, run_id)
from linft.protocol.records import make_record, record_problem

PINNED = Path(__file__).parents[1] / "compat" / "identity.json"


def _sha16(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def test_run_id_is_the_hash_of_method_source_and_spec():
    spec = {"test_domain": "photo", "hparams": {"lr": 1e-3}, "seed": 2}
    assert run_id("linear-ft", "abc", spec) == _sha16({"method": "linear-ft", "source": "abc", **spec})
    # None leaves the key out (release 0.2's fine-tuning, ensemble and interpolation recipes had none)
    assert run_id(None, None, spec) == _sha16(spec)
    assert run_id("finetune", None, spec) == _sha16({"method": "finetune", **spec})
    # a None inside the spec is part of it
    assert run_id(None, None, {"rule": None}) == _sha16({"rule": None}) != run_id(None, None, {})


def test_keyword_identity_gives_the_same_id():
    identity = {"method": "finetune", "backbone": "resnet50", "run": {"seed": 0}}
    assert run_id(**identity) == run_id("finetune", None, {"backbone": "resnet50", "run": {"seed": 0}})
    assert run_id(**identity, derived="ensemble") == _sha16({**identity, "derived": "ensemble"})


def test_ids_written_by_release_0_2_are_recomputed():
    """Known answers: the linear and across-run ids pinned in tests/compat/identity.json."""
    pinned = json.loads(PINNED.read_text())["records"]
    linear = [json.loads(r) for r in pinned["linear/records.jsonl"] + pinned["linear-split/records.jsonl"]]
    assert linear
    for r in linear:
        spec = {"test_domain": r["test_domain"], "hparams": r["hparams"], "seed": r["seed"]}
        assert run_id(r["method"], r["source"], spec) == r["run_id"]
    across = [json.loads(r) for r in pinned["ft/plain/across_runs/records.jsonl"]]
    assert len(across) == 3
    for r in across:
        kind = r["method"][len("finetune-"):]
        spec = {"across": kind, "members": sorted(r["members"]), "rule": r["hparams"]["rule"]}
        assert run_id(None, None, spec) == r["run_id"]


def test_new_keys_enter_only_when_not_their_old_value():
    values = {"lr": 0.1, "split_seed": None, "lp_ft": False}
    assert new_keys_unless_default(values, {"split_seed": None, "lp_ft": False}) == {"lr": 0.1}
    assert new_keys_unless_default({**values, "split_seed": 0}, {"split_seed": None}) == {
        "lr": 0.1, "split_seed": 0, "lp_ft": False}


def test_image_source_is_the_two_hash_prefixes():
    assert image_source("a" * 64, "b" * 64) == "a" * 16 + ":" + "b" * 16


def _header(**changes):
    fields = dict(run_id="0123456789abcdef", source="s", dataset="toy", backbone="resnet18", weights="DEFAULT",
                  test_domain="photo", train_domains=("art", "sketch"), hparams={"lr": 0.1}, grid={"lr": 0.1}, seed=1)
    return run_header("finetune", "full FT, dropout 0", **{**fields, **changes})


def test_the_header_builder_sets_attempt_and_schema():
    header = _header()
    assert header.attempt == header.run_id  # one run, one attempt id unless told
    assert _header(attempt="a1").attempt == "a1"
    assert header.train_domains == ["art", "sketch"]
    record = make_record(header, 3, {"photo_in": [1, 2], "photo_out": [1, 1], "art_out": [0, 1],
                                     "sketch_out": [1, 1]}, final=True)
    assert record["schema"] == SCHEMA_VERSION == 2
    assert record_problem(record) is None
    assert record_problem({**record, "schema": "2"}) == "schema is '2', not a whole number"

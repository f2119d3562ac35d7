"""Existing outputs stay valid: the demo-sized pipeline gives the run ids, headers and cache provenance of the
release that wrote ``identity.json`` (see :mod:`pipeline`), and the interpolation id follows its frozen recipe.

Records, run ids and provenance are the contract behind "skip what is done" and behind which records are pooled in a
table: a change that moves or renames code must leave every line of ``identity.json`` as it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import pipeline


@pytest.fixture(scope="module")
def produced(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("compat")
    return out, pipeline.run_pipeline(out)


def test_cache_provenance_is_kept(produced):
    expected = json.loads(pipeline.IDENTITY_FILE.read_text())
    assert produced[1]["cache"] == expected["cache"]


def test_every_record_identity_is_kept(produced):
    out, result = produced
    pinned = json.loads(pipeline.IDENTITY_FILE.read_text())["records"]
    expected = {name: pipeline.relabeled(name, rows) for name, rows in pinned.items()}
    view = pipeline.identity_view(result, out)["records"]
    assert sorted(view) == sorted(expected)
    for name in expected:
        missing = sorted(set(expected[name]) - set(view[name]))
        assert not missing, f"{name}: {len(missing)} records changed, e.g. {missing[0]}"
        assert view[name] == expected[name]


def _frozen_state_sha256(state: dict) -> str:
    """The weights' identity as release 0.2 computed it (sorted keys, dtype, shape, raw bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_interpolation_ids_follow_the_frozen_recipe(produced):
    out, result = produced
    interp = result["records"]["interpolate/records.jsonl"]
    finetuned = interp[0]["hparams"]["finetuned_run"]
    selected = next(out.glob(f"ft/plain/{finetuned}/selected.pt"))
    state = torch.load(selected, map_location="cpu", weights_only=True)["state_dict"]
    ft_record = next(r for r in result["records"][f"ft/plain/{finetuned}/records.jsonl"] if r["method"] == "finetune")
    dataset_sha, pretrained_sha = pipeline.stable_hashes(out)
    assert ft_record["source"] == f"{dataset_sha[:16]}:{pretrained_sha[:16]}"
    for r in interp:
        identity = dict(method=r["method"], finetuned=finetuned, finetuned_sha256=_frozen_state_sha256(state),
                        pretrained=pretrained_sha, dataset=dataset_sha, image_size=r["hparams"]["image_size"],
                        probe_l2=r["hparams"]["probe_l2"], probe_max_iter=200, probe_tolerance=1e-6,
                        alpha=r["hparams"]["alpha"], block=r["hparams"]["block"])
        assert r["run_id"] == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


RECORDS = Path(__file__).with_name("records")
TABLES = Path(__file__).with_name("tables")


@pytest.mark.parametrize("name", ["runs.csv", "table.csv", "clouds.csv"])
def test_tables_of_existing_records_are_kept(tmp_path, name):
    """Records written by release 0.2 (``records/``) give the same tables, byte for byte."""
    from linft.analysis import write_report

    write_report([RECORDS], tmp_path / "report", force=True)
    assert (tmp_path / "report" / name).read_bytes() == (TABLES / name).read_bytes()

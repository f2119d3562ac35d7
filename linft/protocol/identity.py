"""What a run is: its id (:func:`run_id`), the header every record of it carries (:func:`run_header`, THE builder
of a :class:`RunHeader`), and the record schema version (:data:`SCHEMA_VERSION`).

Run ids are the contract behind "skip what is done" and behind which records are pooled in one table. One recipe
makes every id: the first 16 hex digits of the SHA-256 of the JSON (sorted keys) of ``{"method": method,
"source": source, **spec}``, where a ``method`` or ``source`` of None is left out (the recipes of release 0.2
wrote no such key: fine-tuning names its dataset and weights in ``spec``, ensembles across runs have no method).
A key that was added to a spec after release 0.2 enters it only when it is not its old value
(:func:`new_keys_unless_default`), so that every existing run keeps its id. Records say which schema they follow
(``schema``: :data:`SCHEMA_VERSION`; records without it are schema 1), instead of readers guessing from which keys
are there.

``source`` names what the numbers were computed from, by one rule: a feature cache's ``provenance_sha256``, or
:func:`image_source` of the image files and the weights; a derived run keeps the source of the runs it derives from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

#: The schema of the records this release writes: 2 adds ``schema`` itself (records without it are schema 1).
SCHEMA_VERSION = 2


def run_id(method: str | None = None, source: str | None = None, spec: dict | None = None, **fields) -> str:
    """The id of the run ``method`` on ``source`` defined by ``spec`` (and ``fields``, merged into it): see the
    module's docstring for the recipe. ``run_id(**identity)`` of a dict with a ``method`` key is the same id."""
    identity = {**({"method": method} if method is not None else {}),
                **({"source": source} if source is not None else {}), **(spec or {}), **fields}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def new_keys_unless_default(values: dict, old_values: dict) -> dict:
    """``values`` without the keys of ``old_values`` that hold their old value: THE rule by which a key added to a
    run's spec after release 0.2 leaves the ids of existing runs (which never had it) unchanged."""
    return {k: v for k, v in values.items() if k not in old_values or v != old_values[k]}


def image_source(dataset_sha256: str, weights_sha256: str) -> str:
    """The ``source`` of a run computed from images: ``<dataset files>:<weights>`` (16 hex digits of each hash)."""
    return f"{dataset_sha256[:16]}:{weights_sha256[:16]}"


@dataclass(frozen=True)
class RunHeader:
    """What every record of one run says about the run: all but the evaluation point. Built by :func:`run_header`."""

    method: str
    label: str
    dataset: str
    source: str
    backbone: str
    weights: str
    test_domain: str
    train_domains: list
    hparams: dict
    grid: dict
    seed: int
    run_id: str
    attempt: str
    extra: dict = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def replace(self, **changes) -> "RunHeader":
        """A copy with some fields changed (a derived run: another method, label and id)."""
        return dataclasses.replace(self, **changes)

    def fields(self) -> dict:
        """The header as the record fields it contributes (extras flattened in)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)
        return out


def run_header(method: str, label: str, *, run_id: str, source: str, dataset: str, backbone: str, weights: str,
               test_domain: str, train_domains, hparams: dict, grid: dict, seed: int, attempt: str | None = None,
               extra: dict | None = None) -> RunHeader:
    """THE header of a run's records. ``attempt`` (which execution wrote a record) is the run's id unless given
    (a process writing many runs into one file gives its own); ``train_domains`` in the dataset's order."""
    return RunHeader(method=method, label=label, dataset=dataset, source=source, backbone=backbone, weights=weights,
                     test_domain=test_domain, train_domains=list(train_domains), hparams=hparams, grid=grid,
                     seed=int(seed), run_id=run_id, attempt=run_id if attempt is None else attempt,
                     extra=dict(extra or {}), schema=SCHEMA_VERSION)

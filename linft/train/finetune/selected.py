"""``selected.pt``: the model a fine-tuning run selected (its best-i.i.d. evaluation), written and read here only.

The file sits in the run's folder, ``OUT/<run_id>/selected.pt``
(:attr:`linft.train.finetune.run_folder.RunFolder.selected`); ensembles and soups across runs
(:mod:`linft.train.finetune.across_runs`), interpolation (:mod:`linft.interpolation`) and ``load_backbone(name,
".../selected.pt")`` read it. Format (``torch.save`` of plain containers and tensors, so that
``torch.load(path, weights_only=True)`` reads it; no pickled class):

* ``state_dict``: ``{name: tensor}`` on the CPU, the classifier's ordinary state_dict
  (:func:`linft.train.finetune.model.ordinary_state`: the backbone's parameters and buffers, and the head
  ``Dropout(λ) → Linear(D, C)`` as ``fc.1.weight``, ``fc.1.bias``; a first-order run stores θ0 + δ, the ordinary
  network of its evaluated weights);
* ``metadata``: ``{str: JSON-able value}``, the run's header (``run_id``, ``method``, ``label``, ``dataset``,
  ``source``, ``backbone``, ``weights``, ``test_domain``, ``train_domains``, ``hparams``, ``grid``, ``seed``,
  ``attempt``, ...: :meth:`linft.protocol.records.RunHeader.fields`) and ``step`` (the selected evaluation), ``iid``
  (its i.i.d. accuracy), ``num_classes``, ``class_names``, ``domain_names``, ``image_size``, ``linearized``.

The file is replaced atomically (:func:`linft.runtime.atomic_save`) each time the i.i.d. accuracy improves, before that
evaluation's record is written, so a run's final record means its ``selected.pt`` is final. Files of earlier releases
have the same two keys; :func:`load_selected` accepts any file with a ``state_dict`` dict (``metadata`` may be absent).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from linft.errors import LinftError
from linft.models.checkpoints import load_checkpoint
from linft.runtime import atomic_save
from linft.train.finetune.run_folder import SELECTED_FILE


def save_selected(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``selected.pt`` at ``path`` (a run folder, or the file itself) atomically; returns the file."""
    path = selected_file(path)
    atomic_save({"state_dict": state_dict, "metadata": dict(metadata)}, path)
    return path


def load_selected(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of a ``selected.pt`` (a run folder, or the file itself), read with
    ``weights_only=True`` on the CPU; a missing or foreign file is one LinftError."""
    path = selected_file(path)
    if not path.is_file():
        raise LinftError(f"{path} does not exist; pass a run folder of `linft finetune` or its selected.pt")
    obj = load_checkpoint(path, "checkpoint", "pass a run's selected.pt")
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise LinftError(f"{path} is not a linft fine-tuning checkpoint (no state_dict); pass a run's selected.pt")
    return obj["state_dict"], dict(obj.get("metadata") or {})


def selected_file(path: str | os.PathLike) -> Path:
    """The ``selected.pt`` a path names: a run folder's, or the path itself."""
    path = Path(path)
    return path / SELECTED_FILE if path.is_dir() else path

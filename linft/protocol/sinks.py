"""Metrics streams fed by the one record writer: TensorBoard event files (the optional extra ``tensorboard``).

A sink is attached to :class:`~linft.protocol.records.RecordWriter` (``RecordWriter(path, sinks=[sink])``):
every record, once its line is in the records file, is also passed to ``sink.write(record)``. The records file
stays the reference (selection, tables and plots read only it); a sink is a view of the same numbers for the
tools researchers already watch while a sweep runs.

:class:`TensorBoardSink` writes one TensorBoard *run* per linft run, in
``log_dir/<label>/<held-out domain>/seed<seed>_<grid>_<run id>/``, with the scalars
``accuracy/iid`` and ``accuracy/ood`` (fractions, as :mod:`linft.protocol.selection` defines them),
``loss/train`` (the training loss of the evaluated step) and ``diverged`` (1 at the step a run diverged), at the
record's ``step``. It writes through ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard``
package (``pip install 'linft[tensorboard]'``); the import happens when the sink is made, so linft itself does
not need it. Only records written while the sink is attached reach it: runs finished before are not replayed.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

from linft.errors import LinftError
from linft.output import write_failure
from linft.protocol.selection import iid_accuracy, ood_accuracy

TENSORBOARD_INSTALL = "pip install 'linft[tensorboard]'"


def tensorboard_run_name(record: dict) -> str:
    """The TensorBoard run of a record: ``<label>/<held-out domain>/seed<seed>_<grid key><value>..._<run id[:8]>``
    (characters other than letters, digits, ``.``, ``=``, ``+`` and ``-`` become ``_``)."""
    def clean(text) -> str:
        return re.sub(r"[^A-Za-z0-9.=+-]+", "_", str(text)).strip("_") or "_"

    grid = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(record["grid"].items()))
    leaf = "_".join(p for p in (f"seed{record['seed']}", grid, str(record["run_id"])[:8]) if p)
    return "/".join((clean(record["label"]), clean(record["test_domain"]), clean(leaf)))


def record_scalars(record: dict) -> dict[str, float]:
    """The scalars of one record: accuracies and training loss of an ``ok`` record, ``diverged`` of a diverged one."""
    if record.get("status", "ok") != "ok":
        return {"diverged": 1.0}
    scalars = {}
    if record.get("splits"):
        scalars["accuracy/iid"] = iid_accuracy(record)
        scalars["accuracy/ood"] = ood_accuracy(record)
    loss = record.get("loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        scalars["loss/train"] = float(loss)
    return scalars


def writable_log_dir(log_dir: str | os.PathLike) -> Path:
    """``log_dir``, proved writable before anything is trained, as an output folder is: a folder is made (and
    removed) in it, or in its closest existing parent when it is missing (each run's event files make their own
    folders). One LinftError about ``tensorboard_dir`` when that fails; nothing is left on disk."""
    log_dir = Path(log_dir)
    existing = log_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".linft-probe-", dir=existing))
    except OSError as exc:
        raise LinftError(f"cannot write TensorBoard event files under {log_dir} ({write_failure(exc)}); choose "
                         f"another tensorboard_dir", param="tensorboard_dir") from None
    return log_dir


class TensorBoardSink:
    """Records -> TensorBoard event files under ``log_dir``, one event-file writer per run (closed at its final
    record, or by :meth:`close`; a later record of the run opens a new event file in the same run folder)."""

    def __init__(self, log_dir: str | os.PathLike):
        self.log_dir = writable_log_dir(log_dir)  # before training starts, as an output folder is checked
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise LinftError(f"TensorBoard event files (tensorboard_dir={str(log_dir)!r}) need the tensorboard "
                             f"package; {TENSORBOARD_INSTALL}", param="tensorboard_dir") from None
        self._summary_writer = SummaryWriter
        self._writers = {}

    def write(self, record: dict) -> None:
        name = tensorboard_run_name(record)
        writer = self._writers.get(name)
        if writer is None:
            writer = self._writers[name] = self._summary_writer(log_dir=str(self.log_dir / name))
        for tag, value in record_scalars(record).items():
            writer.add_scalar(tag, value, global_step=int(record["step"]))
        if record.get("final"):
            self._writers.pop(name).close()
        else:
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

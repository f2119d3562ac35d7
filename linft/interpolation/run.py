"""Weight interpolation vs representation interpolation between a pretrained and a fine-tuned model.

The paper's Figure 1 and appendix A.1, made measurable. The two ends are

- the *pretrained* model: the backbone θ_p the fine-tuned run started from,
  with a linear-probe head ω_p (the pretrained network has no head for the
  task; see :func:`linft.models.heads.fit_probe_head`), and
- the *fine-tuned* model (θ_f, ω_f): a run folder of ``linft finetune`` or its
  ``selected.pt`` (any checkpoint in that format).

α is the share of the **fine-tuned** end: α = 0 is the pretrained model,
α = 1 the fine-tuned one (the paper's appendix writes α for the pretrained
share). The paths, each evaluated on every split:

- **weights**: θ(α) = (1-α)θ_p + αθ_f over every state_dict entry, head and
  BatchNorm statistics included; one forward pass per α.
- **representation** (appendix A.1): ((1-α)W_p + αW_f)((1-α)Φ_p + αΦ_f) +
  (1-α)b_p + αb_f, bilinear in α; two forward passes for the whole sweep.
- **representation per φ block** (layer-wise diagnostic): the same formula
  on each φ block k (the residual blocks after the last resolution change,
  :func:`linft.models.blocks.phi_block_names`), with a probe head fitted on each
  model's own φ_k (also for the fine-tuned model, whose trained head reads
  only the last block). It says at which depth mixing the two
  representations starts to pay; it is not a model anyone trained.
- **linearized** (``linearity=True``): the first-order model around
  θ_0 = (θ_p, ω_p) along the weight path, f_lin(θ(α)) = f(θ_0) + α·J(θ_f − θ_0),
  one jvp per batch of images for every α, and the post-hoc linearity of
  the run: accuracies of f(θ_f), f_lin(θ_f) and f(θ_0) on every split, and
  ‖f(θ_f) − f_lin(θ_f)‖ / ‖f(θ_f) − f(θ_0)‖ (:func:`linft.models.linearize.relative_linearity_gap`).
  θ_0 carries the probe head, not the run's random initial head, so that
  f(θ_0) means something; this is also the start of the weight path.

Exactness is discussed in :mod:`linft.interpolation.paths`. On CUDA the
forward passes run under autocast to ``precision`` (bfloat16 by default, as
extraction and fine-tuning; float32 makes the paths' shared endpoints agree
exactly); the CPU computes in float32.

Records: one per α and path (methods ``interpolation-*``, ``grid = {"alpha": α}``,
step 0, final), appended to ``OUT/records.jsonl`` once; ``linft report`` reads them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from linft.analysis.aggregate import run_results
from linft.interpolation.endpoints import Endpoints, load_endpoints
from linft.interpolation.paths import (first_order_outputs, iter_weight_path, pooled_features_and_logits,
                                                representation_path_predictions)
from linft.interpolation.result import InterpolateConfig, InterpolationResult
from linft.analysis.plots import plot_interpolation
from linft.data.folders import MultiDomainDataset, check_output_apart, find_dataset
from linft.data.images import EvalImages
from linft.data.splits import domain_split_rows, split_seed
from linft.errors import LinftError
from linft.locks import output_lock
from linft.models.checkpoints import state_dict_sha256
from linft.models.heads import PROBE_MAX_ITER, PROBE_TOLERANCE, LinearHead, fit_probe_head, head_keys, \
    with_head
from linft.models.linearize import relative_linearity_gap
from linft.protocol.identity import RunHeader, image_source, new_keys_unless_default, run_header, run_id
from linft.protocol.records import RECORDS_FILE, RecordWriter, done_summary, final_records, make_record
from linft.protocol.selection import iid_accuracy, ood_accuracy, predicted_classes, split_counts
from linft.output import atomic_write_text, json_text, progress_bar
from linft.runtime import effective_precision, resolve_device

#: path key -> (record method, label prefix)
PATHS = {
    "weights": ("interpolation-weights", "weight interpolation"),
    "representation": ("interpolation-representation", "representation interpolation"),
    "linearized": ("interpolation-linearized", "linearized weight interpolation"),
    "block": ("interpolation-representation-block", "representation interpolation"),
}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


@dataclass
class _Setup:
    """One interpolation: the two ends, the dataset and its splits for the run's seed, the evaluation images."""

    ds: MultiDomainDataset
    ends: Endpoints
    config: InterpolateConfig
    alphas: list[float]
    dev: torch.device
    split_rows: dict
    fit_rows: np.ndarray
    images: EvalImages
    dataset_name: str
    image_size: int
    finetuned_sha256: str

    @property
    def test_domain(self) -> str:
        return str(self.ends.metadata["test_domain"])

    @property
    def seed(self) -> int:
        return int(self.ends.metadata["seed"])

    @property
    def train_domains(self) -> list[str]:
        return [d for d in self.ds.domains if d != self.test_domain]

    def accuracies(self, predictions: torch.Tensor) -> dict:
        """``{"iid", "ood", "splits"}`` of predicted classes (N,) (:func:`predicted_classes`)."""
        return self.split_accuracies(split_counts(predictions, self.ds.labels, self.split_rows, self.ds.domains))

    def split_accuracies(self, splits: dict | None) -> dict:
        """``{"iid", "ood", "splits"}`` of a record's ``splits``; all None where there are none (non-finite logits:
        the point's record is ``diverged``)."""
        if not splits:
            return {"iid": None, "ood": None, "splits": None}
        rec = {"splits": splits, "test_domain": self.test_domain, "train_domains": self.train_domains}
        return {"iid": iid_accuracy(rec), "ood": ood_accuracy(rec), "splits": splits}


def prepare_interpolation(dataset, finetuned, config: InterpolateConfig, data_root, progress: bool) -> _Setup:
    """What :func:`interpolate` settles before evaluating: the dataset, both ends, the α grid, the device and the
    split rows of the fine-tuned run (its probe head is fitted on the training domains' "in" rows)."""
    alphas = config.check()
    ds = dataset if isinstance(dataset, MultiDomainDataset) else find_dataset(dataset, data_root)
    ends = load_endpoints(finetuned, ds, pretrained=config.pretrained, backbone=config.backbone)
    meta = ends.metadata
    e = ds.domains.index(str(meta["test_domain"]))
    split_rows = domain_split_rows(ds.domain_ids, len(ds.domains),
                                   split_seed(int(meta["seed"]), meta.get("hparams")))
    fit_rows = np.sort(np.concatenate([split_rows[(d, "in")] for d in range(len(ds.domains)) if d != e]))
    if len(fit_rows) == 0:
        raise LinftError(f"the training domains' 'in' splits of {ds.root} are empty; the probe head needs images")
    image_size = int(meta.get("image_size") or 224)
    return _Setup(ds, ends, config, alphas, resolve_device(config.device), split_rows, fit_rows,
                  EvalImages(ds, image_size, config.batch_size, config.workers, progress),
                  str(meta.get("dataset") or ds.name or ds.root.name), image_size,
                  state_dict_sha256(ends.finetuned_state))  # a run still training changes its selected.pt


def _labels(setup: _Setup, keys: list[str]) -> dict[str, str]:
    ends, meta, labels = setup.ends, setup.ends.metadata, {}
    for key in keys:
        kind = "block" if key.startswith("block:") else key
        text = f"{PATHS[kind][1]} at {key[6:]} (probe heads)" if kind == "block" else PATHS[kind][1]
        if setup.config.pretrained is not None and ends.pretrained_weights != meta.get("weights"):
            text += f" from {Path(ends.pretrained_weights).name}"  # not the weights the run started from
        labels[key] = f"{text} [{meta['label']}]" if meta.get("label") else text
    return labels


def point_header(setup: _Setup, key: str, alpha: float, label: str) -> RunHeader:
    """The record header of path ``key`` at ``alpha``: its run id holds everything the point's numbers depend on,
    the computed precision included when it is not float32."""
    ends, meta, cfg = setup.ends, setup.ends.metadata, setup.config
    method = PATHS["block" if key.startswith("block:") else key][0]
    block = key[6:] if key.startswith("block:") else None
    precision = effective_precision(setup.dev, cfg.precision)
    # the computed precision is part of what a record is (float32, all that earlier releases computed, keeps their ids)
    rid = run_id(method, None, new_keys_unless_default(
        {"finetuned": ends.finetuned_id, "finetuned_sha256": setup.finetuned_sha256,
         "pretrained": ends.pretrained_sha256, "dataset": setup.ds.file_list_sha256, "image_size": setup.image_size,
         "probe_l2": cfg.probe_l2, "probe_max_iter": PROBE_MAX_ITER, "probe_tolerance": PROBE_TOLERANCE,
         "alpha": alpha, "block": block, "precision": precision}, {"precision": "float32"}))
    hparams = {"alpha": alpha, "path": key, "pretrained_weights": ends.pretrained_weights, "probe_l2": cfg.probe_l2,
               "finetuned_run": ends.finetuned_id, "finetuned_label": meta.get("label"),
               "finetuned_step": meta.get("step"), "image_size": setup.image_size, "block": block,
               "precision": precision}
    source = meta.get("source") or image_source(setup.ds.file_list_sha256, ends.pretrained_sha256)
    return run_header(method, label, run_id=rid, source=source, dataset=setup.dataset_name, backbone=ends.backbone,
                      weights=ends.pretrained_weights, test_domain=setup.test_domain,
                      train_domains=setup.train_domains, hparams=hparams, grid={"alpha": alpha}, seed=setup.seed)


def _representation_paths(setup: _Setup, progress: bool, passes: dict) -> tuple[dict, torch.Tensor, dict]:
    """Φ_p (and the probe head on the last block), then Φ_f and f(θ_f): the representation and block paths.

    Returns the predictions per path, the fine-tuned logits, and the pretrained state with its probe head.
    """
    ends, cfg, dev, ds = setup.ends, setup.config, setup.dev, setup.ds
    channels_last = dev.type == "cuda"
    net = ends.network.to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    phis, logits_f = {}, None
    for end, state in (("pretrained", ends.pretrained_state), ("fine-tuned", ends.finetuned_state)):
        net.load_state_dict(state, strict=True)
        with progress_bar(len(ds), f"{end} model: φ blocks", unit="img", enabled=progress) as update:
            phis[end], logits = pooled_features_and_logits(net, ends.block_names, setup.images, dev, channels_last,
                                                           cfg.precision, update)
        passes["forward"] += 1
        logits_f = logits
    phi_p, phi_f = phis["pretrained"], phis["fine-tuned"]
    keys = head_keys(ends.finetuned_state)
    if phi_p.shape[-1] != ends.finetuned_state[keys[0]].shape[1]:
        raise LinftError(f"the last φ block {ends.block_names[-1]} gives {phi_p.shape[-1]} features but the "
                         f"classifier reads {ends.finetuned_state[keys[0]].shape[1]}; pass a torchvision-style ResNet")
    num_classes, labels = int(ends.finetuned_state[keys[0]].shape[0]), ds.labels[setup.fit_rows]

    def probe(phi: torch.Tensor) -> LinearHead:
        return fit_probe_head(phi[setup.fit_rows].to(dev), labels, num_classes, cfg.probe_l2).to("cpu")

    head_p = probe(phi_p[:, -1])
    head_f = LinearHead(*(ends.finetuned_state[k].detach().float().cpu() for k in keys))
    preds = {"representation": representation_path_predictions(setup.alphas, phi_p[:, -1].contiguous(),
                                                               phi_f[:, -1].contiguous(), head_p, head_f, dev,
                                                               cfg.batch_size)}
    for k, name in enumerate(ends.block_names if cfg.blocks else []):
        hp = head_p if k == len(ends.block_names) - 1 else probe(phi_p[:, k])
        preds[f"block:{name}"] = representation_path_predictions(setup.alphas, phi_p[:, k].contiguous(),
                                                                 phi_f[:, k].contiguous(), hp, probe(phi_f[:, k]),
                                                                 dev, cfg.batch_size)
    return preds, logits_f, with_head(ends.pretrained_state, head_p)


def _weight_path(setup: _Setup, pre_state: dict, progress: bool, passes: dict) -> torch.Tensor:
    """Predicted classes (A, N) along the weight path: one forward pass per α."""
    net, dev = setup.ends.network, setup.dev
    out = torch.empty(len(setup.alphas), len(setup.ds), dtype=torch.long)
    with progress_bar(len(setup.alphas) * len(setup.ds), "weight path", unit="img", enabled=progress) as update:
        for i, (_, logits) in enumerate(iter_weight_path(net, pre_state, setup.ends.finetuned_state, setup.alphas,
                                                         setup.images, dev, dev.type == "cuda", setup.config.precision,
                                                         update)):
            out[i] = predicted_classes(logits)
            passes["forward"] += 1
    return out


def _linearized_path(setup: _Setup, pre_state: dict, logits_f: torch.Tensor, progress: bool,
                     passes: dict) -> tuple[torch.Tensor, dict]:
    """Predicted classes (A, N) of the first-order path (one jvp pass), and the run's post-hoc linearity."""
    dev = setup.dev
    with progress_bar(len(setup.ds), "first-order model (jvp)", unit="img", enabled=progress) as update:
        f0, jv = first_order_outputs(setup.ends.network, pre_state, setup.ends.finetuned_state, setup.images, dev,
                                     dev.type == "cuda", update)
    passes["jvp"] += 1
    a = torch.tensor(setup.alphas, dtype=f0.dtype).view(-1, 1, 1)
    f_lin = f0 + jv
    summary = {"gap": relative_linearity_gap(logits_f, f_lin, f0)}
    for what, logits in (("f(θf)", logits_f), ("f_lin(θf)", f_lin), ("f(θ0)", f0)):
        summary[what] = setup.accuracies(predicted_classes(logits))
    return predicted_classes(f0.unsqueeze(0) + a * jv.unsqueeze(0)), summary


def _path_keys(setup: _Setup) -> list[str]:
    blocks = [f"block:{n}" for n in setup.ends.block_names] if setup.config.blocks else []
    return ["weights", "representation"] + (["linearized"] if setup.config.linearity else []) + blocks


def _result(setup: _Setup, out: Path, stem: str, labels: dict, curves: dict, linearity, written: int,
            passes: dict) -> InterpolationResult:
    ends = setup.ends
    return InterpolationResult(alphas=setup.alphas, curves=curves, labels=labels, test_domain=setup.test_domain,
                               seed=setup.seed, finetuned=str(ends.checkpoint), finetuned_id=ends.finetuned_id,
                               pretrained_weights=ends.pretrained_weights, dataset=setup.dataset_name, out=out,
                               records=out / RECORDS_FILE, linearity=linearity, records_written=written,
                               passes=passes, summary=out / f"{stem}.json",
                               finetuned_label=ends.metadata.get("label"))


def _already_done(setup: _Setup, out: Path, stem: str, labels: dict, headers: dict,
                  by_id: dict[str, dict]) -> InterpolationResult | None:
    """The result of an earlier call with the same arguments, when every one of its records is on disk.

    Curves come from the records themselves (``by_id``: the final records on disk); the linearity summary from
    the earlier call's ``.json``, which must be of this very call (same α values and paths), or nothing is skipped.
    """
    summary = out / f"{stem}.json"
    if not summary.exists():
        return None
    saved = json.loads(summary.read_text())
    same_call = saved.get("alphas") == setup.alphas and set(saved.get("curves") or {}) == set(labels) \
        and (saved.get("linearity") is not None) == setup.config.linearity
    if not same_call or any(h.run_id not in by_id for h in headers.values()):
        return None
    curves = {key: [{"alpha": a, **setup.split_accuracies(by_id[headers[(key, a)].run_id]["splits"])}
                    for a in setup.alphas] for key in labels}
    result = _result(setup, out, stem, labels, curves, saved.get("linearity"), 0, {"forward": 0, "jvp": 0})
    plot = summary.with_suffix(".png")
    result.plot = plot if plot.exists() else None
    return result


def _finish(setup: _Setup, result: InterpolationResult, records: list[dict], say) -> InterpolationResult:
    """Plot and the summary file beside the records."""
    if setup.config.plot:
        meta = setup.ends.metadata
        title = f"{setup.dataset_name}, held out {setup.test_domain}, seed {setup.seed}: " \
                f"{meta.get('label') or setup.ends.finetuned_id}"
        result.plot = plot_interpolation(run_results(records), result.summary.with_suffix(".png"), title=title)
    atomic_write_text(result.summary, json_text(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    say(f"{done_summary(result.records_written, len(records) - result.records_written, verb='written', unit='record')}"
        f" -> {result.records}")
    return result


def interpolate(dataset, finetuned: str | os.PathLike, config: InterpolateConfig = InterpolateConfig(), *,
                data_root=None, out_dir: str | os.PathLike | None = None, progress: bool = True,
                say: Callable[[str], None] | None = None, **settings) -> InterpolationResult:
    """Weight vs representation interpolation (and, with ``linearity``, the first-order path) of one run.

    ``dataset``: folder or DomainBed name (with ``data_root``) or a
    :class:`~linft.data.folders.MultiDomainDataset`; ``finetuned``: a run
    folder or ``selected.pt``; ``settings`` override fields of ``config``
    (``alphas="0,0.5,1", linearity=True``). Writes records to
    ``out_dir/records.jsonl`` (default ``runs/interpolate/<dataset>``), the
    Figure-1 plot ``interpolation_<test domain>_seed<seed>_<run id>.png`` and
    the same name ``.json`` (the result). When every record is already there,
    nothing is computed again: the result is read back from that ``.json``.
    Cost: 2 forward passes (Φ_p, Φ_f), one per α (weights), one jvp pass with ``linearity``.
    """
    config = replace(config, **settings)
    say = say or (lambda _line: None)
    setup = prepare_interpolation(dataset, finetuned, config, data_root, progress)
    ends = setup.ends
    out = Path(out_dir) if out_dir else Path("runs") / "interpolate" / _safe_name(setup.dataset_name)
    stem = f"interpolation_{_safe_name(setup.test_domain)}_seed{setup.seed}_{_safe_name(ends.finetuned_id)[:16]}"
    check_output_apart(out, [setup.ds.root], param="out_dir")
    labels = _labels(setup, _path_keys(setup))
    headers = {(key, a): point_header(setup, key, a, labels[key]) for key in labels for a in setup.alphas}
    with output_lock(out, folder=True):  # a second identical command refuses instead of writing records twice
        return _interpolate_locked(setup, _Target(out, stem, labels, headers), progress, say)


@dataclass(frozen=True)
class _Target:
    """Where :func:`interpolate` writes and what: the output folder, the file stem of its plot and summary, the
    label and the record header of each path and α."""

    out: Path
    stem: str
    labels: dict
    headers: dict


def _interpolate_locked(setup: _Setup, target: _Target, progress: bool,
                        say: Callable[[str], None]) -> InterpolationResult:
    """:func:`interpolate` once its output folder is locked by this process (the settings: ``setup.config``)."""
    config, out, stem, labels, headers = setup.config, target.out, target.stem, target.labels, target.headers
    ends = setup.ends
    finals = final_records([out / RECORDS_FILE])
    done = set(finals)
    earlier = _already_done(setup, out, stem, labels, headers, finals)
    if earlier is not None:
        say(f"{done_summary(0, len(headers), verb='written', unit='record')} -> {earlier.records} (nothing to compute)")
        return earlier
    say(f"fine-tuned: {ends.checkpoint} ({ends.metadata.get('label', '?')}, held out {setup.test_domain}, seed "
        f"{setup.seed}); pretrained: {ends.backbone} / {ends.pretrained_weights}; "
        f"α = {', '.join(f'{a:g}' for a in setup.alphas)}")
    passes = {"forward": 0, "jvp": 0}
    preds, logits_f, pre_state = _representation_paths(setup, progress, passes)
    preds["weights"] = _weight_path(setup, pre_state, progress, passes)
    linearity = None
    if config.linearity:
        preds["linearized"], linearity = _linearized_path(setup, pre_state, logits_f, progress, passes)
    curves, records = {}, []
    for key in labels:
        curves[key] = [{"alpha": a, **setup.accuracies(preds[key][i])} for i, a in enumerate(setup.alphas)]
        for point in curves[key]:
            extra = {"linearity_gap": linearity["gap"]} if key == "linearized" else {}
            records.append(make_record(headers[(key, point["alpha"])], 0, point["splits"], final=True, **extra))
    written = 0
    with RecordWriter(out / RECORDS_FILE) as writer:
        for record in records:
            if record["run_id"] not in done:
                writer.write(record)
                done.add(record["run_id"])
                written += 1
    return _finish(setup, _result(setup, out, stem, labels, curves, linearity, written, passes), records, say)

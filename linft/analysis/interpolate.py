"""Weight interpolation vs representation interpolation between a pretrained and a fine-tuned model.

The paper's Figure 1 and appendix A.1, made measurable. The two ends are

- the *pretrained* model: the backbone θ_p the fine-tuned run started from,
  with a linear-probe head ω_p (the pretrained network has no head for the
  task; see :func:`fit_probe_head`), and
- the *fine-tuned* model (θ_f, ω_f): a run folder of ``linft finetune`` or its
  ``selected.pt`` (any checkpoint in that format).

α is the share of the **fine-tuned** end: α = 0 is the pretrained model,
α = 1 the fine-tuned one (the paper's appendix writes α for the pretrained
share). The paths, each evaluated on every split:

- **weights** (:func:`iter_weight_path`): θ(α) = (1-α)θ_p + αθ_f over every
  entry of the state_dict, head and BatchNorm statistics included, through
  :func:`linft.averaging.interpolate_state_dicts`; one forward pass over the
  evaluation images per α.
- **representation** (:func:`representation_logits`): logits =
  ((1-α)W_p + αW_f)((1-α)Φ_p + αΦ_f) + (1-α)b_p + αb_f, with Φ the pooled
  penultimate representation. Bilinear in α, not an output ensemble. Φ_p and
  Φ_f are computed once (one pass per model, :func:`pooled_features_and_logits`),
  so the whole α sweep costs two forward passes.
- **representation per φ block** (layer-wise diagnostic): the same formula
  on each φ block k (the residual blocks after the last resolution change,
  :func:`linft.backbones.phi_block_names`), with a probe head fitted on each
  model's own φ_k (also for the fine-tuned model, whose trained head reads
  only the last block). It says at which depth mixing the two
  representations starts to pay; it is not a model anyone trained.
- **linearized** (``linearity=True``): the first-order model around
  θ_0 = (θ_p, ω_p) along the weight path, f_lin(θ(α)) = f(θ_0) + α·J(θ_f − θ_0),
  one jvp per batch of images for every α (:func:`first_order_outputs`, via
  :func:`linft.linearize.first_order_terms`), and the post-hoc linearity of
  the run: accuracies of f(θ_f), f_lin(θ_f) and f(θ_0) on every split, and
  ‖f(θ_f) − f_lin(θ_f)‖ / ‖f(θ_f) − f(θ_0)‖ (:func:`linft.linearize.relative_linearity_gap`).
  θ_0 carries the probe head, not the run's random initial head, so that
  f(θ_0) means something; this is also the start of the weight path.

Exactness: at α = 0 and α = 1 the weight path loads the end state_dicts
themselves, the representation path multiplies by exactly 1 and 0, and the
linearized path at α = 0 is the jvp's primal, so each path reproduces its
endpoint models (up to the order of float operations inside a matrix
product of a different batch shape). Evaluation runs in float32 unless
``amp`` asks for bfloat16 autocast on CUDA (faster; the endpoints then agree
only to bfloat16 precision).

Memory: Φ_p and Φ_f of every evaluation image and every φ block are kept in
float32 on the CPU: N·K·D·4 bytes per model (PACS with ResNet-50: 0.25 GB;
DomainNet: 14 GB).

Records: one per α and path (:mod:`linft.records`), method
``interpolation-weights`` / ``-representation`` / ``-representation-block``
/ ``-linearized``, ``grid = {"alpha": α}``, step 0, final, with the
fine-tuned run's dataset, source, held-out domain, training domains and
seed, appended to ``OUT/records.jsonl`` once (a re-run writes only what is
missing). ``linft report`` reads them like any other records.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linft.errors import LinftError
from linft.finetune import (SELECTED_FILE, EvalImages, autocast_for, build_classifier, classifier_linear,
                            load_selected, model_input, split_counts)

__all__ = [
    "DEFAULT_ALPHAS", "PATHS", "PROBE_L2", "PROBE_MAX_ITER",
    "LinearHead", "Endpoints", "InterpolationResult",
    "parse_alphas", "check_alphas", "fit_probe_head", "classifier_head", "with_head",
    "representation_logits", "representation_path_predictions",
    "load_endpoints", "pooled_features_and_logits", "iter_weight_path", "first_order_outputs",
    "interpolate",
]

#: The default α sweep: 11 points from 0 (pretrained) to 1 (fine-tuned).
DEFAULT_ALPHAS = "0:1:11"

#: path key -> (record method, label prefix)
PATHS = {
    "weights": ("interpolation-weights", "weight interpolation"),
    "representation": ("interpolation-representation", "representation interpolation"),
    "linearized": ("interpolation-linearized", "linearized weight interpolation"),
    "block": ("interpolation-representation-block", "representation interpolation"),
}


# --------------------------------------------------------------------------- α


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """α values as sorted unique floats in [0, 1]; :class:`LinftError` otherwise."""
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError):
        raise LinftError(f"α values must be numbers, got {alphas!r}; use e.g. 0:1:11 or 0,0.5,1") from None
    if not values:
        raise LinftError("no α given; use e.g. 0:1:11 (11 evenly spaced values) or 0,0.5,1")
    bad = [a for a in values if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
    if bad:
        raise LinftError(f"α {bad[0]:g} is outside [0, 1] (α is the share of the fine-tuned model: 0 = pretrained, "
                         f"1 = fine-tuned); use values in [0, 1], e.g. 0:1:11")
    return sorted(set(values))


def parse_alphas(text: str | Sequence[float]) -> list[float]:
    """``"0:1:11"`` (START:STOP:COUNT, evenly spaced, both ends included) or ``"0,0.25,1"`` -> sorted α list.

    Values are rounded to 12 decimals (0.30000000000000004 -> 0.3) and must lie in [0, 1].
    """
    if not isinstance(text, str):
        return check_alphas(text)
    s = text.strip()
    try:
        if ":" in s:
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            if count < 1:
                raise LinftError(f"α range {text!r} has COUNT {count}; "
                                 "use START:STOP:COUNT with COUNT >= 1, e.g. 0:1:11")
            values = np.linspace(start, stop, count).tolist() if count > 1 else [start]
        else:
            values = [float(p) for p in s.split(",") if p.strip()]
    except ValueError:
        raise LinftError(f"cannot read α {text!r}; use START:STOP:COUNT (e.g. 0:1:11) "
                         "or a comma list (e.g. 0,0.5,1)") from None
    return check_alphas([round(v, 12) + 0.0 for v in values])


# --------------------------------------------------------------------------- heads and the formula


def _mix(alpha: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    return (1.0 - alpha) * start + alpha * end


def representation_logits(alpha: float, phi_p: torch.Tensor, phi_f: torch.Tensor,
                          head_p: LinearHead, head_f: LinearHead) -> torch.Tensor:
    """Representation interpolation (paper appendix A.1, α = share of the fine-tuned end).

    ``((1-α)W_p + αW_f)((1-α)Φ_p + αΦ_f) + (1-α)b_p + αb_f`` for features
    ``phi_p``, ``phi_f`` (N, D) of the same images and heads (W (C, D), b (C,)).
    Bilinear in α. At α = 0 and 1 the mixing multiplies by exactly 1 and 0,
    so the result is ``head_p(phi_p)`` resp. ``head_f(phi_f)``.
    """
    a = float(alpha)
    if not (math.isfinite(a) and 0.0 <= a <= 1.0):
        raise LinftError(f"α {alpha!r} is outside [0, 1] (0 = pretrained, 1 = fine-tuned)")
    if phi_p.shape != phi_f.shape:
        raise LinftError(f"representations of different shapes {tuple(phi_p.shape)} and {tuple(phi_f.shape)}: "
                         "compute both on the same images with the same architecture")
    if head_p.weight.shape != head_f.weight.shape:
        raise LinftError(f"heads of different shapes {tuple(head_p.weight.shape)} and {tuple(head_f.weight.shape)}: "
                         "interpolate only models with the same class set")
    return F.linear(_mix(a, phi_p, phi_f), _mix(a, head_p.weight, head_f.weight), _mix(a, head_p.bias, head_f.bias))


@torch.no_grad()
def representation_path_predictions(alphas: Sequence[float], phi_p: torch.Tensor, phi_f: torch.Tensor,
                                    head_p: LinearHead, head_f: LinearHead, device="cpu",
                                    chunk: int = 256) -> torch.Tensor:
    """Predicted classes (A, N) of :func:`representation_logits` for every α, in row chunks on ``device``."""
    dev = torch.device(device)
    hp, hf = head_p.to(dev), head_f.to(dev)
    out = torch.empty(len(alphas), len(phi_p), dtype=torch.long)
    for a0 in range(0, len(phi_p), chunk):
        xp, xf = phi_p[a0:a0 + chunk].to(dev), phi_f[a0:a0 + chunk].to(dev)
        for i, a in enumerate(alphas):
            out[i, a0:a0 + chunk] = representation_logits(a, xp, xf, hp, hf).argmax(1).cpu()
    return out


# --------------------------------------------------------------------------- the two ends


@dataclass
class Endpoints:
    """The networks at both ends, before the probe head is fitted.

    ``network`` is the architecture (the pretrained backbone with the run's
    head ``Dropout → Linear(D, C)``, on the CPU, eval mode);
    ``pretrained_state`` is its state_dict (the head's weights are a
    placeholder until :func:`with_head` puts the probe head in);
    ``finetuned_state`` the fine-tuned run's; ``metadata`` the run's
    (see :func:`linft.finetune.load_selected`).
    """

    network: nn.Module
    pretrained_state: dict
    finetuned_state: dict
    metadata: dict
    backbone: str
    pretrained_weights: str
    pretrained_sha256: str
    block_names: list[str]
    finetuned_id: str
    checkpoint: Path


_NEEDED_METADATA = ("backbone", "test_domain", "seed")


def load_endpoints(finetuned: str | os.PathLike, dataset=None, pretrained: str | None = None,
                   backbone: str | None = None) -> Endpoints:
    """Load the fine-tuned checkpoint and build the pretrained network it started from.

    ``finetuned``: a run folder of ``linft finetune`` or a ``selected.pt``.
    ``pretrained``: the weights of θ_p (torchvision enum name, file or
    ``none``); default: the weights the run started from (its metadata).
    ``backbone`` overrides the metadata's. With ``dataset`` (a
    :class:`~linft.data.MultiDomainDataset`) its classes and domains are
    checked against the run's. Every mismatch is a one-line :class:`LinftError`.
    """
    from linft.averaging import check_compatible
    from linft.backbones import load_backbone, phi_block_names, state_dict_sha256

    state, meta = load_selected(finetuned)
    path = Path(finetuned)
    checkpoint = path / SELECTED_FILE if path.is_dir() else path
    if backbone:
        meta["backbone"] = backbone
    missing = [k for k in _NEEDED_METADATA if meta.get(k) is None]
    if missing:
        raise LinftError(f"{checkpoint} has no {', '.join(missing)} in its metadata; pass a run folder of "
                         "`linft finetune` or its selected.pt")
    wk, _ = _head_keys(state)
    num_classes = int(state[wk].shape[0])
    if meta.get("num_classes") is not None and int(meta["num_classes"]) != num_classes:
        raise LinftError(f"{checkpoint} says {meta['num_classes']} classes but its head has {num_classes}; "
                         "the checkpoint is damaged, use another")
    if dataset is not None:
        classes = list(dataset.classes)
        run_classes = meta.get("class_names")
        if (run_classes is not None and list(run_classes) != classes) or num_classes != len(classes):
            shown = list(run_classes) if run_classes is not None else f"{num_classes} classes"
            raise LinftError(f"the fine-tuned model was trained on classes {shown} but {dataset.root} has {classes}; "
                             "interpolate on the dataset the run was fine-tuned on")
        run_domains = meta.get("domain_names")
        if run_domains is not None and list(run_domains) != list(dataset.domains):
            raise LinftError(f"the fine-tuned run's domains are {list(run_domains)} but {dataset.root} has "
                             f"{list(dataset.domains)}; interpolate on the dataset the run was fine-tuned on")
        if meta["test_domain"] not in dataset.domains:
            raise LinftError(f"the run's held-out domain '{meta['test_domain']}' is not in {dataset.root} "
                             f"({', '.join(dataset.domains)}); interpolate on the dataset the run was fine-tuned on")
        source = str(meta.get("source") or "")
        if source and source.split(":")[0] != dataset.file_list_sha256[:16]:
            warnings.warn(f"{dataset.root} does not hold the same files as the dataset the run was fine-tuned on; "
                          "its accuracies may not be comparable with the run's records")

    weights = pretrained if pretrained is not None else meta.get("weights")
    if weights is None:
        raise LinftError(f"{checkpoint} does not say which pretrained weights the run started from; "
                         "pass --pretrained WEIGHTS")
    if str(weights).lower() == "none" and pretrained is None:
        warnings.warn("the run started from random weights ('none'): the pretrained end is a random network")
    bb = load_backbone(meta["backbone"], weights)
    dropout = float((meta.get("hparams") or {}).get("dropout") or 0.0)
    net = build_classifier(bb.model, num_classes, dropout if 0.0 <= dropout < 1.0 else 0.0)
    net.eval()
    blocks = phi_block_names(net)
    pre_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:
        check_compatible([pre_state, state])
    except LinftError as exc:
        what = str(exc).split(";")[0]
        raise LinftError(f"the fine-tuned checkpoint does not fit the pretrained {meta['backbone']} ({what}); "
                         "interpolate checkpoints of the same architecture and class set") from None
    fid = str(meta.get("run_id") or state_dict_sha256(state)[:16])
    return Endpoints(network=net, pretrained_state=pre_state, finetuned_state=dict(state), metadata=meta,
                     backbone=meta["backbone"], pretrained_weights=bb.weights, pretrained_sha256=bb.weights_sha256,
                     block_names=blocks, finetuned_id=fid, checkpoint=checkpoint)


# --------------------------------------------------------------------------- passes over the images


@torch.no_grad()
def pooled_features_and_logits(model: nn.Module, block_names: Sequence[str], images, device="cpu",
                               channels_last: bool = False, amp: bool = False,
                               update: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` (eval mode) over uint8 batches ``images``.

    Returns ``(Φ, logits)``: Φ (N, K, D) the average-pooled outputs of the
    blocks ``block_names`` (:class:`linft.backbones.PooledBlockFeatures`) and
    the model's own logits (N, C), both float32 on the CPU.
    """
    from linft.backbones import PooledBlockFeatures

    dev = torch.device(device)
    was_training = model.training
    model.eval()
    logits: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda m, i, o: logits.append(o.float().cpu()))
    extractor = PooledBlockFeatures(model, list(block_names))
    phis = []
    try:
        for batch in images:
            with autocast_for(dev, amp):
                phis.append(extractor(model_input(batch, dev, channels_last)).cpu())
            if update:
                update(len(batch))
    finally:
        extractor.remove()
        handle.remove()
        model.train(was_training)
    if not phis:
        raise LinftError("no evaluation images; the dataset is empty")
    return torch.cat(phis), torch.cat(logits)


@torch.no_grad()
def iter_weight_path(model: nn.Module, start_state: Mapping[str, torch.Tensor], end_state: Mapping[str, torch.Tensor],
                     alphas: Sequence[float], images, device="cpu", channels_last: bool = False, amp: bool = False,
                     update: Callable[[int], None] | None = None) -> Iterator[tuple[float, torch.Tensor]]:
    """``(α, logits (N, C))`` of the weight-interpolated model θ(α) = (1-α)·start + α·end, one α at a time.

    Every state_dict entry is interpolated by
    :func:`linft.averaging.interpolate_state_dicts` (α = 0 and 1 load the end
    state_dicts exactly) and loaded strictly into ``model``; one forward pass
    (eval mode) over ``images`` per α. ``model``'s own weights are
    overwritten.
    """
    from linft.averaging import interpolate_state_dicts

    dev = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        for a in check_alphas(alphas) if len(alphas) else []:
            model.load_state_dict(interpolate_state_dicts(start_state, end_state, a), strict=True)
            out = []
            for batch in images:
                with autocast_for(dev, amp):
                    out.append(model(model_input(batch, dev, channels_last)).float().cpu())
                if update:
                    update(len(batch))
            yield a, torch.cat(out)
    finally:
        model.train(was_training)


def first_order_outputs(model: nn.Module, theta0_state: Mapping[str, torch.Tensor],
                        thetaf_state: Mapping[str, torch.Tensor], images, device="cpu", channels_last: bool = False,
                        update: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f(θ0), J(θ0)(θf − θ0))`` over every image, (N, C) each, float32 on the CPU.

    One :func:`linft.linearize.first_order_terms` jvp per batch of images
    (eval mode, BatchNorm statistics of θ0); the first-order weight path is
    then ``f(θ0) + α·J(θf − θ0)`` for every α at no further cost.
    """
    from linft.linearize import first_order_terms

    dev = torch.device(device)
    s0 = {k: v.to(dev) for k, v in theta0_state.items()}
    sf = {k: v.to(dev) for k, v in thetaf_state.items()}
    f0s, jvps = [], []
    for batch in images:
        with warnings.catch_warnings():  # torch's first jvp scripts its decompositions and warns about torch.jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            f0, jv = first_order_terms(model, s0, sf, model_input(batch, dev, channels_last))
        f0s.append(f0.float().cpu())
        jvps.append(jv.float().cpu())
        if update:
            update(len(batch))
    return torch.cat(f0s), torch.cat(jvps)


# --------------------------------------------------------------------------- the whole sweep


@dataclass
class InterpolationResult:
    """What :func:`interpolate` measured and where it wrote it.

    ``curves[path] = [{"alpha", "iid", "ood", "splits"}, ...]`` for the paths
    ``weights``, ``representation``, ``linearized`` (with ``linearity``) and
    ``block:<name>`` (per φ block); ``labels[path]`` is the records' label.
    ``linearity`` (with ``linearity=True``): ``gap`` and, for ``f(θf)``,
    ``f_lin(θf)``, ``f(θ0)``, their ``iid``, ``ood`` and ``splits``.
    """

    alphas: list[float]
    curves: dict[str, list[dict]]
    labels: dict[str, str]
    test_domain: str
    seed: int
    finetuned: str
    finetuned_id: str
    pretrained_weights: str
    dataset: str
    out: Path
    records: Path
    plot: Path | None = None
    summary: Path | None = None
    linearity: dict | None = None
    records_written: int = 0
    passes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"alphas": self.alphas, "dataset": self.dataset, "test_domain": self.test_domain, "seed": self.seed,
                "finetuned": self.finetuned, "finetuned_id": self.finetuned_id,
                "pretrained_weights": self.pretrained_weights, "labels": self.labels, "curves": self.curves,
                "linearity": self.linearity, "passes": self.passes, "out": str(self.out),
                "records": str(self.records), "plot": str(self.plot) if self.plot else None,
                "summary": str(self.summary) if self.summary else None, "records_written": self.records_written}


def _accuracies(splits: dict, test_domain: str, train_domains: list[str]) -> tuple[float, float]:
    from linft.protocol import iid_accuracy, ood_accuracy

    rec = {"splits": splits, "test_domain": test_domain, "train_domains": train_domains}
    return iid_accuracy(rec), ood_accuracy(rec)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def interpolate(dataset, finetuned: str | os.PathLike, *, data_root=None, pretrained: str | None = None,
                backbone: str | None = None, alphas: str | Sequence[float] = DEFAULT_ALPHAS, linearity: bool = False,
                blocks: bool = True, out_dir: str | os.PathLike | None = None, device="auto", batch_size: int = 256,
                workers: int | None = None, amp: bool = False, probe_l2: float = PROBE_L2, plot: bool = True,
                progress: bool = True, say: Callable[[str], None] | None = None) -> InterpolationResult:
    """Weight vs representation interpolation (and, with ``linearity``, the first-order path) of one run.

    ``dataset``: folder or DomainBed name (with ``data_root``) or a
    :class:`~linft.data.MultiDomainDataset`; ``finetuned``: a run folder or
    ``selected.pt``; ``pretrained``: θ_p's weights (default: the run's);
    ``alphas``: ``"0:1:11"``, ``"0,0.5,1"`` or a sequence. Writes records to
    ``out_dir/records.jsonl`` (default ``runs/interpolate/<dataset>``; only
    those not already there), the Figure-1 plot
    ``interpolation_<test domain>_seed<seed>_<run id>.png`` and the
    same name ``.json`` (the result). Cost: 2 forward passes over the
    evaluation images (Φ_p, Φ_f: representation and block paths), one per α
    (weights), and with ``linearity`` one jvp pass.
    """
    from linft.data import MultiDomainDataset, find_dataset
    from linft.features import resolve_device
    from linft.linearize import relative_linearity_gap
    from linft.progress import progress_bar
    from linft.protocol import domain_split_rows
    from linft.records import RECORDS_FILE, RecordWriter, read_records, run_id

    say = say or (lambda _line: None)
    alpha_list = parse_alphas(alphas)
    if batch_size < 1:
        raise LinftError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise LinftError(f"--workers must be >= 0, got {workers}")
    if not (math.isfinite(probe_l2) and probe_l2 >= 0):
        raise LinftError(f"the probe head's L2 strength must be finite and >= 0, got {probe_l2}")
    ds = dataset if isinstance(dataset, MultiDomainDataset) else find_dataset(dataset, data_root)
    ends = load_endpoints(finetuned, ds, pretrained=pretrained, backbone=backbone)
    from linft.backbones import state_dict_sha256
    finetuned_sha256 = state_dict_sha256(ends.finetuned_state)  # a run still training changes its selected.pt
    meta = ends.metadata
    dev = resolve_device(device)
    channels_last = dev.type == "cuda"
    names = list(ds.domains)
    test_domain, seed = str(meta["test_domain"]), int(meta["seed"])
    e = names.index(test_domain)
    train_idx = [d for d in range(len(names)) if d != e]
    train_domains = [names[d] for d in train_idx]
    split_rows = domain_split_rows(ds.domain_ids, len(names), seed)
    fit_rows = np.sort(np.concatenate([split_rows[(d, "in")] for d in train_idx]))
    if len(fit_rows) == 0:
        raise LinftError(f"the training domains' 'in' splits of {ds.root} are empty; the probe head needs images")
    dataset_name = str(meta.get("dataset") or ds.name or ds.root.name)
    out = Path(out_dir) if out_dir else Path("runs") / "interpolate" / _safe_name(dataset_name)
    image_size = int(meta.get("image_size") or 224)
    n_images, num_classes = len(ds), int(ends.finetuned_state[_head_keys(ends.finetuned_state)[0]].shape[0])

    def counts(pred: torch.Tensor) -> dict:
        return split_counts(pred, ds.labels, split_rows, names)

    say(f"fine-tuned: {ends.checkpoint} ({meta.get('label', '?')}, held out {test_domain}, seed {seed}); "
        f"pretrained: {meta['backbone']} / {ends.pretrained_weights}; α = {', '.join(f'{a:g}' for a in alpha_list)}")
    images = EvalImages(ds, image_size, batch_size, workers, progress)
    net = ends.network.to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    passes = {"forward": 0, "jvp": 0}

    # 1. Φ_p (and the probe head ω_p on the last block), 2. Φ_f and f(θ_f): the representation path's two passes.
    net.load_state_dict(ends.pretrained_state, strict=True)
    with progress_bar(n_images, "pretrained model: φ blocks", unit="img", enabled=progress) as update:
        phi_p, _ = pooled_features_and_logits(net, ends.block_names, images, dev, channels_last, amp, update)
    passes["forward"] += 1
    head_keys = _head_keys(ends.finetuned_state)
    head_in = ends.finetuned_state[head_keys[0]].shape[1]
    if phi_p.shape[-1] != head_in:
        raise LinftError(f"the last φ block {ends.block_names[-1]} gives {phi_p.shape[-1]} features but the "
                         f"classifier reads {head_in}; pass a torchvision-style ResNet")
    fit_labels = ds.labels[fit_rows]
    say(f"fitting the pretrained model's probe head on {len(fit_rows)} training images (L-BFGS, L2 {probe_l2:g})")
    head_p = fit_probe_head(phi_p[fit_rows, -1].to(dev), fit_labels, num_classes, probe_l2).to("cpu")
    pre_state = with_head(ends.pretrained_state, head_p)
    net.load_state_dict(ends.finetuned_state, strict=True)
    with progress_bar(n_images, "fine-tuned model: φ blocks", unit="img", enabled=progress) as update:
        phi_f, logits_f = pooled_features_and_logits(net, ends.block_names, images, dev, channels_last, amp, update)
    passes["forward"] += 1
    head_f = LinearHead(*(ends.finetuned_state[k].detach().float().cpu() for k in head_keys))

    preds: dict[str, torch.Tensor] = {}
    preds["representation"] = representation_path_predictions(alpha_list, phi_p[:, -1].contiguous(),
                                                              phi_f[:, -1].contiguous(), head_p, head_f, dev,
                                                              batch_size)
    block_paths = []
    if blocks:
        for k, name in enumerate(ends.block_names):
            last = k == len(ends.block_names) - 1
            hp = head_p if last else fit_probe_head(phi_p[fit_rows, k].to(dev), fit_labels, num_classes,
                                                    probe_l2).to("cpu")
            hf = fit_probe_head(phi_f[fit_rows, k].to(dev), fit_labels, num_classes, probe_l2).to("cpu")
            key = f"block:{name}"
            preds[key] = representation_path_predictions(alpha_list, phi_p[:, k].contiguous(),
                                                         phi_f[:, k].contiguous(), hp, hf, dev, batch_size)
            block_paths.append(key)
    del phi_p, phi_f

    # 3. the weight path: one forward pass per α.
    weight_preds = torch.empty(len(alpha_list), n_images, dtype=torch.long)
    with progress_bar(len(alpha_list) * n_images, "weight path", unit="img", enabled=progress) as update:
        for i, (a, logits) in enumerate(iter_weight_path(net, pre_state, ends.finetuned_state, alpha_list, images, dev,
                                                         channels_last, amp, update)):
            weight_preds[i] = logits.argmax(1)
            passes["forward"] += 1
    preds["weights"] = weight_preds

    # 4. the first-order path: one jvp pass for every α, and the run's post-hoc linearity.
    lin_summary = None
    if linearity:
        with progress_bar(n_images, "first-order model (jvp)", unit="img", enabled=progress) as update:
            f0, jv = first_order_outputs(net, pre_state, ends.finetuned_state, images, dev, channels_last, update)
        passes["jvp"] += 1
        a = torch.tensor(alpha_list, dtype=f0.dtype).view(-1, 1, 1)
        preds["linearized"] = (f0.unsqueeze(0) + a * jv.unsqueeze(0)).argmax(2)
        f_lin = f0 + jv
        lin_summary = {"gap": relative_linearity_gap(logits_f, f_lin, f0)}
        for what, logits in (("f(θf)", logits_f), ("f_lin(θf)", f_lin), ("f(θ0)", f0)):
            splits = counts(logits.argmax(1))
            iid, ood = _accuracies(splits, test_domain, train_domains)
            lin_summary[what] = {"iid": iid, "ood": ood, "splits": splits}

    # 5. accuracies, records (each once), plot.
    ft_label = meta.get("label")
    labels, methods = {}, {}
    for key in ["weights", "representation"] + (["linearized"] if linearity else []) + block_paths:
        kind = "block" if key.startswith("block:") else key
        method, prefix = PATHS[kind]
        text = f"{prefix} at {key[6:]} (probe heads)" if kind == "block" else prefix
        if pretrained is not None and ends.pretrained_weights != meta.get("weights"):
            text += f" from {Path(ends.pretrained_weights).name}"  # not the weights the run started from
        labels[key] = f"{text} [{ft_label}]" if ft_label else text
        methods[key] = method
    curves: dict[str, list[dict]] = {}
    records = []
    pre_id = ends.pretrained_sha256[:16]
    base = {"dataset": dataset_name, "source": meta.get("source") or f"{ds.file_list_sha256[:16]}:{pre_id}",
            "backbone": ends.backbone, "weights": ends.pretrained_weights, "test_domain": test_domain,
            "train_domains": train_domains, "seed": seed, "step": 0, "loss": None, "status": "ok", "final": True}
    for key in labels:
        curves[key] = []
        for i, a in enumerate(alpha_list):
            splits = counts(preds[key][i])
            iid, ood = _accuracies(splits, test_domain, train_domains)
            curves[key].append({"alpha": a, "iid": iid, "ood": ood, "splits": splits})
            block = key[6:] if key.startswith("block:") else None
            identity = {"method": methods[key], "finetuned": ends.finetuned_id, "finetuned_sha256": finetuned_sha256,
                        "pretrained": ends.pretrained_sha256,
                        "dataset": ds.file_list_sha256, "image_size": image_size, "probe_l2": probe_l2,
                        "probe_max_iter": PROBE_MAX_ITER, "probe_tolerance": PROBE_TOLERANCE,
                        "alpha": a, "block": block}
            rid = run_id(**identity)
            hparams = {"alpha": a, "path": key, "pretrained_weights": ends.pretrained_weights,
                       "probe_l2": probe_l2, "finetuned_run": ends.finetuned_id, "finetuned_label": ft_label,
                       "finetuned_step": meta.get("step"), "image_size": image_size, "block": block}
            record = {**base, "method": methods[key], "label": labels[key], "hparams": hparams,
                      "grid": {"alpha": a}, "run_id": rid, "attempt": rid, "splits": splits}
            if key == "linearized" and lin_summary is not None:
                record["linearity_gap"] = lin_summary["gap"]
            records.append(record)

    records_path = out / RECORDS_FILE
    existing = {r["run_id"] for r in read_records([records_path])} if records_path.exists() else set()
    written = 0
    with RecordWriter(records_path) as writer:
        for record in records:
            if record["run_id"] not in existing:
                writer.write(record)
                existing.add(record["run_id"])
                written += 1
    stem = f"interpolation_{_safe_name(test_domain)}_seed{seed}_{_safe_name(ends.finetuned_id)[:16]}"
    result = InterpolationResult(alphas=alpha_list, curves=curves, labels=labels, test_domain=test_domain, seed=seed,
                                 finetuned=str(ends.checkpoint), finetuned_id=ends.finetuned_id,
                                 pretrained_weights=ends.pretrained_weights, dataset=dataset_name, out=out,
                                 records=records_path, linearity=lin_summary, records_written=written, passes=passes)
    try:
        if plot:
            from linft.report import plot_interpolation, run_results

            title = f"{dataset_name}, held out {test_domain}, seed {seed}: {ft_label or ends.finetuned_id}"
            result.plot = plot_interpolation(run_results(records), out / f"{stem}.png", title=title)
        result.summary = out / f"{stem}.json"
        result.summary.write_text(json.dumps(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise LinftError(f"cannot write to {out} ({exc.strerror or exc}); choose another --out") from None
    say(f"{written} new records -> {records_path} ({len(records) - written} already there)")
    return result

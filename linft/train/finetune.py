"""Full fine-tuning with a (very large) dropout on the penultimate representation, and its baselines.

One *run* fine-tunes a backbone leave-one-domain-out with the protocol of
DESIGN.md: the classifier is ``Dropout(λ) → Linear(D, C)`` on the pooled
penultimate representation (:func:`build_classifier`); BatchNorm is frozen
(running statistics fixed, affine parameters trained); SGD with momentum 0.9
and weight decay on every parameter; 32 images per training domain per step,
drawn with replacement from the training domains' "in" splits and augmented
with DomainBed's training transform; lr ÷10 at half; evaluation of every
split with the deterministic transform every ``eval_every`` steps and at the
last step. The variants are fields of :class:`FineTuneRun` and of the
records: dropout rate, last-layer learning-rate multiplier (the paper's 10x),
residual-block dropout (:func:`add_stochastic_depth`), training from scratch
(``weights="none"``) and the first-order model (``linearized``).

Determinism and resumption: every random draw of step ``t`` (the batch rows,
their augmentation, the dropout and stochastic-depth masks) comes from seeds
derived from ``(seed, held-out domain, t)``, and the head's initialisation
from ``(seed, held-out domain)``: runs of one seed share batches and masks
whatever their lr and weight decay, as in the official code, and a run
resumed from its last checkpoint continues exactly as if it had never
stopped (bit for bit on the CPU). The checkpoint (a state_dict with
metadata, loaded with ``weights_only=True``) is written after each
evaluation, and a record whose step is already on disk is never written
twice.

Files of one run, in ``OUT/<run_id>/``: ``run.json`` (what the run is),
``records.jsonl``, ``checkpoint.pt`` (resume), ``selected.pt`` (the model at
the best-i.i.d. step: what ensembles, soups and interpolation use) and
``done`` (the marker that makes a re-launch skip it).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from linft.backbones import load_backbone
from linft.data import MultiDomainDataset, find_dataset, seed_hash
from linft.errors import LinftError
from linft.features import augmented_views_uint8, load_image_uint8, normalize_uint8, resolve_device
from linft.linear import eval_steps, lr_at
from linft.progress import progress_bar
from linft.protocol import domain_split_rows, iid_accuracy
from linft.records import RECORDS_FILE, RecordWriter, read_records, run_id


CHECKPOINT_FILE = "checkpoint.pt"
SELECTED_FILE = "selected.pt"
DONE_FILE = "done"
RUN_FILE = "run.json"


# --------------------------------------------------------------------------- what a run is


@dataclass(frozen=True)
class FineTuneConfig:
    """Protocol settings shared by the runs of a sweep (the defaults are the paper's)."""

    steps: int = 10_000
    batch_size: int = 32  # per training domain
    eval_every: int = 300
    momentum: float = 0.9
    lr_milestones: tuple[float, ...] = (0.5,)  # fractions of ``steps``
    image_size: int = 224
    freeze_bn: bool = True
    augment: bool = True
    eval_batch_size: int = 256
    workers: int | None = None
    amp: bool = True  # bfloat16 autocast on CUDA (float32 on the CPU)
    channels_last: bool = True
    trajectory: bool = False  # trajectory ensemble and weight average records (from step ``eval_every`` on)
    average_every_step: bool = False  # trajectory weight average over every step (official code) instead of evals
    ensemble_rule: str = "probs"

    def milestone_steps(self) -> tuple[int, ...]:
        return tuple(int(round(m * self.steps)) for m in self.lr_milestones)

    def protocol(self) -> dict:
        """The settings that change a run's result (what its id is made of)."""
        keep = ("steps", "batch_size", "eval_every", "momentum", "lr_milestones", "image_size", "freeze_bn", "augment")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True)
class FineTuneRun:
    """One run: held-out domain, seed, and the hyper-parameters and variant that define it."""

    test_domain: str
    seed: int
    lr: float
    weight_decay: float
    dropout: float = 0.0
    last_layer_lr_mult: float = 1.0
    stochastic_depth: float = 0.0
    linearized: bool = False


def finetune_label(run: FineTuneRun, weights: str, config: FineTuneConfig | None = None) -> str:
    """The unit a report compares: the method and its variant (the grid lr × weight decay varies inside it).

    ``weights`` are the resolved weights (:attr:`linft.backbones.Backbone.weights`): ``"none"`` is from scratch.
    """
    base = "linearized FT" if run.linearized else ("from scratch" if str(weights).lower() == "none" else "full FT")
    parts = [base]
    if run.last_layer_lr_mult != 1.0:
        parts.append(f"{run.last_layer_lr_mult:g}x head lr")
    if run.stochastic_depth:
        parts.append(f"stochastic depth {run.stochastic_depth:g}")
    if config is not None and not config.freeze_bn:
        parts.append("BN trained")
    if config is not None and not config.augment:
        parts.append("no augmentation")
    parts.append(f"dropout {run.dropout:g}")
    return ", ".join(parts)


def finetune_method(run: FineTuneRun, weights: str) -> str:
    if run.linearized:
        return "linearized-finetune"
    return "scratch" if str(weights).lower() == "none" else "finetune"


# --------------------------------------------------------------------------- the model


def set_train_mode(model: nn.Module, training: bool, freeze_bn: bool = True) -> None:
    """``model.train(training)``, then every BatchNorm back to eval mode when ``freeze_bn``.

    A frozen BatchNorm normalises with its running statistics and never updates
    them; its affine weight and bias are still trained.
    """
    model.train(training)
    if training and freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# --------------------------------------------------------------------------- images


class _TrainImages(torch.utils.data.Dataset):
    """``(row, aug_seed)`` -> (uint8 image, label): DomainBed's training augmentation seeded per item, or plain."""

    def __init__(self, ds: MultiDomainDataset, image_size: int, augment: bool):
        self.root, self.paths, self.size, self.augment = ds.root, ds.paths, image_size, augment
        self.labels = ds.labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        row, aug_seed = item
        path = self.root / self.paths[row]
        try:
            image = augmented_views_uint8(path, self.size, 1, aug_seed)[0] if self.augment \
                else load_image_uint8(path, self.size)
            return image, int(self.labels[row]), ""
        except Exception as exc:  # any decoder failure; reported by path in the main process (a worker can't)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1, f"{path} ({type(exc).__name__})"


class _StepSampler(torch.utils.data.Sampler):
    """Yields, for each step from ``start`` on, the batch ``[(row, aug_seed), ...]`` of that step."""

    def __init__(self, pools: list[np.ndarray], batch_size: int, seed: int, test_domain: int, start: int, stop: int):
        self.pools, self.batch_size, self.seed, self.test_domain = pools, batch_size, seed, test_domain
        self.start, self.stop = start, stop

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield step_batch(self.pools, self.batch_size, self.seed, self.test_domain, step)


def step_batch(pools: list[np.ndarray], batch_size: int, seed: int, test_domain: int, step: int) -> list[tuple[int, int]]:
    """The rows of step ``step`` (``batch_size`` per training domain, with replacement) and their augmentation seeds."""
    g = torch.Generator().manual_seed(seed_hash("linft-finetune", "batch", seed, test_domain, step))
    rows = np.concatenate([pool[torch.randint(len(pool), (batch_size,), generator=g).numpy()] for pool in pools])
    return [(int(r), seed_hash("linft-finetune", "augment", seed, test_domain, step, j)) for j, r in enumerate(rows)]


def _collate(items):
    return (torch.stack([im for im, _, _ in items]), torch.tensor([y for _, y, _ in items], dtype=torch.long),
            next((err for _, _, err in items if err), ""))


def _worker_count(workers: int | None) -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if workers is None else workers


def train_batches(ds: MultiDomainDataset, pools, config: FineTuneConfig, seed: int, test_domain: int,
                  start: int) -> Iterator[torch.Tensor]:
    """``(uint8 images, labels)`` of steps ``start .. config.steps - 1``, decoded (and augmented) in DataLoader workers."""
    workers = _worker_count(config.workers)
    sampler = _StepSampler(pools, config.batch_size, seed, test_domain, start, config.steps)
    loader = torch.utils.data.DataLoader(_TrainImages(ds, config.image_size, config.augment), batch_sampler=sampler,
                                         num_workers=workers, collate_fn=_collate, pin_memory=torch.cuda.is_available(),
                                         prefetch_factor=4 if workers else None)
    return iter(loader)


class EvalImages:
    """Every image of a dataset with the deterministic transform, as uint8 batches in dataset order.

    Decoded once and kept in memory when the whole set fits in
    :data:`linft.pretrain.PRELOAD_LIMIT_BYTES`; otherwise decoded again at each pass.
    """

    def __init__(self, ds: MultiDomainDataset, image_size: int, batch_size: int = 256, workers: int | None = None,
                 progress: bool = False):
        self.ds, self.size, self.batch_size, self.workers = ds, image_size, batch_size, _worker_count(workers)
        self.progress = progress
        from linft.pretrain import PRELOAD_LIMIT_BYTES
        self.preload = len(ds) * 3 * image_size * image_size <= PRELOAD_LIMIT_BYTES
        self._images = None

    @property
    def images(self) -> torch.Tensor | None:
        """All images, uint8 (N, 3, S, S), decoded at first use (None when too large to keep)."""
        if self.preload and self._images is None:
            images = torch.empty(len(self.ds), 3, self.size, self.size, dtype=torch.uint8)
            with progress_bar(len(self.ds), "decoding evaluation images", unit="img", enabled=self.progress) as update:
                start = 0
                for batch in self._decode():
                    images[start:start + len(batch)] = batch
                    start += len(batch)
                    update(len(batch))
            self._images = images
        return self._images

    def _decode(self):
        from linft.pretrain import decoded_batches
        return decoded_batches(self.ds, range(len(self.ds)), self.size, self.batch_size, self.workers, 0)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.images is None:
            yield from self._decode()
        else:
            for a in range(0, len(self.images), self.batch_size):
                yield self.images[a:a + self.batch_size]


def autocast_for(dev: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp``; nothing otherwise (float32 on the CPU)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if (amp and dev.type == "cuda") else nullcontext()


def model_input(batch: torch.Tensor, dev: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 images -> the normalised float batch on ``dev`` (channels_last when asked)."""
    x = normalize_uint8(batch.to(dev, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def predict_logits(model: nn.Module, images, dev: torch.device, amp: bool = True, channels_last: bool = True) -> torch.Tensor:
    """Logits (N, C), float32 on the CPU, of ``model`` in eval mode over uint8 batches ``images``."""
    was_training = model.training
    model.eval()
    out = []
    for batch in images:
        with autocast_for(dev, amp):
            out.append(model(model_input(batch, dev, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out)


def split_counts(predictions: torch.Tensor, labels: np.ndarray, split_rows: dict, domain_names: list[str]) -> dict:
    """``{"<domain>_in"|"<domain>_out": [correct, total]}`` of predicted classes (N,) against ``labels``."""
    right = (predictions.numpy() == labels)
    return {f"{domain_names[d]}_{part}": [int(right[rows].sum()), int(len(rows))]
            for (d, part), rows in sorted(split_rows.items())}


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    """What :func:`train_run` did for one run."""

    run_dir: Path
    run_id: str
    status: str  # trained, resumed, done (already finished), diverged
    steps_trained: int = 0
    run: FineTuneRun | None = None


def _save_atomic(obj, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(obj, partial)
        os.replace(partial, path)
    except OSError as exc:
        raise LinftError(f"cannot write {path} ({exc.strerror or exc}); free space or choose another --out") from None


def _load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises several unrelated types for a bad file
        raise LinftError(f"cannot read checkpoint {path} ({exc.__class__.__name__}); delete it to restart that run") from None


def run_identity(run: FineTuneRun, backbone: str, weights_sha256: str, dataset_sha256: str, config: FineTuneConfig) -> dict:
    """Everything that defines a run's result (its id is the hash of this)."""
    return {"method": "finetune", "backbone": backbone, "weights_sha256": weights_sha256,
            "dataset": dataset_sha256, "run": asdict(run), "protocol": config.protocol()}


def run_folder(out_dir, run: FineTuneRun, backbone: str, weights_sha256: str, dataset_sha256: str,
               config: FineTuneConfig) -> Path:
    """``out_dir/<run_id>``: where a run keeps its records, checkpoints and ``done`` marker."""
    return Path(out_dir) / run_id(**run_identity(run, backbone, weights_sha256, dataset_sha256, config))


def load_selected(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of a ``selected.pt`` (or any checkpoint written by :func:`train_run`)."""
    path = Path(path)
    if path.is_dir():
        path = path / SELECTED_FILE
    if not path.is_file():
        raise LinftError(f"{path} does not exist; pass a run folder of `linft finetune` or its selected.pt")
    obj = _load_checkpoint(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise LinftError(f"{path} is not a linft fine-tuning checkpoint (no state_dict); pass a run's selected.pt")
    return obj["state_dict"], dict(obj.get("metadata") or {})


def build_run_model(backbone: str, weights, num_classes: int, run: FineTuneRun, dev: torch.device,
                    channels_last: bool = True):
    """The network of a run, on ``dev``: backbone with its weights, the dropout head, stochastic depth, linearization.

    Returns ``(model, backbone_info)``; for a linearized run the model is a
    :class:`linft.linearize.LinearizedModel` around the initial network.
    """
    bb = load_backbone(backbone, weights)
    model = build_classifier(bb.model, num_classes, run.dropout, seed=seed_hash("linft-finetune", "init", run.seed,
                                                                                  run.test_domain))
    if run.stochastic_depth:
        if run.linearized:
            raise LinftError("--linearized and --stochastic-depth do not combine; run them separately")
        add_stochastic_depth(model, run.stochastic_depth)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.linearized:
        from linft.linearize import LinearizedModel
        model = LinearizedModel(model)
    return model, bb


def run_optimizer(model: nn.Module, run: FineTuneRun, momentum: float = 0.9) -> torch.optim.SGD:
    """SGD over every parameter: the head's (``fc``) learning rate times ``run.last_layer_lr_mult``.

    Each group keeps its ``base_lr`` (what :func:`train_step` divides at the milestones).
    """
    params = list(model.parameters())
    head = {id(p) for p in head_parameters(model)}
    groups = [{"params": [p for p in params if id(p) not in head], "lr": run.lr, "base_lr": run.lr},
              {"params": [p for p in params if id(p) in head], "lr": run.lr * run.last_layer_lr_mult,
               "base_lr": run.lr * run.last_layer_lr_mult}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=run.lr, momentum=momentum, weight_decay=run.weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               step: int, milestones: tuple[int, ...], seed: int, test_domain: int, dev: torch.device,
               config: FineTuneConfig) -> torch.Tensor:
    """One SGD step of :func:`train_run` on a uint8 batch; returns the (detached, unsynchronised) loss.

    Sets the learning rates of ``step``, seeds the dropout and stochastic-depth
    masks from ``(seed, test_domain, step)``, runs the forward pass under
    autocast (bfloat16 on CUDA when ``config.amp``) and channels_last when
    ``config.channels_last``. The model must already be in training mode
    (:func:`set_train_mode`).
    """
    x, y = model_input(images, dev, config.channels_last), labels.to(dev, non_blocking=True)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, g["base_lr"], milestones)
    torch.manual_seed(seed_hash("linft-finetune", "masks", seed, test_domain, step))
    with autocast_for(dev, config.amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _ordinary_state(model: nn.Module) -> dict:
    """The ordinary network's state_dict of a model (θ0 + δ for a linearized one)."""
    merged = getattr(model, "merged_state_dict", None)
    return {k: v.detach().to("cpu", copy=True) for k, v in (merged() if merged else model.state_dict()).items()}


def train_run(
    dataset: MultiDomainDataset,
    out_dir: str | os.PathLike,
    run: FineTuneRun,
    *,
    backbone: str = "resnet50",
    weights="DEFAULT",
    config: FineTuneConfig = FineTuneConfig(),
    device="auto",
    eval_images: EvalImages | None = None,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Fine-tune one run (or resume it, or skip it when done); records go to ``out_dir/<run_id>/records.jsonl``."""
    say = say or (lambda _line: None)
    names = dataset.domains
    if run.test_domain not in names:
        raise LinftError(f"held-out domain '{run.test_domain}' is not in the dataset; choose from {', '.join(names)}")
    dev = resolve_device(device)
    e = names.index(run.test_domain)
    model, bb = build_run_model(backbone, weights, len(dataset.classes), run, dev, config.channels_last)
    identity = run_identity(run, backbone, bb.weights_sha256, dataset.file_list_sha256, config)
    rid = run_id(**identity)
    run_dir = run_folder(out_dir, run, backbone, bb.weights_sha256, dataset.file_list_sha256, config)
    if (run_dir / DONE_FILE).exists():
        diverged_before = (run_dir / DONE_FILE).read_text().strip() == "diverged"
        return RunResult(run_dir, rid, "diverged" if diverged_before else "done", run=run)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_FILE).write_text(json.dumps({"run_id": rid, **identity}, indent=1) + "\n")
    except OSError as exc:
        raise LinftError(f"cannot write to {run_dir} ({exc.strerror}); choose another --out") from None

    split_rows = domain_split_rows(dataset.domain_ids, len(names), run.seed)
    train_domains = [d for d in range(len(names)) if d != e]
    pools = [split_rows[(d, "in")] for d in train_domains]
    empty = [names[d] for d in train_domains if len(split_rows[(d, "in")]) == 0 or len(split_rows[(d, "out")]) == 0]
    if empty:
        raise LinftError(f"domain {', '.join(empty)} has an empty 'in' or 'out' split (20% held out); "
                         f"each training domain needs at least 5 images")

    label = finetune_label(run, bb.weights, config)
    method = finetune_method(run, bb.weights)
    hparams = {**asdict(run), **config.protocol(), "backbone": backbone, "weights": bb.weights}
    hparams.pop("test_domain")
    hparams.pop("seed")
    base_record = {
        "method": method, "label": label, "dataset": dataset.name or dataset.root.name,
        "source": f"{dataset.file_list_sha256[:16]}:{bb.weights_sha256[:16]}",
        "backbone": backbone, "weights": bb.weights, "test_domain": run.test_domain,
        "train_domains": [names[d] for d in train_domains], "hparams": hparams,
        "grid": {"lr": run.lr, "weight_decay": run.weight_decay}, "seed": run.seed,
    }
    trajectory = ({"ensemble": (f"{label}, trajectory ensemble", f"{method}-trajectory-ensemble"),
                   "average": (f"{label}, trajectory average", f"{method}-trajectory-average")}
                  if config.trajectory else {})
    trajectory_ids = {k: run_id(**identity, derived=k, rule=config.ensemble_rule if k == "ensemble" else None,
                                every_step=config.average_every_step if k == "average" else None)
                      for k in trajectory}

    records_path = run_dir / RECORDS_FILE
    existing = read_records([records_path]) if records_path.exists() else []
    written = {(r["run_id"], r["step"]) for r in existing}
    # the best i.i.d. accuracy of the model in selected.pt (not of the records: a run killed after writing a
    # record but before saving selected.pt must save it again when it redoes that step)
    selected_path = run_dir / SELECTED_FILE
    best_iid = -1.0
    if existing and selected_path.exists():
        selected_meta = load_selected(selected_path)[1]
        if selected_meta.get("run_id") == rid:
            best_iid = float(selected_meta.get("iid", -1.0))
    attempt = existing[0].get("attempt", rid) if existing else rid

    optimizer = run_optimizer(model, run, config.momentum)

    from linft.averaging import RunningAverage, RunningEnsemble
    avg = RunningAverage() if config.trajectory else None
    ens = RunningEnsemble(rule=config.ensemble_rule) if config.trajectory else None
    start = 0
    ckpt_path = run_dir / CHECKPOINT_FILE
    status = "trained"
    if ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path)
        if not isinstance(ckpt, dict) or not {"run_id", "step", "model", "optimizer"} <= ckpt.keys():
            raise LinftError(f"{ckpt_path} is not a linft fine-tuning checkpoint; delete it to restart this run")
        if ckpt.get("run_id") != rid:
            raise LinftError(f"{ckpt_path} belongs to another run ({ckpt.get('run_id')}); delete it to restart this run")
        if avg is not None and (ckpt.get("average") is None or ckpt.get("ensemble") is None):
            raise LinftError(f"{ckpt_path} was written without --ensembles; resume this run without --ensembles, "
                             f"or delete the checkpoint to restart it with them")
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        start = int(ckpt["step"]) + 1
        if avg is not None:
            avg.load_state_dict(ckpt["average"])
            ens.load_state_dict(ckpt["ensemble"])
        status = "resumed"
        say(f"resuming {label} / {run.test_domain} / seed {run.seed} / lr {run.lr:g} wd {run.weight_decay:g} "
            f"at step {start}")

    eval_images = eval_images or EvalImages(dataset, config.image_size, config.eval_batch_size, config.workers)
    milestones = config.milestone_steps()
    evals = set(eval_steps(config.steps, config.eval_every))
    avg_model = None

    def evaluate(net) -> tuple[torch.Tensor, dict]:
        logits = predict_logits(net, eval_images, dev, config.amp, config.channels_last)
        return logits, split_counts(logits.argmax(1), dataset.labels, split_rows, names)

    def write(writer, record_id, step, splits, loss, status_, final, method_label=None):
        if (record_id, step) in written:
            return
        record = dict(base_record)
        if method_label:
            record["label"], record["method"] = method_label
        record.update(run_id=record_id, attempt=attempt, step=step, splits=splits, loss=loss, status=status_,
                      final=final)
        writer.write(record)
        written.add((record_id, step))

    steps_trained = 0
    diverged = False
    rng_devices = [dev] if dev.type == "cuda" else []
    with RecordWriter(records_path) as writer, torch.random.fork_rng(devices=rng_devices), \
            progress_bar(config.steps, f"{label} | held out {run.test_domain} | seed {run.seed}", unit="step",
                         enabled=progress, initial=start) as update:
        set_train_mode(model, True, config.freeze_bn)
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        # trajectory ensembles and averages start after the first eval_every steps (the step-0 model is the
        # pretrained network with a barely trained head); the official code averages every step after 300
        trajectory_start = min(config.eval_every, config.steps - 1)
        batches = train_batches(dataset, pools, config, run.seed, e, start)
        for step in range(start, config.steps):
            images, y, bad = next(batches)
            if bad:
                raise LinftError(f"cannot read image {bad}; fix or remove it, then re-run")
            loss = train_step(model, optimizer, images, y, step, milestones, run.seed, e, dev, config)
            steps_trained += 1
            update(1)
            nonfinite |= ~torch.isfinite(loss)  # no host sync per step: checked at each evaluation
            if avg is not None and config.average_every_step and step >= trajectory_start:
                avg.update(_ordinary_state(model))
            if step not in evals:
                continue
            if bool(nonfinite):
                diverged = True
                write(writer, rid, step, {}, None, "diverged", True)
                for kind, record_id in trajectory_ids.items():  # their checkpoints come from the same trajectory
                    write(writer, record_id, step, {}, None, "diverged", True, trajectory[kind])
                break
            loss_value = float(loss)
            final = step == config.steps - 1
            out_logits, splits = evaluate(model)
            write(writer, rid, step, splits, loss_value, "ok", final)
            iid = iid_accuracy({"splits": splits, "train_domains": base_record["train_domains"]})
            if iid > best_iid:
                best_iid = iid
                _save_atomic({"state_dict": _ordinary_state(model),
                              "metadata": {**base_record, "run_id": rid, "step": step, "iid": iid,
                                           "num_classes": len(dataset.classes), "class_names": list(dataset.classes),
                                           "domain_names": list(names), "image_size": config.image_size,
                                           "linearized": run.linearized}},
                             run_dir / SELECTED_FILE)
            if avg is not None and step >= trajectory_start:
                ens.add(out_logits)
                write(writer, trajectory_ids["ensemble"], step,
                      split_counts(ens.scores().argmax(1), dataset.labels, split_rows, names), None, "ok", final,
                      trajectory["ensemble"])
                if not config.average_every_step:
                    avg.update(_ordinary_state(model))
                if avg_model is None:
                    avg_model = build_classifier(load_backbone(backbone, weights).model, len(dataset.classes),
                                                 run.dropout).to(dev)
                avg_model.load_state_dict(avg.value(), strict=True)
                _, avg_splits = evaluate(avg_model)
                write(writer, trajectory_ids["average"], step, avg_splits, None, "ok", final, trajectory["average"])
            _save_atomic({"run_id": rid, "step": step, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(),
                          "average": avg.state_dict() if avg is not None else None,
                          "ensemble": ens.state_dict() if ens is not None else None}, ckpt_path)
            set_train_mode(model, True, config.freeze_bn)
    if diverged:
        say(f"{label} / {run.test_domain} / seed {run.seed} / lr {run.lr:g} diverged at step {step}")
    try:  # the marker first: a run killed between the two is done, not restarted from step 0
        (run_dir / DONE_FILE).write_text("diverged\n" if diverged else "ok\n")
        ckpt_path.unlink(missing_ok=True)
    except OSError as exc:
        raise LinftError(f"cannot write to {run_dir} ({exc.strerror}); choose another --out") from None
    return RunResult(run_dir, rid, "diverged" if diverged else status, steps_trained, run)


# --------------------------------------------------------------------------- a sweep


def sweep_runs(domains: list[str], *, test_domains=None, dropouts=(0.0,), lrs=(1e-3, 5e-4),
               weight_decays=(1e-4, 5e-5, 1e-5), seeds: int = 3, last_layer_lr_mult: float = 1.0,
               stochastic_depth: float = 0.0, linearized: bool = False) -> list[FineTuneRun]:
    """Every run of a grid: held-out domain × seed × dropout × lr × weight decay (one variant)."""
    if test_domains:
        unknown = [d for d in test_domains if d not in domains]
        if unknown:
            raise LinftError(f"held-out domain {', '.join(map(repr, unknown))} is not in the dataset; "
                             f"choose from {', '.join(domains)}")
    if seeds < 1 or not lrs or not weight_decays or not dropouts:
        raise LinftError("the grid is empty: give at least one seed, lr, weight decay and dropout rate")
    for p in dropouts:
        if not 0.0 <= float(p) < 1.0:
            raise LinftError(f"dropout rate {p} is outside [0, 1); use e.g. 0.9")
    for name, values in (("--lr", lrs), ("--weight-decay", weight_decays)):
        if any(not (math.isfinite(v) and v >= 0) for v in values) or (name == "--lr" and any(v <= 0 for v in values)):
            raise LinftError(f"{name} values must be finite and positive (weight decay may be 0), got {list(values)}")
    if not (last_layer_lr_mult > 0 and math.isfinite(last_layer_lr_mult)):
        raise LinftError(f"--last-layer-lr-mult must be positive, got {last_layer_lr_mult}")
    if not 0.0 <= stochastic_depth < 1.0:
        raise LinftError(f"--stochastic-depth {stochastic_depth} is outside [0, 1); the paper uses 0.1 to 0.3")
    return [FineTuneRun(d, s, float(lr), float(wd), float(p), float(last_layer_lr_mult), float(stochastic_depth),
                        linearized)
            for d in (test_domains or domains) for s in range(seeds) for p in dropouts
            for lr in lrs for wd in weight_decays]


def check_config(config: FineTuneConfig) -> None:
    """One-line errors for protocol settings that cannot run."""
    if config.steps < 1 or config.eval_every < 1 or config.batch_size < 1:
        raise LinftError("--steps, --batch-size and --eval-every must be at least 1")
    if config.image_size < 16:
        raise LinftError(f"--image-size must be at least 16, got {config.image_size}")
    from linft.averaging import ENSEMBLE_RULES

    if config.ensemble_rule not in ENSEMBLE_RULES:
        raise LinftError(f"unknown ensemble rule '{config.ensemble_rule}'; use {' or '.join(ENSEMBLE_RULES)}")
    if any(not 0.0 < m <= 1.0 for m in config.lr_milestones):
        raise LinftError(f"--lr-milestones are fractions of --steps in (0, 1], got {list(config.lr_milestones)}")
    if config.workers is not None and config.workers < 0:
        raise LinftError(f"--workers must be >= 0, got {config.workers}")


@dataclass
class SweepResult:
    """Where a sweep's runs went and what happened to each."""

    out: Path
    runs: list[RunResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)


def finetune(dataset, out_dir, *, backbone: str = "resnet50", weights="DEFAULT", data_root=None,
             runs: list[FineTuneRun] | None = None, config: FineTuneConfig = FineTuneConfig(), device="auto",
             across_runs: bool = False, progress: bool = True, say: Callable[[str], None] | None = None,
             **grid) -> SweepResult:
    """Fine-tune every run of a grid, one after the other in this process (finished runs are skipped).

    ``grid`` takes the arguments of :func:`sweep_runs` when ``runs`` is not
    given. With ``across_runs`` the ensembles and soups of each (held-out
    domain, seed) are then evaluated (:func:`linft.averaging` via
    :func:`evaluate_across_runs`).
    """
    check_config(config)
    ds = dataset if isinstance(dataset, MultiDomainDataset) else find_dataset(dataset, data_root)
    if len(ds.domains) < 2:
        raise LinftError(f"{ds.root} has {len(ds.domains)} domain; leave-one-domain-out needs at least 2")
    runs = runs if runs is not None else sweep_runs(ds.domains, **grid)
    result = SweepResult(Path(out_dir))
    eval_images = EvalImages(ds, config.image_size, config.eval_batch_size, config.workers, progress)
    for i, run in enumerate(runs):
        if say:
            say(f"run {i + 1}/{len(runs)}: dropout {run.dropout:g}, held out {run.test_domain}, seed {run.seed}, "
                f"lr {run.lr:g}, weight decay {run.weight_decay:g}")
        result.runs.append(train_run(ds, out_dir, run, backbone=backbone, weights=weights, config=config,
                                     device=device, eval_images=eval_images, progress=progress, say=say))
    if across_runs:
        evaluate_across_runs(ds, out_dir, [r.run_dir for r in result.runs if r.status != "diverged"],
                             config=config, device=device, eval_images=eval_images, say=say)
    return result


# --------------------------------------------------------------------------- ensembles and soups across runs


def evaluate_across_runs(dataset: MultiDomainDataset, out_dir, run_dirs, *, config: FineTuneConfig = FineTuneConfig(),
                         device="auto", eval_images: EvalImages | None = None,
                         say: Callable[[str], None] | None = None) -> Path:
    """Ensembles and weight averages of the selected models of every grid run, per (label, held-out domain, seed).

    For each group: the uniform output ensemble (``config.ensemble_rule``),
    the uniform weight average (model soup / DiWA) and the greedy soup
    (models added in order of decreasing i.i.d. accuracy, kept when the
    i.i.d. validation accuracy does not drop). Each is evaluated on every
    split and written as one final record to ``out_dir/across_runs/records.jsonl``;
    groups already there are skipped.
    """
    from linft.averaging import average_state_dicts, ensemble_scores, greedy_soup

    dev = resolve_device(device)
    names = dataset.domains
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / SELECTED_FILE).exists():
            continue
        state, meta = load_selected(run_dir)
        groups.setdefault((meta["label"], meta["test_domain"], meta["seed"]), []).append((state, meta))
    path = Path(out_dir) / "across_runs" / RECORDS_FILE
    done = {r["run_id"] for r in read_records([path])} if path.exists() else set()
    eval_images = eval_images or EvalImages(dataset, config.image_size, config.eval_batch_size, config.workers)
    with RecordWriter(path) as writer:
        for (label, test_domain, seed), members in sorted(groups.items(), key=lambda kv: kv[0]):
            members.sort(key=lambda m: -m[1]["iid"])
            meta0 = members[0][1]
            ids = {kind: run_id(across=kind, members=sorted(m[1]["run_id"] for m in members),
                                rule=config.ensemble_rule if kind == "ensemble" else None) for kind in
                   ("ensemble", "soup", "greedy-soup")}
            if all(i in done for i in ids.values()):
                continue
            if say:
                say(f"ensembles and soups of {len(members)} runs: {label}, held out {test_domain}, seed {seed}")
            e = names.index(test_domain)
            split_rows = domain_split_rows(dataset.domain_ids, len(names), seed)
            train_domains = [d for d in range(len(names)) if d != e]
            net = build_classifier(load_backbone(meta0["backbone"], "none").model, len(dataset.classes), 0.0).to(dev)

            def logits_of(state):
                net.load_state_dict(state, strict=True)
                return predict_logits(net, eval_images, dev, config.amp, False)

            def counts(pred):
                return split_counts(pred, dataset.labels, split_rows, names)

            def iid_of(splits):
                return iid_accuracy({"splits": splits, "train_domains": [names[d] for d in train_domains]})

            outputs = torch.stack([logits_of(s) for s, _ in members])
            results = {"ensemble": counts(ensemble_scores(outputs, config.ensemble_rule).argmax(1)),
                       "soup": counts(logits_of(average_state_dicts([s for s, _ in members])).argmax(1))}
            soup_state, chosen, _ = greedy_soup([s for s, _ in members], lambda st: iid_of(counts(logits_of(st).argmax(1))))
            results["greedy-soup"] = counts(logits_of(soup_state).argmax(1))
            base = {k: meta0[k] for k in ("dataset", "source", "backbone", "weights", "test_domain", "train_domains",
                                          "seed")}
            titles = {"ensemble": "ensemble of runs", "soup": "weight average of runs", "greedy-soup": "greedy soup"}
            for kind, splits in results.items():
                if ids[kind] in done:
                    continue
                writer.write({**base, "method": f"{meta0['method']}-{kind}", "label": f"{label}, {titles[kind]}",
                              "hparams": {"members": len(members), "rule": config.ensemble_rule if kind == "ensemble"
                                          else None, "chosen": chosen if kind == "greedy-soup" else None},
                              "grid": {}, "run_id": ids[kind], "attempt": ids[kind], "step": 0, "splits": splits,
                              "loss": None, "status": "ok", "final": True,
                              "members": [m[1]["run_id"] for m in members]})
    return path

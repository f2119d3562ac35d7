"""Pretraining from scratch: how the shipped ``demo-resnet`` weights were made, for any backbone and folder.

:func:`pretrain` trains a registered backbone from scratch on a DomainBed-style
folder (all domains pooled, labels = classes) and saves a state_dict with
metadata; :data:`linft.models.demo_resnet.SHIPPED_CHECKPOINT` was made this
way from :func:`linft.data.shapes.write_pretraining_source` (its metadata hold
the exact command).

Determinism: the same arguments give the same weights, bit for bit, for the
same torch version and device (on the CPU the same thread count; on CUDA the
training runs with deterministic kernels, :func:`linft.runtime.deterministic_cuda`).
Every random draw (initialisation, held-out split, shuffling, augmentation)
comes from generators seeded by ``seed``; DataLoader workers only decode
images, so their number changes nothing.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import linft
from linft.data.folders import MultiDomainDataset, check_output_apart, load_image_folder
from linft.data.images import check_workers, decoded_batches, fits_in_memory, normalize_uint8, preload_images
from linft.data.shapes import source_command
from linft.errors import LinftError
from linft.locks import output_lock
from linft.models.registry import backbone_names, build_backbone
from linft.output import progress_bar, writable_folder
from linft.runtime import atomic_save, denormals_flushed, deterministic_cuda, resolve_device


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of :func:`pretrain` (the defaults made the shipped ``demo-resnet``)."""

    arch: str = "demo-resnet"
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.2
    weight_decay: float = 5e-4
    seed: int = 0
    image_size: int = 64
    workers: int | None = None
    device: str = "auto"
    holdout_fraction: float = 0.02
    preload: bool | None = None  # None: preload when the decoded images fit in memory

    def check(self) -> None:
        """One-line errors for settings that cannot run."""
        if self.arch not in backbone_names():
            raise LinftError(f"unknown arch '{self.arch}'; choose one of: {', '.join(backbone_names())}", param="arch")
        for name, value, low in (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 2),
                                 ("image_size", self.image_size, 16)):
            if int(value) != value or value < low:
                raise LinftError(f"{name} must be an integer of at least {low}, got {value}", param=name)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LinftError(f"lr must be a positive number, got {self.lr}", param="lr")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise LinftError(f"weight_decay must be a number >= 0, got {self.weight_decay}", param="weight_decay")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise LinftError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}",
                             param="holdout_fraction")
        check_workers(self.workers)

    def command(self, data_dir, out) -> str:
        """The ``linft pretrain`` command line that reproduces a file made with these settings."""
        parts = ["linft", "pretrain", shlex.quote(os.fspath(data_dir)), "--out", shlex.quote(os.fspath(out))]
        if self.arch != "demo-resnet":
            parts += ["--arch", self.arch]
        parts += ["--epochs", str(self.epochs), "--batch-size", str(self.batch_size), "--lr", repr(float(self.lr)),
                  "--weight-decay", repr(float(self.weight_decay)), "--seed", str(self.seed),
                  "--image-size", str(self.image_size), "--device", str(self.device)]
        return " ".join(parts)


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop after reflection padding by ``pad`` pixels, and random horizontal flip (float batch).

    One gather for the whole batch; the random draws come from ``gen`` (on the CPU).
    """
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).to(x.device)
    flips = torch.rand(n, generator=gen).lt(0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (n, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (n, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    flat = rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]  # (n, h, w) into the padded image
    out = padded.flatten(2).gather(2, flat.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w)


def warmup_cosine_lr(step: int, total: int, warmup: int, base_lr: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def initial_model(arch: str, num_classes: int, seed: int) -> nn.Module:
    """The network to pretrain, seeded, with torchvision's ``zero_init_residual=True``.

    The last BatchNorm of every residual branch starts at 0, so each block starts
    as the identity. Measured on the pretraining source: without it this small
    Bottleneck network barely leaves chance level in the first epochs at any
    learning rate tried (0.02 to 0.2); with it, it trains steadily.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(arch, num_classes, zero_init_residual=True)


def _check_out(out_path: Path, force: bool) -> None:
    if out_path.exists() and not force:
        raise LinftError(f"{out_path} already exists; pass force=True to replace it, or choose another out",
                         param="force")
    if out_path.exists() and out_path.is_dir():
        raise LinftError(f"{out_path} is a folder; pass a file path as out", param="out")
    writable_folder(out_path.parent)


@dataclass
class _Plan:
    """The held-out split and the schedule of one pretraining."""

    train: torch.Tensor
    held: torch.Tensor
    steps_per_epoch: int
    used_per_epoch: int
    total_steps: int
    warmup: int
    pad: int


def _plan(ds: MultiDomainDataset, config: PretrainConfig, gen: torch.Generator) -> _Plan:
    n = len(ds)
    order = torch.randperm(n, generator=gen)
    n_hold = int(n * config.holdout_fraction)
    held, train = order[:n_hold].sort().values, order[n_hold:].sort().values
    steps_per_epoch = len(train) // config.batch_size
    if steps_per_epoch == 0:
        if len(train) < 2:
            raise LinftError(f"{ds.root} has too few images to train on ({len(train)} after the held-out part)")
        steps_per_epoch = 1  # fewer images than one batch: one batch of all of them
    total = config.epochs * steps_per_epoch
    return _Plan(train, held, steps_per_epoch, min(len(train), steps_per_epoch * config.batch_size), total,
                 max(1, total // 50), max(1, config.image_size // 16))


class _Batches:
    """uint8 batches of any row order: from memory when preloaded, else decoded from disk."""

    def __init__(self, ds: MultiDomainDataset, config: PretrainConfig, progress: bool):
        self.ds, self.config = ds, config
        preload = config.preload if config.preload is not None else fits_in_memory(len(ds), config.image_size)
        self.images = preload_images(ds, config.image_size, workers=config.workers, progress=progress) \
            if preload else None

    def __call__(self, rows: torch.Tensor):
        size = self.config.batch_size
        if self.images is not None:
            for a in range(0, len(rows), size):
                yield self.images[rows[a:a + size]]
        else:
            yield from decoded_batches(self.ds, self.config.image_size, rows.tolist(), size, self.config.workers)


@dataclass
class _Training:
    """The state of one pretraining: the network, its optimizer, the data and the random stream."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: _Batches
    labels: torch.Tensor
    plan: _Plan
    gen: torch.Generator
    dev: torch.device
    config: PretrainConfig


def _train_epoch(run: _Training, perm: torch.Tensor, step: int, update) -> dict:
    """One epoch over ``perm``; returns the step reached, the mean loss and the (augmented) training accuracy."""
    model, optimizer, config, plan, dev = run.model, run.optimizer, run.config, run.plan, run.dev
    model.train()
    correct = seen = 0
    loss_sum = 0.0
    for b, batch in enumerate(run.batches(perm)):
        idx = perm[b * config.batch_size:(b + 1) * config.batch_size]
        y = run.labels[idx].to(dev)
        x = random_crop_flip(normalize_uint8(batch.to(dev)), run.gen, plan.pad).contiguous(
            memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, plan.total_steps, plan.warmup, config.lr)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if not math.isfinite(loss.item()):
            raise LinftError(f"training diverged (loss {loss.item()}); lower lr (was {config.lr})")
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
        update(len(idx))
    return {"step": step, "loss": loss_sum / seen, "accuracy": correct / seen}


@torch.inference_mode()
def _heldout_accuracy(run: _Training) -> float | None:
    held, size = run.plan.held, run.config.batch_size
    if not len(held):
        return None
    run.model.eval()
    correct = 0
    for b, batch in enumerate(run.batches(held)):
        idx = held[b * size:(b + 1) * size]
        x = normalize_uint8(batch.to(run.dev)).contiguous(memory_format=torch.channels_last)
        correct += int((run.model(x).argmax(1).cpu() == run.labels[idx]).sum())
    return correct / len(held)


def _metadata(ds, run: _Training, data_dir, out, last: dict, heldout, timing: tuple) -> dict:
    config, plan, dev = run.config, run.plan, run.dev
    tick, t0 = timing
    command = config.command(data_dir, out)
    source = source_command(ds.root)
    return {
        "arch": config.arch, "num_classes": len(ds.classes), "class_names": list(ds.classes),
        "domain_names": list(ds.domains), "image_size": int(config.image_size),
        "command": f"{source} && {command}" if source else command, "pretrain_command": command,
        "source_command": source, "seed": int(config.seed), "epochs": int(config.epochs),
        "batch_size": int(config.batch_size), "lr": float(config.lr), "weight_decay": float(config.weight_decay),
        "init": "torchvision ResNet init with zero_init_residual=True, seeded with seed",
        "optimizer": "SGD momentum 0.9, weight decay on all parameters",
        "schedule": f"linear warm-up over {plan.warmup} steps, then cosine to 0; {plan.total_steps} steps",
        "augmentation": f"reflection pad {plan.pad} + random {config.image_size}px crop, random horizontal flip",
        "normalization": "ImageNet mean/std", "dataset_root": str(ds.root.resolve()),
        "file_list_sha256": ds.file_list_sha256, "num_images": len(ds), "num_train": len(plan.train),
        "num_heldout": len(plan.held), "train_accuracy": last["accuracy"],
        "train_accuracy_note": "last epoch, augmented images, training mode", "train_loss": last["loss"],
        "heldout_accuracy": heldout, "device": str(dev), "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - tick, 1), "created": t0.isoformat(timespec="seconds"),
        "linft_version": linft.__version__, "torch_version": str(torch.__version__),
        "torchvision_version": str(torchvision.__version__),
    }


def pretrain(data_dir: str | os.PathLike, out: str | os.PathLike, config: PretrainConfig = PretrainConfig(), *,
             force: bool = False, progress: bool = True, say: Callable[[str], None] | None = None,
             **settings) -> Path:
    """Train ``config.arch`` from scratch on the DomainBed-style folder ``data_dir``; save it to ``out``.

    ``settings`` override fields of ``config`` (``pretrain(d, o, seed=3)``). All
    domains are pooled and the labels are the classes; a seeded
    ``holdout_fraction`` of the images is held out to report accuracy. SGD with
    momentum 0.9 and weight decay on every parameter, the last incomplete batch
    of an epoch dropped, a linear warm-up over the first 2% of steps then cosine
    decay to 0, cross-entropy; augmentation: :func:`random_crop_flip` with
    padding ``image_size // 16``. Images are decoded once and kept in memory when
    they fit (``preload`` forces either way; both give the same weights).

    ``out`` receives ``{"state_dict": ..., "metadata": {...}}`` (tensors and
    plain values only); an existing ``out`` is only replaced with ``force``, and
    the file appears only once complete. ``say`` receives one line per epoch.
    """
    config = replace(config, **settings)
    tick, t0 = time.perf_counter(), _dt.datetime.now(_dt.timezone.utc)
    say = say or (lambda _line: None)
    config.check()
    dev = resolve_device(config.device)
    ds = load_image_folder(data_dir)
    out_path = Path(out).expanduser()
    check_output_apart(out_path, [ds.root], param="out")
    _check_out(out_path, force)  # at once; again under the lock
    with output_lock(out_path):
        _check_out(out_path, force)  # under the lock: a file another pretraining saved meanwhile is not replaced
        return _pretrain_locked(ds, out_path, config, dev, progress, say, (data_dir, out), (tick, t0))


def _pretrain_locked(ds, out_path: Path, config: PretrainConfig, dev, progress: bool, say, args: tuple,
                     started: tuple) -> Path:
    """:func:`pretrain` once ``out_path`` is locked by this process (``args``: its ``data_dir`` and ``out``)."""
    gen = torch.Generator().manual_seed(config.seed)
    plan = _plan(ds, config, gen)
    model = initial_model(config.arch, len(ds.classes), config.seed)
    model = model.to(dev).to(memory_format=torch.channels_last)  # measured 1.4x faster on a 2-core CPU
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    # Denormal floats appear during training and made CPU steps up to 10x slower (measured); flushing them
    # to zero is set for the training only.
    with denormals_flushed(), deterministic_cuda(dev):
        run = _Training(model, optimizer, _Batches(ds, config, progress), torch.from_numpy(ds.labels), plan, gen,
                        dev, config)
        last, step = {}, 0
        for epoch in range(config.epochs):
            perm = plan.train[torch.randperm(len(plan.train), generator=gen)][:plan.used_per_epoch]
            with progress_bar(plan.used_per_epoch, f"epoch {epoch + 1}/{config.epochs}", unit="img",
                              enabled=progress) as update:
                last = _train_epoch(run, perm, step, update)
            step = last["step"]
            say(f"epoch {epoch + 1}/{config.epochs}: loss {last['loss']:.4f}, "
                f"train accuracy {100 * last['accuracy']:.1f}% (augmented)")
        heldout = _heldout_accuracy(run)
        if heldout is not None:
            say(f"held-out accuracy {100 * heldout:.1f}% ({len(plan.held)} images)")
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        metadata = _metadata(ds, run, *args, last, heldout, started)
        atomic_save({"state_dict": state, "metadata": metadata}, out_path)
    return out_path

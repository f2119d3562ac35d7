"""What a fine-tuning run is, and its pieces: settings, the network, the batches of a step, one SGD step.

* :class:`FineTuneConfig` — the protocol settings shared by the runs of a sweep
  (the defaults are the paper's); :class:`FineTuneRun` — one run: held-out
  domain, seed, and the hyper-parameters and variant that define it.
* :func:`build_run_model` — the backbone with its weights, the head
  ``Dropout(λ) → Linear(D, C)``, stochastic depth, or the first-order model.
* :func:`step_batch` / :func:`train_batches` — the rows of step ``t`` and their
  augmentation seeds, derived from ``(seed, held-out domain, t)`` only.
* :func:`train_step` — one SGD step with the masks of step ``t`` seeded the same way.

Determinism: runs of one seed share batches and masks whatever their lr and
weight decay, as in the official code, and a run resumed at step ``t``
continues exactly as if it had never stopped (bit for bit on the CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from linft.data.folders import MultiDomainDataset
from linft.data.images import check_workers, image_loader, model_input
from linft.data.splits import check_split_seed, seed_hash
from linft.data.tensor_augment import augment_batch
from linft.errors import LinftError
from linft.models.blocks import add_stochastic_depth, check_stochastic_depth
from linft.models.heads import build_classifier, head_parameters
from linft.models.linearize import LinearizedModel
from linft.models.registry import Backbone, load_backbone
from linft.protocol.identity import new_keys_unless_default
from linft.protocol.records import METHODS
from linft.protocol.schedule import Schedule, lr_at
from linft.runtime import DEFAULT_PRECISION, autocast, check_precision
from linft.train.finetune.ensembles import ENSEMBLE_RULES


#: Training augmentations: ``pil`` — DomainBed's PIL transform per image in DataLoader workers (the paper's
#: protocol); ``tensor`` — the same family batched on the device (:mod:`linft.data.tensor_augment`; faster,
#: not bit-identical to PIL); ``none`` — the evaluation transform.
AUGMENTATIONS = ("pil", "tensor", "none")
#: How ``augment`` enters a run's id: ``pil`` and ``none`` as the booleans True and False, ``tensor`` as its name
#: (the ids ``tests/compat`` pins).
_AUGMENT_IDENTITY = {"pil": True, "none": False}


@dataclass(frozen=True)
class FineTuneConfig(Schedule):
    """Protocol settings shared by the runs of a sweep: the :class:`~linft.protocol.schedule.Schedule` (the paper's
    by default; ``FineTuneConfig(**asdict(DOMAINNET))`` for DomainNet's), and the rest (the defaults are the
    paper's)."""

    image_size: int = 224
    freeze_bn: bool = True
    augment: str = "pil"  # AUGMENTATIONS: DomainBed's PIL transform in workers, the batched tensor one, or none
    eval_batch_size: int = 256
    workers: int | None = None
    precision: str = DEFAULT_PRECISION  # autocast on CUDA: float32 (none) or bfloat16; the CPU computes in float32
    channels_last: bool = True
    trajectory: bool = False  # trajectory ensemble and weight average records (from step ``eval_every`` on)
    average_every_step: bool = False  # trajectory weight average over every step (official code) instead of evals
    ensemble_rule: str = "probs"
    lp_ft_cache: str | None = None  # LP-FT runs: the feature cache the probe head is fitted on (None: the backbone's)
    split_seed: int | None = None  # one data split for every seed (0: the official code's); None: each seed its own

    def __post_init__(self):
        if isinstance(self.augment, bool):  # earlier releases: True (DomainBed's PIL augmentation) or False
            object.__setattr__(self, "augment", "pil" if self.augment else "none")

    def protocol(self) -> dict:
        """The settings that change a run's result (what its id is made of); ``split_seed`` only when set."""
        keep = ("steps", "batch_size", "eval_every", "momentum", "lr_milestones", "image_size", "freeze_bn", "augment",
                "split_seed")
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k in keep}
        out["augment"] = _AUGMENT_IDENTITY.get(self.augment, self.augment)
        return new_keys_unless_default(out, {"split_seed": None})

    def check(self) -> None:
        """One-line errors for protocol settings that cannot run."""
        super().check()
        if self.image_size < 16:
            raise LinftError(f"image_size must be at least 16, got {self.image_size}", param="image_size")
        if self.ensemble_rule not in ENSEMBLE_RULES:
            raise LinftError(f"unknown ensemble rule '{self.ensemble_rule}'; use {' or '.join(ENSEMBLE_RULES)}",
                             param="ensemble_rule")
        check_split_seed(self.split_seed)
        if self.augment not in AUGMENTATIONS:
            raise LinftError(f"unknown augmentation '{self.augment}'; use {', '.join(AUGMENTATIONS)}", param="augment")
        check_workers(self.workers)
        if check_precision(self.precision) == "float16":
            raise LinftError("precision float16 is for extraction and interpolation: training in float16 needs loss "
                             "scaling, which linft does not do; use bfloat16 (as fast on GPUs since Ampere) or float32",
                             param="precision")


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
    lp_ft: bool = False  # LP-FT: the head starts from the linear-probe solution (linft.train.finetune.lp_ft)
    stochastic_depth_mode: str = "row"  # STOCHASTIC_DEPTH_MODES: per example (torchvision) or the official code's

    def __post_init__(self):
        """The one check of a run's hyper-parameters and variant: one line for a value or a mix that cannot run."""
        if not (self.last_layer_lr_mult > 0 and self.last_layer_lr_mult != float("inf")):
            raise LinftError(f"last_layer_lr_mult must be positive, got {self.last_layer_lr_mult}",
                             param="last_layer_lr_mult")
        check_stochastic_depth(self.stochastic_depth, self.stochastic_depth_mode)
        if self.linearized and self.stochastic_depth:
            raise LinftError("linearized=True and stochastic_depth do not combine; run them separately",
                             param="linearized")
        if self.lp_ft and self.linearized:
            raise LinftError("lp_ft=True and linearized=True do not combine; run them separately", param="lp_ft")
        if not self.stochastic_depth:  # no stochastic depth: the mode changes nothing, so it is the default's
            object.__setattr__(self, "stochastic_depth_mode", "row")

    def identity(self) -> dict:
        """The fields in the run's id; ``lp_ft`` and ``stochastic_depth_mode`` only when not their defaults (so the
        ids ``tests/compat`` pins stay as they are)."""
        return new_keys_unless_default(asdict(self), {"lp_ft": False, "stochastic_depth_mode": "row"})


def finetune_method(run: FineTuneRun, weights: str) -> str:
    """The record method of a run (:data:`linft.protocol.records.METHODS`); ``weights="none"`` is from scratch."""
    if run.linearized:
        return "linearized-finetune"
    if str(weights).lower() == "none":
        return "scratch"
    return "lp-ft" if run.lp_ft else "finetune"


def finetune_label(run: FineTuneRun, weights: str, config: FineTuneConfig | None = None) -> str:
    """The unit a report compares: the method and its variant (the grid lr × weight decay varies inside it). Whatever
    changes the computation beyond the grid is named (lr milestones other than the paper's, as steps), so that two
    runs computing different things never share a row.

    ``weights`` are the resolved weights (:attr:`linft.models.registry.Backbone.weights`).
    """
    base = {m: METHODS[m] for m in ("linearized-finetune", "scratch", "finetune", "lp-ft")}
    parts = [base[finetune_method(run, weights)]]
    if run.last_layer_lr_mult != 1.0:
        parts.append(f"{run.last_layer_lr_mult:g}x head lr")
    if run.stochastic_depth:
        parts.append(f"stochastic depth {run.stochastic_depth:g}"
                     + (" (official)" if run.stochastic_depth_mode == "official" else ""))
    if config is not None and not config.has_paper_milestones():
        steps = config.milestone_steps()
        parts.append(f"lr ÷10 at step{'s' * (len(steps) > 1)} {'/'.join(map(str, steps))}" if steps else "constant lr")
    if config is not None and not config.freeze_bn:
        parts.append("BN trained")
    if config is not None and config.augment != "pil":
        parts.append("no augmentation" if config.augment == "none" else f"{config.augment} augmentation")
    if config is not None and config.split_seed is not None:
        parts.append(f"split seed {config.split_seed}")
    parts.append(f"dropout {run.dropout:g}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- the network


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


def build_run_model(backbone: str, weights, num_classes: int, run: FineTuneRun, dev: torch.device,
                    channels_last: bool = True) -> tuple[nn.Module, Backbone]:
    """The network of a run, on ``dev``: backbone with its weights, the dropout head, stochastic depth, linearization.

    Returns ``(model, backbone_info)``; for a linearized run the model is a
    :class:`linft.models.linearize.LinearizedModel` around the initial network.
    """
    bb = load_backbone(backbone, weights)
    if run.lp_ft and (run.linearized or bb.weights == "none"):
        raise LinftError("LP-FT starts from a probe on pretrained features: it does not combine with weights='none'; "
                         "run them separately", param="lp_ft")
    model = build_classifier(bb.model, num_classes, run.dropout, seed=seed_hash("linft-finetune", "init", run.seed,
                                                                                  run.test_domain))
    if run.stochastic_depth:  # never with linearized (FineTuneRun refuses it)
        add_stochastic_depth(model, run.stochastic_depth, run.stochastic_depth_mode)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if run.linearized:
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


def ordinary_state(model: nn.Module) -> dict:
    """The ordinary network's state_dict of a model (θ0 + δ for a linearized one), copied to the CPU."""
    merged = getattr(model, "merged_state_dict", None)
    return {k: v.detach().to("cpu", copy=True) for k, v in (merged() if merged else model.state_dict()).items()}


# --------------------------------------------------------------------------- batches and steps


def step_batch(pools: list[np.ndarray], batch_size: int, seed: int, test_domain: int, step: int
               ) -> list[tuple[int, int]]:
    """The rows of step ``step`` (``batch_size`` per training domain, with replacement) and their augmentation seeds."""
    g = torch.Generator().manual_seed(seed_hash("linft-finetune", "batch", seed, test_domain, step))
    rows = np.concatenate([pool[torch.randint(len(pool), (batch_size,), generator=g).numpy()] for pool in pools])
    return [(int(r), augment_seed(seed, test_domain, step, j)) for j, r in enumerate(rows)]


def augment_seed(seed: int, test_domain: int, step: int, j: int) -> int:
    """The augmentation seed of image ``j`` of step ``step`` (PIL or tensor augmentation alike)."""
    return seed_hash("linft-finetune", "augment", seed, test_domain, step, j)


class _StepSampler(torch.utils.data.Sampler):
    """Yields, for each step from ``start`` on, the items ``[(row, seed), ...]`` of that step (seed None: no
    augmentation)."""

    def __init__(self, pools: list[np.ndarray], config: FineTuneConfig, seed: int, test_domain: int, start: int):
        self.pools, self.config, self.seed, self.test_domain, self.start = pools, config, seed, test_domain, start

    def __len__(self):
        return self.config.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.config.steps):
            items = step_batch(self.pools, self.config.batch_size, self.seed, self.test_domain, step)
            yield items if self.config.augment == "pil" else [(row, None) for row, _ in items]


def train_batches(ds: MultiDomainDataset, pools, config: FineTuneConfig, seed: int, test_domain: int, start: int,
                  decoded: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, str | None]]:
    """``(uint8 images, labels, bad image or None)`` of steps ``start .. config.steps - 1``, decoded in workers.

    ``decoded``: every image of ``ds`` through the evaluation transform
    (:attr:`linft.data.images.EvalImages.images`, the same decoding); when given and
    ``config.augment`` is not ``pil``, the batches are its rows (tensor augmentation
    happens later, on the device, in :func:`train_step`).
    """
    sampler = _StepSampler(pools, config, seed, test_domain, start)
    if decoded is not None and config.augment != "pil":
        for items in sampler:
            rows = np.array([row for row, _ in items])
            yield decoded[torch.from_numpy(rows)], torch.from_numpy(ds.labels[rows]).long(), None
        return
    loader = image_loader(ds, config.image_size, batches=sampler, workers=config.workers,
                          pin_memory=torch.cuda.is_available())
    for images, _views, rows, ok, errors in loader:
        bad = np.flatnonzero(~ok.numpy())
        yield (images, torch.from_numpy(ds.labels[rows.numpy()]).long(),
               f"{ds.root / ds.paths[int(rows[bad[0]])]} ({errors[bad[0]]})" if len(bad) else None)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
               step: int, run: FineTuneRun, test_domain: int, config: FineTuneConfig) -> torch.Tensor:
    """One SGD step of a run on a uint8 batch; returns the (detached, unsynchronised) loss.

    Sets the learning rates of ``step``, seeds the dropout and stochastic-depth
    masks from ``(run.seed, test_domain, step)``, runs the forward pass under
    autocast to ``config.precision`` on CUDA and channels_last when
    ``config.channels_last``, on the model's device. With ``config.augment ==
    "tensor"`` the batch is augmented there first, image ``j`` with the seed
    :func:`augment_seed` gives it. The model must already be in training mode
    (:func:`set_train_mode`).
    """
    dev = next(model.parameters()).device
    if config.augment == "tensor":
        seeds = [augment_seed(run.seed, test_domain, step, j) for j in range(len(images))]
        images = augment_batch(images.to(dev, non_blocking=True), seeds)
    x, y = model_input(images, dev, config.channels_last), labels.to(dev, non_blocking=True)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, g["base_lr"], config.milestone_steps())
    torch.manual_seed(seed_hash("linft-finetune", "masks", run.seed, test_domain, step))
    with autocast(dev, config.precision):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def predict_logits(model: nn.Module, images, dev: torch.device, precision: str = DEFAULT_PRECISION,
                   channels_last: bool = True) -> torch.Tensor:
    """Logits (N, C), float32 on the CPU, of ``model`` in eval mode over uint8 batches ``images`` (autocast to
    ``precision`` on CUDA)."""
    was_training = model.training
    model.eval()
    out = []
    for batch in images:
        with autocast(dev, precision):
            out.append(model(model_input(batch, dev, channels_last)).float().cpu())
    model.train(was_training)
    return torch.cat(out)

"""Full fine-tuning with a (very large) dropout on the penultimate representation, and its baselines.

One *run* (:func:`train_run`) fine-tunes a backbone leave-one-domain-out with
the paper's protocol (as its official code runs it; the README lists where linft differs): the classifier
is ``Dropout(λ) → Linear(D, C)`` on the pooled penultimate representation; BatchNorm is frozen (running statistics
fixed, affine parameters trained); SGD with momentum 0.9 and weight decay on
every parameter; 32 images per training domain per step, drawn with
replacement from the training domains' "in" splits and augmented with
DomainBed's training transform; lr ÷10 at half; evaluation of every split
with the evaluation transform every ``eval_every`` steps and at the last step.
The variants are fields of :class:`~linft.train.finetune.model.FineTuneRun`
and of the records: dropout rate, last-layer learning-rate multiplier,
residual-block dropout, training from scratch (``weights="none"``), the
first-order model (``linearized``) and LP-FT (``lp_ft``: the head starts from
the linear-probe solution, :mod:`linft.train.finetune.lp_ft`).

Order of writes at an evaluation: ``selected.pt`` (when the i.i.d. accuracy
improved), the trajectory records, the run's record, then the checkpoint
(``weights_only``-loadable state_dicts). A run is done once its final record
is on disk (:class:`~linft.train.finetune.run_folder.RunFolder`), so every other
product of the run is durable by then; a record whose step is already on
disk is never written twice, and a killed run resumes from its last
checkpoint exactly as if it had never stopped (bit for bit on the CPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from linft.data.folders import MultiDomainDataset, check_output_apart, find_dataset
from linft.data.images import EvalImages
from linft.data.splits import check_training_splits, domain_split_rows, split_seed
from linft.errors import LinftError
from linft.locks import output_lock
from linft.models.checkpoints import load_checkpoint
from linft.models.heads import load_head
from linft.models.registry import load_backbone
from linft.protocol.grid import Grid
from linft.protocol.identity import RunHeader, image_source, run_header
from linft.protocol.records import RecordWriter, existing_records, make_record
from linft.protocol.schedule import eval_steps
from linft.protocol.selection import iid_accuracy, predicted_classes, split_counts
from linft.output import atomic_write_text, progress_bar
from linft.runtime import atomic_save, resolve_device
from linft.train.finetune.model import (FineTuneConfig, FineTuneRun, build_run_model, finetune_label,
                                        finetune_method, ordinary_state, predict_logits, run_optimizer,
                                        set_train_mode, train_batches, train_step)
from linft.train.finetune.lp_ft import lp_ft_head, lp_ft_identity
from linft.train.finetune.run_folder import RunFolder
from linft.train.finetune.selected import load_selected, save_selected
from linft.train.finetune.hooks import EvalEvent, RunHooks
from linft.train.finetune.trajectory import Trajectory
from linft.train.sweeps.plan import write_plan


def run_identity(run: FineTuneRun, backbone: str, weights_sha256: str, dataset_sha256: str,
                 config: FineTuneConfig) -> dict:
    """Everything that defines a run's result (its id is the hash of this); an LP-FT run adds its probe's source."""
    identity = {"method": "finetune", "backbone": backbone, "weights_sha256": weights_sha256,
                "dataset": dataset_sha256, "run": run.identity(), "protocol": config.protocol()}
    if run.lp_ft:
        identity["lp_ft"] = lp_ft_identity(config)
    return identity


@dataclass
class RunOutcome:
    """What :func:`train_run` did for one run."""

    run_dir: Path
    run_id: str
    status: str  # trained, resumed, done (already finished), diverged
    steps_trained: int = 0
    run: FineTuneRun | None = None


@dataclass
class _Run:
    """Everything one run needs while it trains."""

    dataset: MultiDomainDataset
    run: FineTuneRun
    config: FineTuneConfig
    folder: RunFolder
    header: RunHeader
    model: nn.Module
    optimizer: torch.optim.Optimizer
    test_index: int
    split_rows: dict
    pools: list
    eval_images: EvalImages
    trajectory: Trajectory | None
    written: set = field(default_factory=set)
    best_iid: float = -1.0
    start: int = 0

    def evaluate(self, net: nn.Module) -> tuple[torch.Tensor, dict | None]:
        """Logits of ``net`` on every image, and its ``[correct, total]`` on every split (None: non-finite logits)."""
        dev = next(net.parameters()).device
        logits = predict_logits(net, self.eval_images, dev, self.config.precision, self.config.channels_last)
        ds = self.dataset
        return logits, split_counts(predicted_classes(logits), ds.labels, self.split_rows, ds.domains)

    def diverged(self, writer: RecordWriter, step: int) -> None:
        """The run's final ``diverged`` record at ``step`` (and its trajectory's): a non-finite loss or logits."""
        if self.trajectory is not None:  # their checkpoints come from the same trajectory
            self.trajectory.diverged(self, writer, step)
        self.write(writer, self.header, step, {}, None, "diverged", True)

    def write(self, writer: RecordWriter, header: RunHeader, step: int, splits: dict, loss, status: str,
              final: bool) -> dict:
        """The record of ``header`` at ``step``, written unless it is already on disk."""
        record = make_record(header, step, splits, loss=loss, status=status, final=final)
        if (header.run_id, step) not in self.written:
            writer.write(record)
            self.written.add((header.run_id, step))
        return record


def _header(ds: MultiDomainDataset, run: FineTuneRun, backbone: str, bb, config: FineTuneConfig, rid: str) -> RunHeader:
    names = ds.domains
    hparams = {**asdict(run), **config.protocol(), "backbone": backbone, "weights": bb.weights,
               **({"lp_ft_cache": config.lp_ft_cache} if run.lp_ft else {})}
    hparams.pop("test_domain")
    hparams.pop("seed")
    return run_header(finetune_method(run, bb.weights), finetune_label(run, bb.weights, config), run_id=rid,
                      source=image_source(ds.file_list_sha256, bb.weights_sha256), dataset=ds.name or ds.root.name,
                      backbone=backbone, weights=bb.weights, test_domain=run.test_domain,
                      train_domains=[d for d in names if d != run.test_domain], hparams=hparams,
                      grid={"lr": run.lr, "weight_decay": run.weight_decay}, seed=run.seed)


def run_splits(ds: MultiDomainDataset, run: FineTuneRun,
               config: FineTuneConfig = FineTuneConfig()) -> tuple[dict, list]:
    """A run's split rows ``{(domain, "in"|"out"): rows}`` and its training pools (the training domains' "in" rows);
    a training domain with an empty split is one LinftError."""
    names = ds.domains
    split_rows = domain_split_rows(ds.domain_ids, len(names), split_seed(run.seed, config.protocol()))
    train = [d for d in range(len(names)) if names[d] != run.test_domain]
    check_training_splits(split_rows, train, names)
    return split_rows, [split_rows[(d, "in")] for d in train]


def _restore(r: _Run, hooks: RunHooks) -> str:
    """Pick up what is on disk: written records, the selected model's accuracy, the checkpoint. Returns the status."""
    existing = existing_records(r.folder.records)
    r.written = {(rec["run_id"], rec["step"]) for rec in existing}
    if existing:
        r.header = r.header.replace(attempt=existing[0].get("attempt", r.header.run_id))
    if existing and r.folder.selected.exists():
        meta = load_selected(r.folder.selected)[1]
        if meta.get("run_id") == r.header.run_id:
            r.best_iid = float(meta.get("iid", -1.0))
    path = r.folder.checkpoint
    if not path.exists():
        return "trained"
    ckpt = load_checkpoint(path, "checkpoint", "delete it to restart that run")
    if not isinstance(ckpt, dict) or not {"run_id", "step", "model", "optimizer"} <= ckpt.keys():
        raise LinftError(f"{path} is not a linft fine-tuning checkpoint; delete it to restart this run")
    if ckpt.get("run_id") != r.header.run_id:
        raise LinftError(f"{path} belongs to another run ({ckpt.get('run_id')}); delete it to restart this run")
    r.model.load_state_dict(ckpt["model"], strict=True)
    r.optimizer.load_state_dict(ckpt["optimizer"])
    if r.trajectory is not None:
        r.trajectory.load_state_dict(ckpt, path)
    r.start = int(ckpt["step"]) + 1
    run = r.run
    hooks.tell(f"resuming {r.header.label} / {run.test_domain} / seed {run.seed} / lr {run.lr:g} "
               f"wd {run.weight_decay:g} at step {r.start}")
    return "resumed"


def _save_selected(r: _Run, step: int, iid: float) -> None:
    ds = r.dataset
    save_selected(r.folder.selected, ordinary_state(r.model),
                  {**r.header.fields(), "step": step, "iid": iid, "num_classes": len(ds.classes),
                   "class_names": list(ds.classes), "domain_names": list(ds.domains),
                   "image_size": r.config.image_size, "linearized": r.run.linearized})


def _evaluation(r: _Run, writer: RecordWriter, step: int, loss: torch.Tensor, hooks: RunHooks) -> bool:
    """Evaluate at ``step``: selected.pt, trajectory records, the run's record, the checkpoint (in that order).
    Returns False, having written nothing, when the model's logits are not all finite (the run diverged)."""
    final = step == r.config.steps - 1
    logits, splits = r.evaluate(r.model)
    if splits is None:
        return False
    iid = iid_accuracy({"splits": splits, "train_domains": r.header.train_domains})
    if iid > r.best_iid:
        r.best_iid = iid
        _save_selected(r, step, iid)
    if r.trajectory is not None:
        r.trajectory.evaluate(r, writer, step, logits, final)
    record = r.write(writer, r.header, step, splits, float(loss), "ok", final)
    if hooks.on_eval is not None:
        hooks.on_eval(EvalEvent(step, record, r.model))
    if not final:
        atomic_save({"run_id": r.header.run_id, "step": step, "model": r.model.state_dict(),
                     "optimizer": r.optimizer.state_dict(),
                     **(r.trajectory.state_dict() if r.trajectory is not None else {})}, r.folder.checkpoint)
        if hooks.on_checkpoint is not None:
            hooks.on_checkpoint(step, r.folder.checkpoint)
    return True


def _train(r: _Run, progress: bool, hooks: RunHooks) -> tuple[int, bool]:
    """Steps ``r.start ..``: returns the steps trained and whether the run diverged."""
    config, run = r.config, r.run
    evals = set(eval_steps(config.steps, config.eval_every))
    dev = next(r.model.parameters()).device
    rng_devices = [dev] if dev.type == "cuda" else []
    trained = 0
    with RecordWriter(r.folder.records, sinks=hooks.sinks) as writer, torch.random.fork_rng(devices=rng_devices), \
            progress_bar(config.steps, f"{r.header.label} | held out {run.test_domain} | seed {run.seed}",
                         unit="step", enabled=progress, initial=r.start) as update:
        set_train_mode(r.model, True, config.freeze_bn)
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
        batches = train_batches(r.dataset, r.pools, config, run.seed, r.test_index, r.start,
                                r.eval_images.images if config.augment != "pil" else None)
        for step in range(r.start, config.steps):
            images, y, bad = next(batches)
            if bad:
                raise LinftError(f"cannot read image {bad}; fix or remove it, then re-run")
            loss = train_step(r.model, r.optimizer, images, y, step, run, r.test_index, config)
            trained += 1
            update(1)
            nonfinite |= ~torch.isfinite(loss)  # no host sync per step: checked at each evaluation
            if r.trajectory is not None:
                r.trajectory.after_step(r.model, step)
            if hooks.on_step is not None:
                hooks.on_step(step)
            if step not in evals:
                continue
            if bool(nonfinite) or not _evaluation(r, writer, step, loss, hooks):  # a non-finite loss, or logits
                r.diverged(writer, step)
                return trained, True
            set_train_mode(r.model, True, config.freeze_bn)
    return trained, False


def train_run(dataset: MultiDomainDataset, out_dir, run: FineTuneRun, *, backbone: str = "resnet50",
              weights="DEFAULT", config: FineTuneConfig = FineTuneConfig(), device="auto",
              eval_images: EvalImages | None = None, progress: bool = True,
              hooks: RunHooks | None = None) -> RunOutcome:
    """Fine-tune one run (or resume it, or skip it when done); records go to ``out_dir/<run_id>/records.jsonl``."""
    hooks = hooks or RunHooks()
    if run.test_domain not in dataset.domains:
        raise LinftError(f"held-out domain '{run.test_domain}' is not in the dataset; choose from "
                         f"{', '.join(dataset.domains)}")
    dev = resolve_device(device)
    model, bb = build_run_model(backbone, weights, len(dataset.classes), run, dev, config.channels_last)
    bb.check_image_size(config.image_size)  # fine-tuning runs DomainBed's transforms at image_size
    backbone = bb.name  # the architecture as resolved (clip:ViT-B-32 with OpenAI's weights: clip:ViT-B-32-quickgelu)
    identity = run_identity(run, backbone, bb.weights_sha256, dataset.file_list_sha256, config)
    folder = RunFolder.of(out_dir, identity)
    split_rows, pools = run_splits(dataset, run, config)  # a run refused here leaves no folder behind
    with output_lock(folder.root, folder=True):  # one process per run (a second launch, a Slurm resubmission)
        return _train_locked(config, _Prepared(dataset, run, folder, identity, backbone, bb, model, split_rows, pools,
                                               eval_images), progress, hooks)


@dataclass
class _Prepared:
    """What :func:`train_run` settles before taking the run folder's lock: the run, its identity and folder, its
    network (``bb``: the resolved backbone) and its data."""

    dataset: MultiDomainDataset
    run: FineTuneRun
    folder: RunFolder
    identity: dict
    backbone: str
    bb: object
    model: nn.Module
    split_rows: dict
    pools: list
    eval_images: EvalImages | None


def _train_locked(config: FineTuneConfig, p: _Prepared, progress: bool, hooks: RunHooks) -> RunOutcome:
    """:func:`train_run` once its folder is locked by this process."""
    folder, run, dataset = p.folder, p.run, p.dataset
    done = folder.final_status()  # under the lock: also a run another process finished meanwhile
    if done is not None:
        folder.checkpoint.unlink(missing_ok=True)  # left by a kill between the final record and its removal
        return RunOutcome(folder.root, folder.run_id, "diverged" if done == "diverged" else "done", run=run)
    atomic_write_text(folder.run_json, json.dumps({"run_id": folder.run_id, **p.identity}, indent=1) + "\n")
    header = _header(dataset, run, p.backbone, p.bb, config, folder.run_id)
    r = _Run(dataset, run, config, folder, header, p.model, run_optimizer(p.model, run, config.momentum),
             dataset.domains.index(run.test_domain), p.split_rows, p.pools,
             p.eval_images or EvalImages(dataset, config.image_size, config.eval_batch_size, config.workers),
             Trajectory(p.identity, config, p.backbone) if config.trajectory else None)
    status = _restore(r, hooks)
    if run.lp_ft and r.start == 0:  # a resumed run has its head in its checkpoint
        load_head(r.model, lp_ft_head(dataset, np.sort(np.concatenate(p.pools)), r.model, p.bb.weights_sha256, config,
                                      r.eval_images))
    trained, diverged = _train(r, progress, hooks)
    if diverged:
        hooks.tell(f"{header.label} / {run.test_domain} / seed {run.seed} / lr {run.lr:g} diverged")
    folder.checkpoint.unlink(missing_ok=True)
    return RunOutcome(folder.root, folder.run_id, "diverged" if diverged else status, trained, run)


# --------------------------------------------------------------------------- a sweep


def default_finetune_out(ds: MultiDomainDataset) -> Path:
    """Where ``linft finetune`` writes when not told: ``runs/finetune/<dataset>``."""
    return Path("runs") / "finetune" / (ds.name or ds.root.name).replace(" ", "_")


def sweep_runs(domains: list[str], grid: Grid = Grid(), *, last_layer_lr_mult: float = 1.0,
               stochastic_depth: float = 0.0, linearized: bool = False, lp_ft: bool = False,
               stochastic_depth_mode: str = "row", **grid_fields) -> list[FineTuneRun]:
    """Every run of ``grid`` (whose fields ``grid_fields`` override: ``dropouts=(0, 0.9), seeds=1``; the paper's
    grid by default): held-out domain × seed × dropout × lr × weight decay (:meth:`Grid.runs`), of one variant
    (which each :class:`FineTuneRun` checks)."""
    grid = replace(grid, **grid_fields)
    runs = grid.runs(domains, where="the dataset")
    return [FineTuneRun(d, s, p.lr, p.weight_decay, p.dropout, float(last_layer_lr_mult), float(stochastic_depth),
                        linearized, lp_ft, stochastic_depth_mode) for d, s, p in runs]


@dataclass
class SweepResult:
    """Where a sweep's runs went, what happened to each, and its evaluation images (decoded once, to reuse)."""

    out: Path
    runs: list[RunOutcome] = field(default_factory=list)
    eval_images: EvalImages | None = None

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep before it is launched: its folder and its label."""

    run: FineTuneRun
    folder: RunFolder
    label: str

    def plan_entry(self) -> dict:
        """What the sweep's plan keeps of it (:func:`linft.train.sweeps.plan.plan_entry`)."""
        r = self.run
        return {"label": self.label, "test_domain": r.test_domain, "seed": r.seed,
                "grid": {"lr": r.lr, "weight_decay": r.weight_decay}}


def planned_runs(dataset: MultiDomainDataset, out_dir, runs: list[FineTuneRun], *, backbone: str = "resnet50",
                 weights="DEFAULT", config: FineTuneConfig = FineTuneConfig()) -> list[PlannedRun]:
    """The folder and label of each of ``runs`` under ``out_dir`` (loads the backbone once: its resolved name and
    weights are part of the ids; an image size it cannot take is refused here)."""
    bb = load_backbone(backbone, weights)
    bb.check_image_size(config.image_size)
    return [PlannedRun(r, RunFolder.of(out_dir, run_identity(r, bb.name, bb.weights_sha256, dataset.file_list_sha256,
                                                             config)), finetune_label(r, bb.weights, config))
            for r in runs]


def plan_sweep(out_dir, planned: list[PlannedRun]) -> list[bool]:
    """Which of ``planned`` are done; when some are not, every one is added to the sweep's plan first
    (:func:`linft.train.sweeps.plan.write_plan`: ``linft status`` counts those not started as to do). Call it
    under the folder's lock."""
    done = [p.folder.is_done() for p in planned]
    if not all(done):
        write_plan(out_dir, {p.folder.run_id: p.plan_entry() for p in planned})
    return done


def finetune(dataset, out_dir, *, backbone: str = "resnet50", weights="DEFAULT", data_root=None,
             runs: list[FineTuneRun] | None = None, config: FineTuneConfig = FineTuneConfig(), device="auto",
             progress: bool = True, hooks: RunHooks | None = None, **grid) -> SweepResult:
    """Fine-tune every run of a grid, one after the other in this process (finished runs are skipped), after adding
    them to the sweep's plan (:func:`plan_sweep`).

    ``grid`` takes the arguments of :func:`sweep_runs` when ``runs`` is not
    given. This is the ``local`` launcher of :func:`linft.train.sweeps.launch.launch_sweep` (the one call of the CLI
    and the demo, which also runs on several GPUs or Slurm and evaluates ensembles and soups across runs).
    """
    config.check()
    hooks = hooks or RunHooks()
    ds = dataset if isinstance(dataset, MultiDomainDataset) else find_dataset(dataset, data_root)
    check_output_apart(out_dir, [ds.root], param="out_dir")
    runs = runs if runs is not None else sweep_runs(ds.domains, **grid)
    eval_images = EvalImages(ds, config.image_size, config.eval_batch_size, config.workers, progress)
    result = SweepResult(Path(out_dir), eval_images=eval_images)
    planned = planned_runs(ds, out_dir, runs, backbone=backbone, weights=weights, config=config)
    with output_lock(out_dir, folder=True):  # a second identical command refuses at once
        plan_sweep(out_dir, planned)
        for i, run in enumerate(runs):
            hooks.tell(f"run {i + 1}/{len(runs)}: dropout {run.dropout:g}, held out {run.test_domain}, "
                       f"seed {run.seed}, lr {run.lr:g}, weight decay {run.weight_decay:g}")
            result.runs.append(train_run(ds, out_dir, run, backbone=backbone, weights=weights, config=config,
                                         device=device, eval_images=eval_images, progress=progress, hooks=hooks))
    return result

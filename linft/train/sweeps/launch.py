"""Run a fine-tuning grid as independent, idempotent jobs: in this process, one process per GPU, or on Slurm.

Each run of :func:`linft.train.finetune.run.sweep_runs` is one job that calls
:func:`linft.train.finetune.run.train_run`; a run's final record makes a re-launch
skip it (:meth:`linft.train.finetune.run_folder.RunFolder.is_done`) and its checkpoint
makes an interrupted job resume, so launching the same sweep again completes
only what is missing.

Launchers:

* ``local``: one run after the other in this process (``gpus`` > 1: one
  worker process per GPU, each taking the next run when it is free);
* ``slurm``: one Slurm job per run through submitit (a job array), the
  engine made for that; ``submitit-local`` is submitit's local executor (all
  jobs at once as local processes), used by the tests.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import multiprocessing as mp

from linft.data.folders import MultiDomainDataset, check_output_apart, load_image_folder
from linft.data.images import EvalImages
from linft.errors import LinftError
from linft.locks import output_lock
from linft.models.registry import load_backbone
from linft.train.finetune.across_runs import evaluate_across_runs
from linft.output import say_line
from linft.train.finetune.run import finetune, train_run
from linft.train.finetune.hooks import watch_hooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun, finetune_label
from linft.train.finetune.run import run_identity
from linft.train.finetune.run_folder import RunFolder
from linft.train.sweeps.status import divergence_note, write_plan

LAUNCHERS = ("local", "slurm", "submitit-local")


@dataclass
class LaunchOptions:
    """Where and how the runs of a sweep run.

    ``launcher``: ``local`` (this process; ``gpus`` > 1: one worker process
    per GPU), ``slurm`` (one job per run through submitit, with the submitit
    parameters ``slurm``: ``slurm_partition``, ``timeout_min``,
    ``gpus_per_node``, ...) or ``submitit-local``. With ``wait`` the call
    returns once every job has ended (needed for ``across_runs``: the
    ensembles and soups of the grid's selected models). ``say`` receives news
    and one line per evaluation (in this process; a submitit job writes them,
    and its progress lines, to its own stderr log); ``tensorboard_dir`` also
    writes every record as TensorBoard event files.
    """

    launcher: str = "local"
    device: str = "auto"
    gpus: int = 1
    slurm: dict | None = None
    wait: bool = True
    across_runs: bool = False
    progress: bool = True
    say: Callable[[str], None] | None = None
    tensorboard_dir: str | None = None


def check_runs(runs: list[FineTuneRun], config: FineTuneConfig, across_runs: bool = False) -> None:
    """Refuse, before anything is launched, variants that do not combine."""
    if any(r.linearized and r.stochastic_depth for r in runs):
        raise LinftError("--linearized and --stochastic-depth do not combine; run them separately")
    if any(r.linearized for r in runs) and (config.trajectory or across_runs):
        raise LinftError("--ensembles is not available with --linearized (averaging linearized models is a different "
                         "model); run --linearized without --ensembles")


def _job(dataset_root: str, out_dir: str, run: dict, backbone: str, weights, config: dict, device: str,
         dataset_name: str | None = None, watch: dict | None = None):
    """One job: fine-tune (or resume, or skip) one run. Top-level so that it pickles. ``watch``: ``log`` (one
    line per evaluation on stderr), ``progress`` (plain progress lines when stderr is a log file),
    ``tensorboard_dir``."""
    cfg, watch = dict(config), watch or {}
    cfg["lr_milestones"] = tuple(cfg["lr_milestones"])
    hooks = watch_hooks(say_line if watch.get("log") else None, watch.get("tensorboard_dir"))
    result = train_run(load_image_folder(dataset_root, dataset_name), out_dir, FineTuneRun(**run), backbone=backbone,
                       weights=weights, config=FineTuneConfig(**cfg), device=device,
                       progress=bool(watch.get("progress")), hooks=hooks)
    return result.run_id, result.status


_DEVICE = None


def _claim_gpu(queue) -> None:
    global _DEVICE
    _DEVICE = f"cuda:{queue.get()}"


def _gpu_job(*args):
    return _job(*args[:6], _DEVICE, *args[7:])


def _on_gpus(args: list[tuple], gpus: int, dataset_name, watch: dict) -> list[str]:
    queue = mp.get_context("spawn").Manager().Queue()
    for i in range(gpus):
        queue.put(i)
    with ProcessPoolExecutor(gpus, mp_context=mp.get_context("spawn"), initializer=_claim_gpu,
                             initargs=(queue,)) as pool:
        return [s for _, s in pool.map(_gpu_job, *zip(*[a + (None, dataset_name, watch) for a in args]))]


def _on_submitit(args: list[tuple], out_dir: Path, options: LaunchOptions, dataset_name) -> tuple[list, list[str]]:
    try:
        import submitit
    except ImportError:
        raise LinftError("the slurm launcher needs submitit; pip install submitit (or linft[slurm])") from None
    cluster = "local" if options.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=out_dir / "submitit" / "%j", cluster=cluster)
    params = dict(options.slurm or {})
    params.setdefault("timeout_min", 24 * 60)
    params.setdefault("name", "linft-finetune")
    executor.update_parameters(**params)
    job_device = "auto" if options.launcher == "slurm" else options.device
    watch = {"log": options.say is not None, "progress": options.progress, "tensorboard_dir": options.tensorboard_dir}
    jobs = executor.map_array(_job, *zip(*[a + (job_device, dataset_name, watch) for a in args]))
    if options.say:
        options.say(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs[:5])}"
                    f"{' ...' if len(jobs) > 5 else ''}; logs in {out_dir / 'submitit'}")
    statuses = []
    for j in jobs if options.wait else []:
        try:
            statuses.append(j.result()[1])
        except Exception as exc:  # a failed job is reported, the others still count
            first = str(exc).strip().splitlines()
            statuses.append(f"failed: {first[-1] if first else type(exc).__name__}")
    return jobs, statuses


def launch_sweep(dataset: MultiDomainDataset, out_dir, runs: list[FineTuneRun], *, backbone: str = "resnet50",
                 weights="DEFAULT", config: FineTuneConfig = FineTuneConfig(),
                 options: LaunchOptions = LaunchOptions()) -> dict:
    """Run ``runs`` as ``options`` say; returns ``{"submitted": n, "skipped": n, "jobs": [...], "statuses": [...],
    "usable": n, "divergence": line or None}`` (``statuses``: of the runs this call launched, whatever the launcher;
    ``usable``: runs whose final record is ``ok``; ``divergence``: one line on the runs that diverged,
    :func:`linft.train.sweeps.status.divergence_note`). Every run is added to
    ``out_dir/planned.json`` first when some are not done (``linft status`` counts those not started as to do)."""
    say = options.say or (lambda _line: None)
    config.check()
    if options.launcher not in LAUNCHERS:
        raise LinftError(f"unknown launcher '{options.launcher}'; use one of {', '.join(LAUNCHERS)}")
    if options.launcher == "slurm" and shutil.which("srun") is None:  # what submitit looks for, with a traceback
        raise LinftError("the slurm launcher needs Slurm, but its srun command is not found on this machine; run "
                         "from a Slurm login node, or use launcher 'local' (or 'submitit-local') here")
    check_runs(runs, config, options.across_runs)
    check_output_apart(out_dir, [dataset.root], param="out_dir")
    hooks = watch_hooks(options.say, options.tensorboard_dir)  # a missing tensorboard package fails here, early
    out_dir = Path(out_dir)
    bb = load_backbone(backbone, weights)
    bb.check_image_size(config.image_size)
    backbone = bb.name  # resolved, as train_run records it
    folders = [RunFolder.of(out_dir, run_identity(r, backbone, bb.weights_sha256, dataset.file_list_sha256, config))
               for r in runs]
    labels = [finetune_label(r, bb.weights, config) for r in runs]
    with output_lock(out_dir, folder=True):  # creates the folder; a second identical launch refuses
        done_before = [f.is_done() for f in folders]
        eval_images = None
        if not all(done_before):
            write_plan(out_dir, {f.run_id: {"label": label, "test_domain": r.test_domain, "seed": r.seed,
                                            "grid": {"lr": r.lr, "weight_decay": r.weight_decay}}
                                 for r, f, label in zip(runs, folders, labels)})
        jobs, statuses = [], []
        if options.launcher == "local" and options.gpus <= 1:
            result = finetune(dataset, out_dir, runs=runs, backbone=backbone, weights=weights, config=config,
                              device=options.device, progress=options.progress, hooks=hooks)
            todo = [r for r, before in zip(result.runs, done_before) if not before]
            statuses, eval_images = [r.status for r in todo], result.eval_images
        else:
            todo = [r for r, before in zip(runs, done_before) if not before]
            args = [(str(dataset.root), str(out_dir), asdict(r), backbone, weights, asdict(config)) for r in todo]
            say(f"{len(todo)} of {len(runs)} runs to do ({len(runs) - len(todo)} already done), "
                f"launcher {options.launcher}")
            if todo and options.launcher == "local":
                watch = {"log": options.say is not None, "tensorboard_dir": options.tensorboard_dir}
                statuses = _on_gpus(args, options.gpus, dataset.name, watch)
            elif todo:
                jobs, statuses = _on_submitit(args, out_dir, options, dataset.name)
        if options.across_runs and options.wait:
            evaluate_across_runs(dataset, out_dir, [f.root for f in folders], config=config, device=options.device,
                                 eval_images=eval_images or EvalImages(dataset, config.image_size,
                                                                       config.eval_batch_size, config.workers),
                                 say=options.say)
        finals = [f.final_status() for f in folders]
        diverged = [{"label": label, "lr": r.lr, "weight_decay": r.weight_decay}
                    for r, label, final in zip(runs, labels, finals) if final == "diverged"]
        return {"submitted": len(todo), "skipped": len(runs) - len(todo), "jobs": [j.job_id for j in jobs],
                "statuses": statuses, "usable": finals.count("ok"), "divergence": divergence_note(diverged, len(runs))}

"""Run a fine-tuning grid as independent, idempotent jobs: in this process, one process per GPU, or on Slurm.

Each run of :func:`linft.finetune.sweep_runs` is one job that calls
:func:`linft.finetune.train_run`; a run folder's ``done`` marker makes a
re-launch skip it and its checkpoint makes an interrupted job resume, so
launching the same sweep again completes only what is missing.

Launchers:

* ``local``: one run after the other in this process (``gpus`` > 1: one
  worker process per GPU, each taking the next run when it is free);
* ``slurm``: one Slurm job per run through submitit (a job array), the
  engine made for that; ``submitit-local`` is submitit's local executor (all
  jobs at once as local processes), used by the tests.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import multiprocessing as mp

from linft.data import load_image_folder
from linft.errors import LinftError
from linft.finetune import (DONE_FILE, EvalImages, FineTuneConfig, FineTuneRun, SweepResult, check_config,
                            evaluate_across_runs, finetune, run_folder, train_run)

LAUNCHERS = ("local", "slurm", "submitit-local")


def check_runs(runs: list[FineTuneRun], config: FineTuneConfig, across_runs: bool = False) -> None:
    """Refuse, before anything is launched, variants that do not combine."""
    if any(r.linearized and r.stochastic_depth for r in runs):
        raise LinftError("--linearized and --stochastic-depth do not combine; run them separately")
    if any(r.linearized for r in runs) and (config.trajectory or across_runs):
        raise LinftError("--ensembles is not available with --linearized (averaging linearized models is a different "
                         "model); run --linearized without --ensembles")


def _job(dataset_root: str, out_dir: str, run: dict, backbone: str, weights, config: dict, device: str,
         dataset_name: str | None = None):
    """One job: fine-tune (or resume, or skip) one run. Top-level so that it pickles."""
    cfg = dict(config)
    cfg["lr_milestones"] = tuple(cfg["lr_milestones"])
    result = train_run(load_image_folder(dataset_root, dataset_name), out_dir, FineTuneRun(**run), backbone=backbone,
                       weights=weights, config=FineTuneConfig(**cfg), device=device, progress=False)
    return result.run_id, result.status


_DEVICE = None


def _claim_gpu(queue) -> None:
    global _DEVICE
    _DEVICE = f"cuda:{queue.get()}"


def _gpu_job(*args):
    return _job(*args[:6], _DEVICE, *args[7:])


def launch_sweep(dataset, out_dir, runs: list[FineTuneRun], *, backbone: str = "resnet50", weights="DEFAULT",
                 config: FineTuneConfig = FineTuneConfig(), launcher: str = "local", device="auto",
                 gpus: int = 1, slurm: dict | None = None, wait: bool = True, across_runs: bool = False,
                 progress: bool = True, say: Callable[[str], None] | None = None) -> dict:
    """Run ``runs`` with ``launcher``; returns ``{"submitted": n, "skipped": n, "jobs": [...], "statuses": [...]}``.

    ``dataset`` is a loaded :class:`~linft.data.MultiDomainDataset`. ``slurm``
    holds submitit parameters for the ``slurm`` launcher (``slurm_partition``,
    ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ...). With ``wait``
    the call returns once every job has ended (needed for ``across_runs``).
    """
    say = say or (lambda _line: None)
    check_config(config)
    if launcher not in LAUNCHERS:
        raise LinftError(f"unknown launcher '{launcher}'; use one of {', '.join(LAUNCHERS)}")
    check_runs(runs, config, across_runs)
    out_dir = Path(out_dir)
    if launcher == "local" and gpus <= 1:
        result: SweepResult = finetune(dataset, out_dir, runs=runs, backbone=backbone, weights=weights, config=config,
                                       device=device, across_runs=across_runs, progress=progress, say=say)
        return {"submitted": len(runs) - result.count("done"), "skipped": result.count("done"), "jobs": [],
                "statuses": [r.status for r in result.runs]}

    from linft.backbones import load_backbone

    sha = load_backbone(backbone, weights).weights_sha256
    run_dirs = [run_folder(out_dir, r, backbone, sha, dataset.file_list_sha256, config) for r in runs]
    todo = [r for r, d in zip(runs, run_dirs) if not (d / DONE_FILE).exists()]
    args = [(str(dataset.root), str(out_dir), asdict(r), backbone, weights, asdict(config)) for r in todo]
    say(f"{len(todo)} of {len(runs)} runs to do ({len(runs) - len(todo)} already done), launcher {launcher}")
    statuses, jobs = [], []
    if todo and launcher == "local":
        queue = mp.get_context("spawn").Manager().Queue()
        for i in range(gpus):
            queue.put(i)
        with ProcessPoolExecutor(gpus, mp_context=mp.get_context("spawn"), initializer=_claim_gpu,
                                 initargs=(queue,)) as pool:
            statuses = [s for _, s in pool.map(_gpu_job, *zip(*[a + (None, dataset.name) for a in args]))]
    elif todo:
        try:
            import submitit
        except ImportError:
            raise LinftError("the slurm launcher needs submitit; pip install submitit (or linft[slurm])") from None
        folder = out_dir / "submitit" / "%j"
        executor = submitit.AutoExecutor(folder=folder, cluster="local" if launcher == "submitit-local" else "slurm")
        params = dict(slurm or {})
        params.setdefault("timeout_min", 24 * 60)
        params.setdefault("name", "linft-finetune")
        executor.update_parameters(**params)
        job_device = "auto" if launcher == "slurm" else device
        jobs = executor.map_array(_job, *zip(*[a + (job_device, dataset.name) for a in args]))
        say(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs[:5])}{' ...' if len(jobs) > 5 else ''}; "
            f"logs in {out_dir / 'submitit'}")
        if wait:
            statuses = []
            for j in jobs:
                try:
                    statuses.append(j.result()[1])
                except Exception as exc:  # a failed job is reported, the others still count
                    first = str(exc).strip().splitlines()
                    statuses.append(f"failed: {first[-1] if first else type(exc).__name__}")
    if across_runs and wait:
        evaluate_across_runs(dataset, out_dir, run_dirs, config=config, device=device,
                             eval_images=EvalImages(dataset, config.image_size, config.eval_batch_size,
                                                    config.workers), say=say)
    return {"submitted": len(todo), "skipped": len(runs) - len(todo), "jobs": [j.job_id for j in jobs],
            "statuses": statuses}


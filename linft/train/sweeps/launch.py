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

:func:`launch_sweep` is the one sweep call (``linft finetune`` and the demo); it writes the plan first and returns a
:class:`~linft.train.sweeps.result.LaunchResult`, one :class:`~linft.train.sweeps.result.RunStatus` per run. The
sweep folder's files are named by :class:`~linft.train.sweeps.folder.SweepFolder` (submitit's logs: ``submitit/``).
"""

from __future__ import annotations

import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import multiprocessing as mp

from linft.data.folders import MultiDomainDataset, check_output_apart, load_image_folder
from linft.data.images import EvalImages
from linft.errors import LinftError
from linft.locks import output_lock
from linft.train.finetune.across_runs import evaluate_across_runs
from linft.output import say_line
from linft.train.finetune.hooks import watch_hooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun
from linft.train.finetune.run import PlannedRun, finetune, plan_sweep, planned_runs, train_run
from linft.train.sweeps.folder import SweepFolder
from linft.train.sweeps.result import LaunchedRun, LaunchResult, RunStatus
from linft.train.sweeps.status import divergence_note

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
    """Refuse, before anything is launched, settings that do not combine with the runs (each run checks itself)."""
    if any(r.linearized for r in runs) and (config.trajectory or across_runs):
        raise LinftError("ensembles are not available with linearized=True (averaging linearized models is a "
                         "different model); run linearized runs without ensembles", param="ensembles")


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


def _on_submitit(args: list[tuple], sweep: SweepFolder, options: LaunchOptions,
                 dataset_name) -> tuple[list, list[tuple[RunStatus, str | None]]]:
    """Submit one job per run; with ``options.wait``, each run's status (and the last line of a failed job's
    error), else none."""
    try:
        import submitit
    except ImportError:
        raise LinftError("the slurm launcher needs submitit; pip install submitit (or linft[slurm])") from None
    cluster = "local" if options.launcher == "submitit-local" else "slurm"
    executor = submitit.AutoExecutor(folder=sweep.submitit_jobs, cluster=cluster)
    params = dict(options.slurm or {})
    params.setdefault("timeout_min", 24 * 60)
    params.setdefault("name", "linft-finetune")
    executor.update_parameters(**params)
    job_device = "auto" if options.launcher == "slurm" else options.device
    watch = {"log": options.say is not None, "progress": options.progress, "tensorboard_dir": options.tensorboard_dir}
    jobs = executor.map_array(_job, *zip(*[a + (job_device, dataset_name, watch) for a in args]))
    if options.say:
        options.say(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs[:5])}"
                    f"{' ...' if len(jobs) > 5 else ''}; logs in {sweep.submitit}")
    statuses = []
    for j in jobs if options.wait else []:
        try:
            statuses.append((RunStatus(j.result()[1]), None))
        except Exception as exc:  # a failed job is reported, the others still count
            statuses.append((RunStatus.FAILED, _failure_line(exc)))
    return jobs, statuses


def _failure_line(exc: Exception) -> str:
    """Why a job failed, in one line: the last line of the job's traceback (submitit puts it between two rules of
    dashes, before the paths of the job's logs), else the error's last line, else its type."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    if len(rules) >= 2:
        lines = lines[rules[0] + 1:rules[1]]
    lines = [line for line in lines if line]
    return lines[-1] if lines else type(exc).__name__


def _check_launch(runs: list[FineTuneRun], config: FineTuneConfig, options: LaunchOptions) -> None:
    """Refuse a launch that cannot run, before anything is written."""
    config.check()
    if options.launcher not in LAUNCHERS:
        raise LinftError(f"unknown launcher '{options.launcher}'; use one of {', '.join(LAUNCHERS)}", param="launcher")
    if options.launcher == "slurm" and shutil.which("srun") is None:  # what submitit looks for, with a traceback
        raise LinftError("the slurm launcher needs Slurm, but its srun command is not found on this machine; run "
                         "from a Slurm login node, or use launcher 'local' (or 'submitit-local') here")
    check_runs(runs, config, options.across_runs)


def _run_elsewhere(dataset: MultiDomainDataset, sweep: SweepFolder, todo: list[FineTuneRun], backbone: str, weights,
                   config: FineTuneConfig, options: LaunchOptions) -> tuple[list, list[tuple[RunStatus, str | None]]]:
    """The runs ``todo`` on several local GPUs or through submitit: the jobs and, when waited for, each run's
    status (submitted runs not waited for: :attr:`RunStatus.SUBMITTED`)."""
    args = [(str(dataset.root), str(sweep.root), asdict(r), backbone, weights, asdict(config)) for r in todo]
    if not todo:
        return [], []
    if options.launcher == "local":
        watch = {"log": options.say is not None, "tensorboard_dir": options.tensorboard_dir}
        return [], [(RunStatus(s), None) for s in _on_gpus(args, options.gpus, dataset.name, watch)]
    jobs, statuses = _on_submitit(args, sweep, options, dataset.name)
    return jobs, statuses if options.wait else [(RunStatus.SUBMITTED, None)] * len(todo)


def launch_sweep(dataset: MultiDomainDataset, out_dir, runs: list[FineTuneRun], *, backbone: str = "resnet50",
                 weights="DEFAULT", config: FineTuneConfig = FineTuneConfig(),
                 options: LaunchOptions = LaunchOptions()) -> LaunchResult:
    """Run ``runs`` as ``options`` say (in this process, one process per local GPU, or one submitit job per run);
    the one sweep call of ``linft finetune`` and the demo. Every run is added to ``out_dir/planned.json`` first when
    some are not done (:func:`linft.train.finetune.run.plan_sweep`), so ``linft status`` counts those not started as
    to do. Returns one typed outcome per run (:class:`~linft.train.sweeps.result.LaunchResult`); with
    ``options.across_runs`` (and ``wait``), also evaluates the ensembles and soups across the runs."""
    _check_launch(runs, config, options)
    check_output_apart(out_dir, [dataset.root], param="out_dir")
    hooks = watch_hooks(options.say, options.tensorboard_dir)  # a missing tensorboard package fails here, early
    sweep = SweepFolder(out_dir)
    planned = planned_runs(dataset, sweep.root, runs, backbone=backbone, weights=weights, config=config)
    with output_lock(sweep.root, folder=True):  # creates the folder; a second identical launch refuses
        done_before = plan_sweep(sweep.root, planned)
        todo = [r for r, before in zip(runs, done_before) if not before]
        jobs, eval_images = [], None
        if options.launcher == "local" and options.gpus <= 1:
            inline = finetune(dataset, sweep.root, runs=runs, backbone=backbone, weights=weights, config=config,
                              device=options.device, progress=options.progress, hooks=hooks)
            statuses = [(RunStatus(o.status), None) for o, before in zip(inline.runs, done_before) if not before]
            eval_images = inline.eval_images
        else:
            if options.say:
                options.say(f"{len(todo)} of {len(runs)} runs to do ({len(runs) - len(todo)} already done), "
                            f"launcher {options.launcher}")
            jobs, statuses = _run_elsewhere(dataset, sweep, todo, backbone, weights, config, options)
        across = None
        if options.across_runs and options.wait:
            eval_images = eval_images or EvalImages(dataset, config.image_size, config.eval_batch_size, config.workers)
            across = evaluate_across_runs(dataset, sweep.root, [p.folder.root for p in planned], config=config,
                                          device=options.device, eval_images=eval_images, say=options.say)
        return _result(sweep, planned, done_before, statuses, jobs, across, eval_images)


def _result(sweep: SweepFolder, planned: list[PlannedRun], done_before: list[bool], statuses, jobs, across,
            eval_images) -> LaunchResult:
    """The typed outcome: runs done before are DONE, the others take their job's status, in order."""
    launched = iter(statuses)
    finals = [p.folder.final_status() for p in planned]
    outcomes = []
    for p, before, final in zip(planned, done_before, finals):
        status, detail = (RunStatus.DONE, None) if before else next(launched)
        outcomes.append(LaunchedRun(p.run, p.folder.run_id, p.folder.root, status, final, detail))
    diverged = [{"label": p.label, "lr": p.run.lr, "weight_decay": p.run.weight_decay}
                for p, final in zip(planned, finals) if final == "diverged"]
    return LaunchResult(sweep.root, outcomes, [j.job_id for j in jobs], finals.count("ok"),
                        divergence_note(diverged, len(planned)), across, eval_images)

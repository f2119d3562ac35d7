"""Training: the linear engine and its protocol driver (:mod:`linft.train.linear`), fine-tuning runs, their folders,
ensembles and soups (:mod:`linft.train.finetune`), sweeps and launchers (:mod:`linft.train.sweeps`), and pretraining.

Every method writes run records through :mod:`linft.protocol.records`; the
analysis of those records is :mod:`linft.analysis`. The names below are re-exported from those rooms (the
fine-tuning sweep is ``linft.train.finetune.finetune``: ``linft.train.finetune`` is its package).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "finetune.across_runs": ["evaluate_across_runs"],
    "finetune.ensembles": ["ENSEMBLE_RULES", "RunningEnsemble", "ensemble_scores"],
    "finetune.run": ["RunOutcome", "SweepResult", "run_identity", "sweep_runs", "train_run"],
    "finetune.selected": ["load_selected", "save_selected"],
    "finetune.model": ["FineTuneConfig", "FineTuneRun", "build_run_model", "train_step"],
    "linear.driver": ["LinearGrid", "LinearProtocolResult", "train_linear"],
    "linear.engine": ["GridPoint", "Group", "LinearData", "LinearGridConfig", "train_linear_grid"],
    "pretrain": ["PretrainConfig", "pretrain"],
    "finetune.run_folder": ["RunFolder"],
    "finetune.hooks": ["EvalEvent", "RunHooks", "watch_hooks"],
    "sweeps.status": ["sweep_status"],
    "sweeps.launch": ["LAUNCHERS", "LaunchOptions", "launch_sweep"],
    "sweeps.folder": ["SweepFolder"],
    "sweeps.result": ["LaunchResult", "RunStatus"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

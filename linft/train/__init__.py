"""Training: the linear engine and its protocol driver, fine-tuning runs and their folders, ensembles and soups,
sweeps and launchers, and pretraining from scratch.

Every method writes run records through :mod:`linft.protocol.records`; the
analysis of those records is :mod:`linft.analysis`.
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "across_runs": ["evaluate_across_runs"],
    "ensembles": ["ENSEMBLE_RULES", "RunningEnsemble", "ensemble_scores"],
    "finetune": ["RunOutcome", "SweepResult", "finetune", "load_selected", "run_identity", "sweep_runs", "train_run"],
    "finetune_model": ["FineTuneConfig", "FineTuneRun", "build_run_model", "train_step"],
    "linear": ["LinearGrid", "LinearProtocolResult", "train_linear"],
    "linear_engine": ["GridPoint", "Group", "LinearData", "LinearGridConfig", "train_linear_grid"],
    "pretrain": ["PretrainConfig", "pretrain"],
    "run_folder": ["RunFolder"],
    "run_hooks": ["EvalEvent", "RunHooks", "watch_hooks"],
    "status": ["sweep_status"],
    "sweep": ["LAUNCHERS", "LaunchOptions", "launch_sweep"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

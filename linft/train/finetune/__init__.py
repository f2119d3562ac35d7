"""Full fine-tuning: one run (``run``), its network and step (``model``), its folder (``run_folder``), its
selected model (``selected``) and hooks (``hooks``), trajectory ensembles and averages (``trajectory``), LP-FT
(``lp_ft``), ensemble rules (``ensembles``) and ensembles and soups across runs (``across_runs``).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "run": ["RunOutcome", "SweepResult", "finetune", "run_identity", "sweep_runs", "train_run", "default_finetune_out"],
    "selected": ["load_selected", "save_selected"],
    "model": ["FineTuneConfig", "FineTuneRun", "build_run_model", "train_step"],
    "run_folder": ["RunFolder"],
    "hooks": ["EvalEvent", "RunHooks", "watch_hooks"],
    "across_runs": ["evaluate_across_runs"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

"""Training: the linear engine and its protocol driver, fine-tuning runs and their folders, ensembles and soups,
sweeps and launchers, and pretraining from scratch.

Every method writes run records through :mod:`linft.protocol.records`; the
analysis of those records is :mod:`linft.analysis`.
"""

from linft.train.across_runs import evaluate_across_runs
from linft.train.ensembles import ENSEMBLE_RULES, RunningEnsemble, ensemble_scores
from linft.train.finetune import EvalEvent, RunHooks, RunOutcome, SweepResult, finetune, sweep_runs, train_run
from linft.train.finetune_model import FineTuneConfig, FineTuneRun, build_run_model, train_step
from linft.train.linear import LinearGrid, LinearProtocolResult, train_linear
from linft.train.linear_engine import GridPoint, Group, LinearData, LinearGridConfig, train_linear_grid
from linft.train.pretrain import PretrainConfig, pretrain
from linft.train.run_folder import RunFolder, load_selected
from linft.train.sweep import LAUNCHERS, LaunchOptions, launch_sweep

__all__ = ["evaluate_across_runs", "ENSEMBLE_RULES", "RunningEnsemble", "ensemble_scores", "EvalEvent", "RunHooks",
           "RunOutcome", "SweepResult", "finetune", "sweep_runs", "train_run", "FineTuneConfig", "FineTuneRun",
           "build_run_model", "train_step", "LinearGrid", "LinearProtocolResult", "train_linear", "GridPoint",
           "Group", "LinearData", "LinearGridConfig", "train_linear_grid", "PretrainConfig", "pretrain", "RunFolder",
           "load_selected", "LAUNCHERS", "LaunchOptions", "launch_sweep"]

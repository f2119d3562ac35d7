"""Sweeps: the files of a sweep folder (``folder``), its plan (``plan``), how far it got (``status``), and the one
launcher call that runs a sweep's runs (``launch``: in this process, local GPUs, Slurm through submitit) with its
typed result (``result``).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "folder": ["SweepFolder"],
    "plan": ["read_plan_file", "write_plan"],
    "status": ["sweep_status", "describe_status"],
    "launch": ["LAUNCHERS", "LaunchOptions", "launch_sweep"],
    "result": ["LaunchResult", "LaunchedRun", "RunStatus"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

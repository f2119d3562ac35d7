"""Sweeps: what a sweep folder holds and how far it got (``status``), and the launchers that run a sweep's runs
(``launch``: local GPUs, Slurm through submitit).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "status": ["sweep_status", "describe_status"],
    "launch": ["LAUNCHERS", "LaunchOptions", "launch_sweep"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

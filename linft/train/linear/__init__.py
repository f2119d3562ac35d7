"""Linear fine-tuning from a feature cache: the protocol driver (``driver``), the engine that trains a whole grid at
once (``engine``), its steps (``step``), random draws (``draws``), evaluation (``evaluate``) and the model's pure
functions (``model``). The compiled sparse step is :mod:`linft._kernels`.
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "driver": ["LinearGrid", "LinearProtocolResult", "train_linear", "default_linear_out"],
    "engine": ["EvalPoint", "GridPoint", "Group", "LinearData", "LinearGridConfig", "train_linear_grid"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

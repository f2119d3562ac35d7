"""Interpolation between a pretrained and a fine-tuned model (paper appendix A.1 and Figure 1), written as records:
the paths as functions (``paths``), the two ends (``endpoints``), the whole measurement of one run (``run``), what it
is asked and returns (``result``), and any two checkpoints on distribution folders (``checkpoints``).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "endpoints": ["Endpoints", "load_endpoints"],
    "run": ["interpolate"],
    "checkpoints": ["CheckpointInterpolateConfig", "CheckpointInterpolation", "interpolate_checkpoints"],
    "result": ["InterpolateConfig", "InterpolationResult"],
    "paths": ["first_order_outputs", "iter_weight_path", "parse_alphas", "pooled_features_and_logits",
              "representation_logits"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

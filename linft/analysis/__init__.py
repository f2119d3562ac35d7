"""Analysis: interpolation between a pretrained and a fine-tuned model, and everything computed from run records.

``interpolation_paths`` (the weight, representation and first-order paths as
functions), ``endpoints`` (the two ends of an interpolation), ``interpolate``
(the whole measurement, written as records) and ``interpolation_result`` (what
it is asked and what it returns), ``checkpoint_interpolation`` (Figure 1: any two
checkpoints on distribution folders), ``aggregate`` (selection per run, DomainBed's
table, the 1296 clouds), ``figures`` (what each figure draws, as data),
``plots`` and ``report``.
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "aggregate": ["SelectedRun", "best_grid_points", "cloud_points", "cloud_tables", "domainbed_table",
                  "missing_domains", "run_results", "table_markdown", "table_rows", "tie_counts"],
    "endpoints": ["Endpoints", "load_endpoints"],
    "interpolate": ["interpolate"],
    "checkpoint_interpolation": ["CheckpointInterpolateConfig", "CheckpointInterpolation", "interpolate_checkpoints"],
    "interpolation_result": ["InterpolateConfig", "InterpolationResult"],
    "interpolation_paths": ["first_order_outputs", "iter_weight_path", "parse_alphas", "pooled_features_and_logits",
                            "representation_logits"],
    "figures": ["FigurePoints", "dropout_points", "figure2_points", "figure9_points", "figure_role"],
    "plots": ["plot_clouds", "plot_dropout", "plot_figure1", "plot_figure9", "plot_interpolation", "save_figure"],
    "report": ["summary_tables", "write_report"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

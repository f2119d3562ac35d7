"""Analysis of run records only (no torch, no network): aggregation (``aggregate``: selection per run, DomainBed's
table, the 1296 clouds), what each figure draws as data (``figures``), ``plots`` and ``report``. DomainBed's
``model_selection.py`` + ``collect_results.py`` split: the producers of records are :mod:`linft.train` and
:mod:`linft.interpolation`.
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "aggregate": ["SelectedRun", "best_grid_points", "cloud_points", "cloud_tables", "domainbed_table",
                  "missing_domains", "run_results", "table_markdown", "table_rows", "tie_counts"],
    "figures": ["FigurePoints", "dropout_points", "figure2_points", "figure9_points", "figure_role"],
    "plots": ["plot_clouds", "plot_dropout", "plot_figure1", "plot_figure9", "plot_interpolation", "save_figure"],
    "report": ["summary_tables", "write_report"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

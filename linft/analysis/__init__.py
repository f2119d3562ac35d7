"""Analysis: interpolation between a pretrained and a fine-tuned model, and everything computed from run records.

``interpolation_paths`` (the weight, representation and first-order paths as
functions), ``endpoints`` (the two ends of an interpolation), ``interpolate``
(the whole measurement, written as records), ``aggregate`` (selection per run,
DomainBed's table, the 1296 clouds), ``figures`` (what each figure draws, as data), ``plots``
and ``report``.
"""

from linft.analysis.aggregate import (SelectedRun, cloud_points, cloud_tables, domainbed_table, missing_domains,
                                      run_results, table_markdown, table_rows)
from linft.analysis.endpoints import Endpoints, load_endpoints
from linft.analysis.interpolate import InterpolateConfig, InterpolationResult, interpolate
from linft.analysis.interpolation_paths import (first_order_outputs, iter_weight_path, parse_alphas,
                                                pooled_features_and_logits, representation_logits)
from linft.analysis.figures import FigurePoints, dropout_points, figure2_points, figure9_points, figure_role
from linft.analysis.plots import plot_clouds, plot_dropout, plot_figure9, plot_interpolation, save_figure
from linft.analysis.report import summary_tables, write_report

__all__ = ["SelectedRun", "cloud_points", "cloud_tables", "domainbed_table", "missing_domains", "run_results",
           "table_markdown", "table_rows", "Endpoints", "load_endpoints", "InterpolateConfig", "InterpolationResult",
           "interpolate", "first_order_outputs", "iter_weight_path", "parse_alphas", "pooled_features_and_logits",
           "representation_logits", "FigurePoints", "dropout_points", "figure2_points", "figure9_points",
           "figure_role", "plot_clouds", "plot_dropout", "plot_figure9", "plot_interpolation", "save_figure",
           "summary_tables", "write_report"]

"""The protocol as data: schedule, the grid and its validator, run identity, THE run-record schema, and selection.

``schedule`` (:class:`Schedule`, the paper's and DomainNet's, lr at a step,
evaluation steps), ``grid`` (:class:`Grid`, the paper's grid, the one grid
validator), ``identity`` (the one run-id recipe, the one header builder, the
schema version), ``records`` (the one record builder, writer and reader, and the
one "skip what is done" rule), ``selection`` (i.i.d. and o.o.d. accuracy,
best-i.i.d. and oracle selection, mean ± SE).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "grid": ["DOMAINNET_LRS", "PAPER_GRID", "Grid", "GridPoint", "check_dropout_rate", "check_grid",
             "check_test_domains"],
    "identity": ["SCHEMA_VERSION", "RunHeader", "image_source", "run_header", "run_id"],
    "records": ["RECORDS_FILE", "RecordWriter", "finished_run_ids", "make_record", "read_records"],
    "schedule": ["DOMAINNET", "PAPER", "Schedule", "eval_steps", "lr_at", "milestone_steps"],
    "selection": ["SELECTIONS", "group_runs", "iid_accuracy", "mean_and_se", "ood_accuracy", "predicted_classes",
                  "select_by_iid", "select_oracle", "split_counts"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

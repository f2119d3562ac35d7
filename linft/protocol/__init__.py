"""The protocol: schedule, the grid and its validator, THE run-record schema, and selection on records.

``schedule`` (lr at a step, evaluation steps), ``grid`` (the one grid
validator), ``records`` (the one record builder, writer and reader, and the
one "skip what is done" rule), ``selection`` (i.i.d. and o.o.d. accuracy,
best-i.i.d. and oracle selection, mean ± SE).
"""

from linft.lazy import lazy_exports

#: submodule -> the names this package re-exports from it (imported on first use)
_EXPORTS = {
    "grid": ["check_grid", "check_test_domains"],
    "records": ["RECORDS_FILE", "RecordWriter", "RunHeader", "finished_run_ids", "make_record", "read_records",
                "run_id"],
    "schedule": ["eval_steps", "lr_at", "milestone_steps"],
    "selection": ["SELECTIONS", "group_runs", "iid_accuracy", "mean_and_se", "ood_accuracy", "select_by_iid",
                  "select_oracle", "split_counts"],
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(n for names in _EXPORTS.values() for n in names)

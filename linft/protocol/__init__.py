"""The protocol: schedule, the grid and its validator, THE run-record schema, and selection on records.

``schedule`` (lr at a step, evaluation steps), ``grid`` (the one grid
validator), ``records`` (the one record builder, writer and reader, and the
one "skip what is done" rule), ``selection`` (i.i.d. and o.o.d. accuracy,
best-i.i.d. and oracle selection, mean ± SE).
"""

from linft.protocol.grid import check_grid, check_test_domains
from linft.protocol.records import (RECORDS_FILE, RecordWriter, RunHeader, finished_run_ids, make_record,
                                    read_records, run_id)
from linft.protocol.schedule import eval_steps, lr_at, milestone_steps
from linft.protocol.selection import (SELECTIONS, group_runs, iid_accuracy, mean_and_se, ood_accuracy, select_by_iid,
                                      select_oracle, split_counts)

__all__ = ["check_grid", "check_test_domains", "RECORDS_FILE", "RecordWriter", "RunHeader", "finished_run_ids",
           "make_record", "read_records", "run_id", "eval_steps", "lr_at", "milestone_steps", "SELECTIONS",
           "group_runs", "iid_accuracy", "mean_and_se", "ood_accuracy", "select_by_iid", "select_oracle",
           "split_counts"]

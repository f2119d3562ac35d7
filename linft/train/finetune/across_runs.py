"""Ensembles and weight averages across the runs of a grid: the paper's ensembles, model soups and greedy soups.

Per (label, held-out domain, seed), over the selected (best-i.i.d.) models of
every grid run: the uniform output ensemble, the uniform weight average
(model soup / DiWA) and the greedy soup (models in order of decreasing i.i.d.
accuracy, ties as model-soups' code orders them: the later-listed run first;
each kept when the i.i.d. accuracy does not drop). Each is evaluated on every
split and written as one final record to ``OUT/across_runs/records.jsonl``;
groups already there are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from linft.data.folders import MultiDomainDataset
from linft.data.images import EvalImages
from linft.data.splits import domain_split_rows, split_seed
from linft.locks import output_lock
from linft.models.averaging import average_state_dicts, greedy_soup, soup_order
from linft.models.heads import build_classifier
from linft.models.registry import load_backbone
from linft.protocol.identity import RunHeader, run_header, run_id
from linft.protocol.records import RecordWriter, derived, finished_run_ids, make_record
from linft.protocol.selection import iid_accuracy, predicted_classes, split_counts
from linft.runtime import resolve_device
from linft.train.finetune.ensembles import ensemble_scores
from linft.train.finetune.model import FineTuneConfig, predict_logits
from linft.train.finetune.run_folder import RunFolder
from linft.train.finetune.selected import load_selected
from linft.train.sweeps.folder import SweepFolder

KINDS = ("ensemble", "soup", "greedy-soup")


def _groups(run_dirs) -> dict[tuple, list[tuple[dict, dict]]]:
    """Selected models ``(state, metadata)`` of the finished runs per (label, held-out domain, seed), by decreasing
    i.i.d. accuracy, tied runs in model-soups' order (:func:`~linft.models.averaging.soup_order`: the later of
    ``run_dirs`` first). Unfinished and diverged runs take no part (an ensemble's record is final, never redone)."""
    groups: dict[tuple, list[tuple[dict, dict]]] = {}
    for folder in map(RunFolder, map(Path, run_dirs)):
        if folder.final_status() == "ok" and folder.selected.exists():  # finished runs only: an ensemble is final
            state, meta = load_selected(folder.root)
            groups.setdefault((meta["label"], meta["test_domain"], meta["seed"]), []).append((state, meta))
    return {key: [members[i] for i in soup_order([m[1]["iid"] for m in members])] for key, members in groups.items()}


class _Scorer:
    """Evaluates state_dicts of one architecture on every split of one (held-out domain, seed)."""

    def __init__(self, dataset: MultiDomainDataset, meta: dict, config: FineTuneConfig, eval_images, dev):
        names = dataset.domains
        self.dataset, self.config, self.eval_images, self.dev = dataset, config, eval_images, dev
        self.split_rows = domain_split_rows(dataset.domain_ids, len(names),
                                            split_seed(meta["seed"], meta.get("hparams")))
        self.train_domains = [d for d in names if d != meta["test_domain"]]
        self.net = build_classifier(load_backbone(meta["backbone"], "none").model, len(dataset.classes), 0.0).to(dev)

    def logits(self, state: dict) -> torch.Tensor:
        self.net.load_state_dict(state, strict=True)
        return predict_logits(self.net, self.eval_images, self.dev, self.config.precision, False)

    def counts(self, logits: torch.Tensor) -> dict | None:
        """``[correct, total]`` per split of ``logits``; None when they are not all finite (a diverged record)."""
        return split_counts(predicted_classes(logits), self.dataset.labels, self.split_rows, self.dataset.domains)

    def iid(self, state: dict) -> float:
        """The i.i.d. accuracy of ``state``; -inf (never kept by the greedy soup) when its logits are not finite."""
        splits = self.counts(self.logits(state))
        return float("-inf") if splits is None else iid_accuracy({"splits": splits,
                                                                  "train_domains": self.train_domains})


def _results(scorer: _Scorer, states: list[dict], rule: str) -> tuple[dict, list[int]]:
    outputs = torch.stack([scorer.logits(s) for s in states])
    results = {"ensemble": scorer.counts(ensemble_scores(outputs, rule)),
               "soup": scorer.counts(scorer.logits(average_state_dicts(states)))}
    soup_state, chosen, _ = greedy_soup(states, scorer.iid)
    results["greedy-soup"] = scorer.counts(scorer.logits(soup_state))
    return results, chosen


def _header(meta: dict, kind: str, rid: str, hparams: dict) -> RunHeader:
    method, label = derived(meta["method"], meta["label"], kind)
    return run_header(method, label, run_id=rid, source=meta["source"], dataset=meta["dataset"],
                      backbone=meta["backbone"], weights=meta["weights"], test_domain=meta["test_domain"],
                      train_domains=meta["train_domains"], hparams=hparams, grid={}, seed=meta["seed"])


def evaluate_across_runs(dataset: MultiDomainDataset, out_dir, run_dirs, *, config: FineTuneConfig = FineTuneConfig(),
                         device="auto", eval_images: EvalImages | None = None,
                         say: Callable[[str], None] | None = None) -> Path:
    """Ensembles, soups and greedy soups of the selected models of ``run_dirs``; returns the records file."""
    dev = resolve_device(device)
    path = SweepFolder(out_dir).across_runs_records
    with output_lock(path.parent, folder=True):  # one writer of these records (creates the folder)
        done = finished_run_ids([path])
        eval_images = eval_images or EvalImages(dataset, config.image_size, config.eval_batch_size, config.workers)
        with RecordWriter(path) as writer:
            for (label, test_domain, seed), members in sorted(_groups(run_dirs).items(), key=lambda kv: kv[0]):
                member_ids = [m[1]["run_id"] for m in members]
                ids = {kind: run_id(None, None, {"across": kind, "members": sorted(member_ids),
                                                 "rule": config.ensemble_rule if kind == "ensemble" else None})
                       for kind in KINDS}  # no method nor source: release 0.2's recipe
                if all(i in done for i in ids.values()):
                    continue
                if say:
                    say(f"ensembles and soups of {len(members)} runs: {label}, held out {test_domain}, seed {seed}")
                scorer = _Scorer(dataset, members[0][1], config, eval_images, dev)
                results, chosen = _results(scorer, [s for s, _ in members], config.ensemble_rule)
                for kind, splits in results.items():
                    if ids[kind] not in done:
                        rule = config.ensemble_rule if kind == "ensemble" else None
                        hparams = {"members": len(members), "rule": rule,
                                   "chosen": chosen if kind == "greedy-soup" else None}
                        writer.write(make_record(_header(members[0][1], kind, ids[kind], hparams), 0, splits,
                                                 final=True, members=member_ids))
        return path

"""The greedy soup's candidate order is model-soups' (issue 20, section 7): decreasing held-out accuracy, and
among ties the later-listed model first, as its main.py sorts (ascending, stable) and then reverses."""

import operator
import random
from pathlib import Path

import torch

import linft.train.finetune.across_runs as across_runs
from linft.models.averaging import soup_order


def model_soups_order(accuracies: list[float]) -> list[int]:
    """model-soups' main.py, step 4, transcribed: names -> accuracy, sorted by accuracy, reversed."""
    individual_model_val_accs = {f"model_{i}": a for i, a in enumerate(accuracies)}
    individual_model_val_accs = sorted(individual_model_val_accs.items(), key=operator.itemgetter(1))
    individual_model_val_accs.reverse()
    return [int(name.split("_")[1]) for name, _ in individual_model_val_accs]


def test_soup_order_known_answer_with_ties():
    assert soup_order([0.5, 0.7, 0.7, 0.6, 0.7, 0.5]) == [4, 2, 1, 3, 5, 0]
    assert soup_order([0.9]) == [0] and soup_order([]) == []
    assert soup_order([0.8, 0.8]) == [1, 0]  # the tie: the later-listed model first


def test_soup_order_is_model_soups_order_on_many_tied_lists():
    rng = random.Random(0)
    for _ in range(500):
        scores = [rng.choice([0.25, 0.5, 0.75]) for _ in range(rng.randint(1, 9))]  # ties in almost every list
        assert soup_order(scores) == model_soups_order(scores)


class _Folder:
    def __init__(self, root):
        self.root = root
        self.selected = Path(__file__)  # exists

    def final_status(self):
        return "ok"


def test_across_run_groups_list_tied_runs_in_model_soups_order(monkeypatch):
    """Runs listed in grid order with i.i.d. accuracies 0.6, 0.8, 0.8, 0.7: the greedy soup's candidates are
    run 2, run 1 (the tie, later-listed first), run 3, run 0. Today's order kept run order among ties (1, 2)."""
    iids = {"r0": 0.6, "r1": 0.8, "r2": 0.8, "r3": 0.7}
    monkeypatch.setattr(across_runs, "RunFolder", _Folder)
    monkeypatch.setattr(across_runs, "load_selected", lambda root: (
        {"w": torch.zeros(1)}, {"label": "m", "test_domain": "a", "seed": 0, "iid": iids[root.name], "run": root.name}))
    groups = across_runs._groups(list(iids))
    assert [meta["run"] for _, meta in groups[("m", "a", 0)]] == ["r2", "r1", "r3", "r0"]

"""`--help` of every command says which options repeat (click ``multiple=True``)."""

from __future__ import annotations

import importlib

import click
from click.testing import CliRunner

from linft.cli.main import COMMANDS, main
from linft.cli.options import repeatable


def every_command():
    """``(path, command)`` of every command, group and subcommand of ``linft``, at any depth."""
    def walk(path, cmd):
        subs = cmd.commands.items() if isinstance(cmd, click.Group) else []
        return [(path, cmd)] + [pair for sub, c in subs for pair in walk(f"{path} {sub}", c)]

    return [pair for name, (module, attribute) in sorted(COMMANDS.items())
            for pair in walk(name, getattr(importlib.import_module(f"linft.cli.{module}"), attribute))]


def test_every_repeatable_option_says_so_in_its_help():
    repeating = [(path, o) for path, cmd in every_command() for o in cmd.params
                 if isinstance(o, click.Option) and o.multiple]
    assert len(repeating) >= 9  # finetune: dropout, lr, weight decay, milestones, domains; train-linear: 4
    missing = [f"{path} {o.opts[0]}" for path, o in repeating if "repeatable" not in (o.help or "").lower()]
    assert not missing, f"multiple=True options whose help does not say 'repeatable': {missing}"


def test_the_help_shows_it_with_an_example():
    assert repeatable("Learning rates.", "--lr 1e-3 --lr 5e-4") == "Learning rates. Repeatable: --lr 1e-3 --lr 5e-4."
    text = CliRunner().invoke(main, ["train-linear", "--help"]).output
    assert "Repeatable: --lr 1e-3 --lr 5e-4" in " ".join(text.split())

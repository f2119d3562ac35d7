"""What several commands share: ``--precision`` (and the flags it replaced), the help of repeatable options, and
what a training command prints once its grid has run."""

from __future__ import annotations

import warnings

import click
from click.core import ParameterSource

from linft.analysis.report import summary_tables
from linft.output import json_text
from linft.protocol.grid import Grid
from linft.runtime import DEFAULT_PRECISION, PRECISIONS


def print_grid_outcome(record_paths, divergence: str | None, usable: int, as_json: bool) -> None:
    """After a grid: one line and exit 1 when every run diverged, a note when some did, then the table."""
    if divergence and not usable:
        click.echo(f"{divergence}: no usable result; try a smaller --lr", err=True)
        raise SystemExit(1)
    if divergence:
        click.echo(f"note: {divergence}; the table leaves them out", err=True)
    tables = summary_tables(record_paths)
    click.echo(json_text(tables["rows"], indent=2) if as_json else tables["markdown"])


def repeatable(text: str, example: str) -> str:
    """The help of a ``multiple=True`` option: ``text``, then that it repeats, with ``example``."""
    return f"{text} Repeatable: {example}."


def precision_option(note: str = ""):
    """``--precision {float32,bfloat16,float16}``: the same values and default for extract, finetune, interpolate."""
    return click.option("--precision", type=click.Choice(list(PRECISIONS)), default=DEFAULT_PRECISION,
                        show_default=True,
                        help="Autocast dtype of the forward passes on CUDA (float32: no autocast, as the official "
                             f"code); the CPU always computes in float32.{' ' + note if note else ''}")


def grid_options(seeds_help: str):
    """``--lr``, ``--weight-decay`` (repeatable, the paper's grid by default), ``--seeds`` and ``--split-seed``: the
    grid flags train-linear and finetune share; ``seeds_help`` says what a trial seed draws in that command."""
    grid = Grid()
    options = [
        click.option("--lr", "lrs", type=float, multiple=True, default=grid.lrs, show_default=True,
                     help=repeatable("Learning rates of the grid.", "--lr 1e-3 --lr 5e-4")),
        click.option("--weight-decay", "weight_decays", type=float, multiple=True, default=grid.weight_decays,
                     show_default=True,
                     help=repeatable("Weight decays of the grid.", "--weight-decay 1e-4 --weight-decay 1e-5")),
        click.option("--seeds", type=int, default=grid.seeds, show_default=True, help=seeds_help),
        split_seed_option(),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def split_seed_option():
    """``--split-seed N``: one data split for every seed (train-linear and finetune)."""
    return click.option("--split-seed", type=int, default=None,
                        help="Split the data with this trial seed for every seed (the official code: 0, one split for "
                             "all seeds). Default: each seed its own split, as DomainBed.")


def deprecated_precision_flag(flag: str, meaning: str):
    """A hidden flag of an earlier release that now means ``--precision meaning``."""
    return click.option(flag, "deprecated_flag", is_flag=True, hidden=True,
                        help=f"Deprecated: --precision {meaning}.")


def precision_of(precision: str, deprecated_flag: bool, flag: str, meaning: str) -> str:
    """The precision a command runs in: ``--precision``, or the meaning of a deprecated flag (with a warning)."""
    if not deprecated_flag:
        return precision
    source = click.get_current_context().get_parameter_source("precision")
    if source is not ParameterSource.DEFAULT and precision != meaning:
        raise click.UsageError(f"{flag} (deprecated) means --precision {meaning}; pass --precision alone")
    warnings.warn(f"{flag} is deprecated; use --precision {meaning}")
    return meaning

"""Options several commands share: ``--precision`` (and the flags it replaced), and the help of repeatable options."""

from __future__ import annotations

import warnings

import click
from click.core import ParameterSource

from linft.runtime import DEFAULT_PRECISION, PRECISIONS


def repeatable(text: str, example: str) -> str:
    """The help of a ``multiple=True`` option: ``text``, then that it repeats, with ``example``."""
    return f"{text} Repeatable: {example}."


def precision_option(note: str = ""):
    """``--precision {float32,bfloat16,float16}``: the same values and default for extract, finetune, interpolate."""
    return click.option("--precision", type=click.Choice(list(PRECISIONS)), default=DEFAULT_PRECISION,
                        show_default=True,
                        help="Autocast dtype of the forward passes on CUDA (float32: no autocast, as the official "
                             f"code); the CPU always computes in float32.{' ' + note if note else ''}")


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

"""``linft``: the command group. Each command lives in its own module and calls the library.

Command modules are imported only when their command runs (:data:`COMMANDS`), so
``linft --help`` and the analysis commands start without importing torch.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import signal
import sys
import warnings
from pathlib import Path

import click

from linft import __version__
from linft.cli.flags import in_flags
from linft.errors import HDF5WriteError, LinftError, worker_died


#: command -> (module in linft.cli, the command's function there).
COMMANDS = {
    "cache": ("cache", "cache"),
    "demo": ("demo", "demo"),
    "demo-data": ("demo", "demo_data"),
    "extract": ("extract", "extract"),
    "finetune": ("finetune", "finetune_cmd"),
    "interpolate": ("interpolate", "interpolate_cmd"),
    "pretrain": ("pretrain", "pretrain_command"),
    "pretrain-source": ("pretrain", "pretrain_source"),
    "report": ("report", "report"),
    "status": ("status", "status"),
    "train-linear": ("train_linear", "train_linear_cmd"),
}


def short_help(name: str) -> str:
    """The first paragraph of a command's docstring, read from its source without importing it (so no torch)."""
    module, function = COMMANDS[name]
    source = Path(importlib.util.find_spec(f"linft.cli.{module}").origin).read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == function)
    return " ".join(ast.get_docstring(node).split("\n\n")[0].split())


def _terminated(signum, frame):
    """SIGTERM handler: raise KeyboardInterrupt where the program is, so every ``finally`` runs."""
    raise KeyboardInterrupt


class LinftGroup(click.Group):
    """Loads each command's module when it runs; turns library errors into one line and exit 2, never a traceback."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(f"linft.cli.{module}"), attribute)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, short_help(name)) for name in sorted(COMMANDS)])

    def invoke(self, ctx):
        def one_line_warning(message, category, filename, lineno, file=None, line=None):
            click.echo(f"warning: {message}", err=True)

        warnings.showwarning = one_line_warning
        # Slurm's time limit and scancel send SIGTERM: leave through the same clean-up as Ctrl-C (locks released,
        # partial files closed), so that a resubmitted job, maybe on another host, resumes.
        signal.signal(signal.SIGTERM, _terminated)
        try:
            return super().invoke(ctx)
        except (LinftError, RuntimeError) as exc:
            error = exc if isinstance(exc, LinftError) else worker_died(exc)  # raised anywhere by torch's SIGCHLD
            if error is None:
                raise
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"Error: {in_flags(str(error), error.param, command)}", err=True)
            if isinstance(error, HDF5WriteError):  # HDF5 may crash at interpreter exit: leave without clean-up
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; re-run the same command to resume", err=True)
            ctx.exit(130)


@click.group(cls=LinftGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="linft")
def main():
    """linft: fine-tuning with very large dropout (Zhang & Bottou), from feature cache to report.

    \b
    Typical session:
      linft demo-data data/demo                        # a small procedural benchmark
      linft extract data/demo --backbone resnet18 --weights none --image-size 64
      linft cache info features_cache/demo_resnet18_none.h5
    """


if __name__ == "__main__":  # pragma: no cover
    main()

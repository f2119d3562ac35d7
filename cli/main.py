"""``linft``: the command group. Each command lives in its own module and calls the library.

Command modules are imported only when their command runs (:data:`COMMANDS`), so
``linft --help`` and the analysis commands start without importing torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from linft import __version__
from linft.errors import LinftError


#: command -> (module in linft.cli, attribute, one-line help shown by ``linft --help``).
COMMANDS = {
    "cache": ("cache", "cache", "Inspect feature caches written by `linft extract`."),
    "demo": ("demo", "demo", "Run linft end to end on the built-in benchmark (CPU, a few minutes, no download)."),
    "demo-data": ("demo", "demo_data", "Write the demo benchmark: 4 style domains x 7 shape classes as PNG files."),
    "extract": ("extract", "extract", "Cache the average-pooled outputs of the last residual blocks for every "
                                      "image of DATASET."),
    "finetune": ("finetune", "finetune_cmd", "Fine-tune a pretrained backbone leave-one-domain-out, with dropout "
                                             "on the penultimate layer."),
    "interpolate": ("interpolate", "interpolate_cmd", "Accuracy along the weight and representation paths from a "
                                                      "pretrained to a fine-tuned model (Figure 1)."),
    "pretrain": ("pretrain", "pretrain_command", "Train a backbone from scratch on DATA_DIR and save its state_dict "
                                                 "with metadata."),
    "pretrain-source": ("pretrain", "pretrain_source", "Write the pretraining source: 5 style domains x 16 shape "
                                                       "classes as PNG files."),
    "report": ("report", "report", "Tables (markdown, CSV) and plots (PNG) from RECORDS files or folders of any "
                                   "linft method."),
    "status": ("status", "status", "Show how many runs of a sweep are done, running, interrupted, diverged or still to "
                                   "do."),
    "train-linear": ("train_linear", "train_linear_cmd", "Train linear fine-tuning y = V(Σ v_k⊙φ_k) + b with "
                                                         "dropout over the whole protocol."),
}


class LinftGroup(click.Group):
    """Loads each command's module when it runs; turns library errors into one line and exit 2, never a traceback."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"linft.cli.{module}"), attribute)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in sorted(COMMANDS.items())])

    def invoke(self, ctx):
        def one_line_warning(message, category, filename, lineno, file=None, line=None):
            click.echo(f"warning: {message}", err=True)

        warnings.showwarning = one_line_warning
        try:
            return super().invoke(ctx)
        except LinftError as exc:
            click.echo(f"Error: {exc}", err=True)
            if exc.exit_at_once:  # see LinftError: HDF5 would crash at interpreter exit
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

"""``linft``: the command group. Each command lives in its own module and calls the library."""

from __future__ import annotations

import os
import sys
import warnings

import click

from linft import __version__
from linft.errors import LinftError


class LinftGroup(click.Group):
    """Turns library errors into one-line messages and a non-zero exit, never a traceback."""

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


def _register():
    from linft.cli import cache, demo, extract, finetune, pretrain, report, train_linear
    from linft.cli import interpolate as interpolate_cli

    main.add_command(extract.extract)
    main.add_command(cache.cache)
    main.add_command(demo.demo_data)
    main.add_command(demo.demo)
    main.add_command(pretrain.pretrain_source)
    main.add_command(pretrain.pretrain_command)
    main.add_command(train_linear.train_linear_cmd)
    main.add_command(finetune.finetune_cmd)
    main.add_command(report.report)
    main.add_command(interpolate_cli.interpolate_cmd)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()

"""``linft pretrain-source`` and ``linft pretrain``: the demo backbone's pretraining data and its trainer."""

from __future__ import annotations

import click

from linft.data.shapes import SOURCE_SHAPES, SOURCE_STYLES, write_pretraining_source
from linft.train.pretrain import pretrain


@click.command("pretrain-source")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
@click.option("--per-class", type=int, default=528, show_default=True,
              help="Images per domain and class (528 gives 42,240 images, 10x the demo benchmark).")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels (16 to 64).")
@click.option("--workers", type=int, default=None, help="Processes drawing images. Default: CPU count.")
def pretrain_source(out_dir, seed, per_class, size, workers):
    """Write the pretraining source: 5 style domains x 16 shape classes as PNG files.

    The demo benchmark's procedural family, broader (9 more shapes; photo and 4
    styles the demo does not use, none of its sketch, cartoon and painting) and
    drawn from other seeds, so it shares no image with the demo.
    The layout is OUT_DIR/<style>/<shape>/<image>.png, ready for `linft pretrain`.

    \b
    Example:
      linft pretrain-source /tmp/pretrain_src --seed 0
      linft pretrain /tmp/pretrain_src --out my_demo_resnet.pt
    """
    path = write_pretraining_source(out_dir, seed=seed, per_class=per_class, size=size, workers=workers)
    n = per_class * len(SOURCE_SHAPES)
    click.echo(f"wrote {len(SOURCE_STYLES)} domains x {n} images ({len(SOURCE_SHAPES)} classes) to {path}")


@click.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Checkpoint file to write (.pt).")
@click.option("--arch", default="demo-resnet", show_default=True,
              help="Backbone to train from scratch (demo-resnet or a torchvision ResNet-family name).")
@click.option("--epochs", type=int, default=25, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.2, show_default=True,
              help="Peak learning rate (linear warm-up over 2% of the steps, then cosine to 0).")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds initialisation, held-out split, shuffling and augmentation.")
@click.option("--image-size", type=int, default=64, show_default=True, help="Images are resized to S x S.")
@click.option("--workers", type=int, default=None,
              help="DataLoader processes decoding images (does not change the result). "
                   "Default: one per spare core, at most 8.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace an existing file at --out.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def pretrain_command(data_dir, out, arch, epochs, batch_size, lr, weight_decay, seed, image_size, workers,
                     device, force, quiet):
    """Train a backbone from scratch on DATA_DIR and save its state_dict with metadata.

    DATA_DIR is any folder laid out DATA_DIR/<domain>/<class>/<image>; all
    domains are pooled and the classes are the labels (2% is held out to report
    accuracy). Training is SGD with momentum 0.9, cosine learning rate, random
    crop and flip. The file loads with `--backbone demo-resnet --weights OUT` and
    records the command that reproduces it; on the CPU the same command gives the
    same weights.

    \b
    Example:
      linft pretrain-source /tmp/pretrain_src --seed 0
      linft pretrain /tmp/pretrain_src --out my_demo_resnet.pt --epochs 25 --seed 0 --device cpu
      linft extract data/demo --backbone demo-resnet --weights my_demo_resnet.pt --image-size 64
    """
    path = pretrain(data_dir, out, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                    weight_decay=weight_decay, seed=seed, image_size=image_size, workers=workers, device=device,
                    force=force, progress=not quiet, say=None if quiet else (lambda line: click.echo(line, err=True)))
    click.echo(f"saved {path}")

"""``linft extract``: pooled φ-block features of a dataset into an HDF5 cache."""

from __future__ import annotations

import click

from linft.data import DOMAINBED_DATASETS, find_dataset
from linft.cache import extract_features
from linft.cli.options import deprecated_precision_flag, precision_of, precision_option
from linft.protocol.records import done_summary
from linft.output import say_line


@click.command()
@click.argument("dataset")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Folder holding DomainBed's datasets, when DATASET is a name "
                   f"({', '.join(DOMAINBED_DATASETS)}). Default: $LINFT_DATA_ROOT, then ./data.")
@click.option("--backbone", default="resnet50", show_default=True,
              help="torchvision ResNet-family model (resnet18 ... resnet152, wide_resnet50_2, resnext50_32x4d, ...), "
                   "Vision Transformer (vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14), or OpenCLIP image tower "
                   "clip:NAME (clip:ViT-B-32; needs linft[clip]).")
@click.option("--weights", default="DEFAULT", show_default=True,
              help='DEFAULT (the backbone\'s recommended weights: IMAGENET1K_V2 = "ResNet #2" for resnet50, the '
                   'shipped file for demo-resnet), a torchvision weight name (IMAGENET1K_V1 = "ResNet #1", '
                   'IMAGENET1K_V2), an open_clip tag for clip: backbones (openai), a local state_dict file, or none '
                   "(seeded random init).")
@click.option("--blocks", "num_blocks", type=int, default=None,
              help="Keep the last K residual blocks of the last stage (of a transformer: the last K encoder blocks). "
                   "Default: all of the last stage (3 for ResNet-50); 3 for transformers.")
@click.option("--image-size", type=int, default=224, show_default=True,
              help="Images are resized to S x S (DomainBed's transform; "
                   "transformer weights with a transform of their own use it and its size).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--workers", type=int, default=None,
              help="DataLoader worker processes. Default: one per spare core, at most 8.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of the features (the computation: --precision).")
@precision_option("Part of the cache's provenance (its 'compute' attribute: float32 or cuda autocast DTYPE).")
@deprecated_precision_flag("--no-amp", "float32")
@click.option("--skip-bad-images", is_flag=True,
              help="Record unreadable images in the cache (zero features, valid=False) instead of failing.")
@click.option("--views", type=int, default=0, show_default=True,
              help="Also store N augmented views of every image (DomainBed's training augmentation); "
                   "train-linear then samples one view per step, bringing the augmentation back.")
@click.option("--views-seed", type=int, default=0, show_default=True, help="Seed of the augmented views.")
@click.option("--force", is_flag=True,
              help="Replace a cache (or discard an unfinished one) of different provenance at --out.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Cache file. Default: features_cache/<dataset>_<backbone>_<weights>.h5")
@click.option("--quiet", is_flag=True, help="No progress bar and no news on stderr (warnings and the result stay).")
def extract(dataset, data_root, backbone, weights, num_blocks, image_size, batch_size, workers, device,
            dtype, precision, deprecated_flag, skip_bad_images, views, views_seed, force, out, quiet):
    """Cache the average-pooled outputs of the last residual blocks for every image of DATASET.

    DATASET is a folder laid out DATASET/<domain>/<class>/<image>, or a DomainBed
    name looked up under --data-root. The file is written as OUT.partial and
    renamed when complete; if the command is interrupted, run it again to resume.

    \b
    Example:
      linft extract PACS --data-root ~/data --backbone resnet50 --weights IMAGENET1K_V2 \\
          --out features_cache/pacs_r50v2.h5
    """
    ds = find_dataset(dataset, data_root)
    if not quiet:
        say_line(f"{ds.name or ds.root}: {len(ds)} images, {len(ds.domains)} domains "
                 f"({', '.join(f'{d} {c}' for d, c in ds.counts.items())}), {len(ds.classes)} classes")
    result = extract_features(
        ds, out, backbone=backbone, weights=weights, num_blocks=num_blocks, image_size=image_size,
        batch_size=batch_size, workers=workers, device=device, dtype=dtype,
        precision=precision_of(precision, deprecated_flag, "--no-amp", "float32"),
        skip_bad_images=skip_bad_images, views=views, views_seed=views_seed, force=force, progress=not quiet,
    )
    counts = done_summary(result.num_extracted, result.num_examples - result.num_extracted, verb="extracted",
                          unit="image")
    if result.status == "up-to-date":
        click.echo(f"{counts} -> {result.path} (already complete with the same provenance)")
        return
    click.echo(f"{counts} -> {result.path} ({result.seconds:.1f} s, {result.images_per_second:,.1f} img/s)")
    if result.skipped_paths:
        click.echo(f"skipped {len(result.skipped_paths)} unreadable images (recorded in the cache): "
                   f"{', '.join(result.skipped_paths[:5])}", err=True)

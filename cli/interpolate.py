"""``linft interpolate``: weight vs representation interpolation between a pretrained and a fine-tuned model."""

from __future__ import annotations

import click

from linft.interpolation.checkpoints import CheckpointInterpolateConfig, interpolate_checkpoints
from linft.interpolation.run import interpolate
from linft.interpolation.paths import DEFAULT_ALPHAS
from linft.analysis.report import checkpoint_interpolation_text, interpolation_text
from linft.errors import LinftError
from linft.cli.options import deprecated_precision_flag, precision_of, precision_option
from linft.output import json_text, say_line


@click.command("interpolate")
@click.argument("dataset", required=False)
@click.option("--finetuned", required=True, type=click.Path(exists=True),
              help="A run folder of `linft finetune` (OUT/<run_id>/) or its selected.pt; with --iid, any checkpoint "
                   "of --backbone (linft's, a torchvision state_dict, a model-soups / wise-ft state_dict; a pickled "
                   "wise-ft module: save its classifier.state_dict() first).")
@click.option("--iid", "iid", type=click.Path(exists=True, file_okay=False), default=None,
              help="Figure 1 mode (no DATASET): the i.i.d. set, a folder <set>/<class>/<image> whose sorted class "
                   "folders are the head's classes (ImageNet's val with wnid folders).")
@click.option("--ood", "ood", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Figure 1 mode: an o.o.d. set <set>/<class>/<image> (repeatable); its classes may be a subset of "
                   "the head's: logits are restricted to them. The plot shows the mean o.o.d. accuracy.")
@click.option("--pretrained-head", default="zeroshot", show_default=True,
              help="Figure 1 mode: the pretrained end's head: zeroshot (CLIP's, from open_clip's ImageNet class "
                   "names and templates), probe (fitted on --probe-data) or a file {'weight', 'bias'}.")
@click.option("--probe-data", type=click.Path(exists=True, file_okay=False), default=None,
              help="Figure 1 mode, --pretrained-head probe: the class folder the probe is fitted on.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Where DomainBed names (PACS, VLCS, ...) are looked up. Default: $LINFT_DATA_ROOT, then ./data.")
@click.option("--pretrained", default=None,
              help="Weights of the pretrained end (torchvision name, state_dict file or 'none'). "
                   "Default: the weights the fine-tuned run started from.")
@click.option("--backbone", default=None, help="Override the backbone named in the checkpoint's metadata; "
              "with --iid, the architecture of both ends (clip:ViT-B-32, vit_b_16, resnet50, ...).")
@click.option("--alphas", default=DEFAULT_ALPHAS, show_default=True,
              help="α values, the share of the fine-tuned model (0 = pretrained, 1 = fine-tuned): "
                   "START:STOP:COUNT or a comma list (0,0.5,1).")
@click.option("--linearity", is_flag=True,
              help="Also the first-order path f(θ0) + α·J(θf − θ0) (one jvp) and the run's post-hoc linearity.")
@click.option("--no-blocks", is_flag=True, help="Skip the per-φ-block representation interpolation (diagnostic).")
@click.option("--batch-size", type=int, default=256, show_default=True, help="Evaluation images per forward pass.")
@click.option("--workers", type=int, default=None,
              help="DataLoader processes decoding images. Default: one per spare core, at most 8.")
@precision_option("float32 makes the paths' shared endpoints (α = 0 and 1) agree exactly.")
@deprecated_precision_flag("--amp", "bfloat16")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the records, plot and summary. Default: runs/interpolate/<dataset>/")
@click.option("--force", is_flag=True,
              help="Figure 1 mode: replace the figure1.* already in --out (refused without it).")
@click.option("--json", "as_json", is_flag=True, help="Print the result (accuracies per α and path) as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")
def interpolate_cmd(dataset, finetuned, iid, ood, pretrained_head, probe_data, data_root, pretrained, backbone, alphas,
                    linearity, no_blocks, batch_size, workers, precision, deprecated_flag, device, out, force, as_json,
                    quiet):
    """Accuracy along the weight and representation paths from a pretrained to a fine-tuned model (Figure 1).

    The pretrained end is the backbone the run started from with a linear-probe
    head fitted on its own penultimate features (training domains' "in"
    splits); the fine-tuned end is the run's selected model. α is the share of
    the fine-tuned model. Weight interpolation mixes every weight (one forward
    pass per α); representation interpolation mixes the penultimate
    representations and the heads, ((1-α)W_p + αW_f)((1-α)Φ_p + αΦ_f) + mixed
    biases (two forward passes in all), also per φ block with probe heads.
    Writes one record per α and path to OUT/records.jsonl (a re-run adds only
    what is missing; `linft report OUT` reads them), the plot
    OUT/interpolation_<domain>_seed<seed>_<run>.png and a .json summary.

    Figure 1 mode (--iid, no DATASET): any two checkpoints of --backbone, the
    pretrained one with --pretrained-head, evaluated on --iid and every --ood
    folder; writes OUT/figure1.json and the plot OUT/figure1.png (mean o.o.d.
    against i.i.d. accuracy along each path). Default OUT: runs/figure1; an
    OUT that already holds them is refused unless --force.

    \b
    Examples:
      linft interpolate PACS --data-root ~/data --finetuned runs/pacs_ft/3f2a9c0d1e4b5a67 --linearity
      linft interpolate data/demo --finetuned runs/demo_ft/<run_id>/selected.pt --alphas 0,0.5,1 --out runs/demo_interp
      linft report runs/demo_interp --out reports/demo_interp
      linft interpolate --backbone clip:ViT-B-32 --pretrained openai --finetuned soups/model_0.pt \\
          --iid ~/data/imagenet/val --ood ~/data/imagenet-a --ood ~/data/imagenet-r --out runs/figure1
    """
    say = None if quiet else say_line
    precision = precision_of(precision, deprecated_flag, "--amp", "bfloat16")
    if iid is not None:
        if dataset is not None or not backbone or not pretrained:
            raise LinftError("Figure 1 mode (--iid) takes no DATASET and needs --backbone and --pretrained; "
                             "pass e.g. --backbone clip:ViT-B-32 --pretrained openai")
        config = CheckpointInterpolateConfig(
            backbone=backbone, pretrained=pretrained, finetuned=finetuned, pretrained_head=pretrained_head,
            probe_data=probe_data, alphas=alphas, linearity=linearity, device=device, batch_size=batch_size,
            workers=workers, precision=precision)
        result = interpolate_checkpoints(iid, list(ood), config, out_dir=out or "runs/figure1", force=force,
                                         progress=not quiet, say=say)
        click.echo(json_text(result.to_dict(), indent=2, ensure_ascii=False) if as_json
                   else checkpoint_interpolation_text(result))
        return
    if dataset is None:
        raise LinftError("missing DATASET (or --iid FOLDER for the Figure 1 mode); see linft interpolate --help")
    result = interpolate(dataset, finetuned, data_root=data_root, pretrained=pretrained, backbone=backbone,
                         alphas=alphas, linearity=linearity, blocks=not no_blocks, out_dir=out, device=device,
                         batch_size=batch_size, workers=workers, precision=precision, progress=not quiet, say=say)
    if as_json:
        click.echo(json_text(result.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(interpolation_text(result))

"""``linft interpolate``: weight vs representation interpolation between a pretrained and a fine-tuned model."""

from __future__ import annotations

import click

from linft.analysis.interpolate import interpolate
from linft.analysis.interpolation_paths import DEFAULT_ALPHAS
from linft.analysis.report import interpolation_text
from linft.cli.options import deprecated_precision_flag, precision_of, precision_option
from linft.output import json_text, say_line


@click.command("interpolate")
@click.argument("dataset")
@click.option("--finetuned", required=True, type=click.Path(exists=True),
              help="A run folder of `linft finetune` (OUT/<run_id>/) or its selected.pt.")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Where DomainBed names (PACS, VLCS, ...) are looked up. Default: $LINFT_DATA_ROOT, then ./data.")
@click.option("--pretrained", default=None,
              help="Weights of the pretrained end (torchvision name, state_dict file or 'none'). "
                   "Default: the weights the fine-tuned run started from.")
@click.option("--backbone", default=None, help="Override the backbone named in the checkpoint's metadata.")
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
@click.option("--json", "as_json", is_flag=True, help="Print the result (accuracies per α and path) as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")
def interpolate_cmd(dataset, finetuned, data_root, pretrained, backbone, alphas, linearity, no_blocks, batch_size,
                    workers, precision, deprecated_flag, device, out, as_json, quiet):
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

    \b
    Examples:
      linft interpolate PACS --data-root ~/data --finetuned runs/pacs_ft/3f2a9c0d1e4b5a67 --linearity
      linft interpolate data/demo --finetuned runs/demo_ft/<run_id>/selected.pt --alphas 0,0.5,1 --out runs/demo_interp
      linft report runs/demo_interp --out reports/demo_interp
    """
    say = None if quiet else say_line
    result = interpolate(dataset, finetuned, data_root=data_root, pretrained=pretrained, backbone=backbone,
                         alphas=alphas, linearity=linearity, blocks=not no_blocks, out_dir=out, device=device,
                         batch_size=batch_size, workers=workers,
                         precision=precision_of(precision, deprecated_flag, "--amp", "bfloat16"), progress=not quiet,
                         say=say)
    if as_json:
        click.echo(json_text(result.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(interpolation_text(result))

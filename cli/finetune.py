"""``linft finetune``: full fine-tuning with dropout and the paper's baselines, over a grid, on any launcher."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import click

from linft.cli.options import grid_options, precision_option, print_grid_outcome, repeatable
from linft.data import find_dataset
from linft.output import say_line
from linft.protocol.grid import Grid
from linft.protocol.records import done_summary
from linft.protocol.schedule import DOMAINNET
from linft.train.finetune.run import default_finetune_out, sweep_runs
from linft.train.finetune.model import AUGMENTATIONS, FineTuneConfig, FineTuneRun
from linft.train.sweeps.launch import LAUNCHERS, LaunchOptions, launch_sweep
from linft.train.sweeps.result import RunStatus

#: The library's defaults (the paper's grid, schedule and plain run): each option's default is read from them.
GRID, CONFIG, RUN = Grid(), FineTuneConfig(), {f.name: f.default for f in fields(FineTuneRun)}


@click.command("finetune")
@click.argument("dataset")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Where DomainBed names (PACS, VLCS, ...) are looked up. Default: $LINFT_DATA_ROOT, then ./data.")
@click.option("--backbone", default="resnet50", show_default=True,
              help="torchvision ResNet-family name, demo-resnet, a Vision Transformer (vit_b_16 ... vit_h_14) or "
                   "clip:NAME (needs linft[clip]).")
@click.option("--weights", default="DEFAULT", show_default=True,
              help='DEFAULT (the backbone\'s recommended weights: IMAGENET1K_V2 = "ResNet #2" for resnet50, the '
                   'shipped file for demo-resnet), a torchvision weight name (IMAGENET1K_V1 = "ResNet #1", '
                   "IMAGENET1K_V2), a local state_dict file, or none (seeded random init, i.e. training from scratch).")
@click.option("--dropout", "dropouts", type=float, multiple=True, default=GRID.dropouts, show_default=True,
              help=repeatable("Dropout rate on the penultimate representation.", "--dropout 0 --dropout 0.9"))
@click.option("--last-layer-lr-mult", type=float, default=RUN["last_layer_lr_mult"], show_default=True,
              help="Learning-rate multiplier of the classifier head (the paper's baseline: 10).")
@click.option("--stochastic-depth", type=float, default=RUN["stochastic_depth"], show_default=True,
              help="Residual-block dropout rate on every residual branch (the paper: 0.1 to 0.3).")
@click.option("--stochastic-depth-mode", type=click.Choice(["row", "official"]), default=RUN["stochastic_depth_mode"],
              show_default=True,
              help="row: per example, rescaled by 1/(1-rate) in training (torchvision); official: the official "
                   "code's, one draw for the whole batch and no rescaling.")
@click.option("--linearized", is_flag=True, help="Train the first-order (torch.func) model around the pretrained one.")
@click.option("--lp-ft", is_flag=True,
              help="LP-FT (Kumar et al. 2022): the head starts from the linear-probe solution on the pretrained "
                   "penultimate features of each run's training images (method lp-ft, label LP-FT).")
@click.option("--lp-ft-cache", type=click.Path(exists=True, dir_okay=False, resolve_path=True), default=None,
              help="Fit the LP-FT probe on this feature cache (`linft extract` of the same data, weights and "
                   "--image-size) instead of one forward pass of the backbone; implies --lp-ft.")
@grid_options("Trial seeds 0..N-1 (split, batches, masks, head init).")
@click.option("--steps", type=int, default=CONFIG.steps, show_default=True, help="SGD steps per run.")
@click.option("--lr-milestones", "lr_milestones", type=float, multiple=True, default=CONFIG.lr_milestones,
              show_default=True,
              help=repeatable("Where the lr is divided by 10: fractions of --steps (up to 1) or step numbers "
                              "(above 1). The official code: --steps 10001 with 5000 and 10000 (its last update at "
                              f"lr/100); on DomainNet {' and '.join(map(str, DOMAINNET.lr_milestones))} with --steps "
                              f"{DOMAINNET.steps} and --eval-every {DOMAINNET.eval_every}.",
                              " ".join(f"--lr-milestones {m}" for m in DOMAINNET.lr_milestones)))
@click.option("--eval-every", type=int, default=CONFIG.eval_every, show_default=True)
@click.option("--batch-size", type=int, default=CONFIG.batch_size, show_default=True,
              help="Images per training domain per step.")
@click.option("--image-size", type=int, default=CONFIG.image_size, show_default=True)
@click.option("--test-domains", multiple=True,
              help=repeatable("Held-out domains to run (default: every domain).",
                              "--test-domains photo --test-domains sketch"))
@click.option("--ensembles", is_flag=True,
              help="Also record trajectory ensembles and weight averages (every evaluation), and per held-out domain "
                   "and seed the ensemble, uniform soup and greedy soup of the grid's selected models.")
@click.option("--average-every-step", is_flag=True,
              help="Trajectory weight average over every step from --eval-every on (the official code: every step "
                   "after 300) instead of the checkpoints at each evaluation.")
@click.option("--ensemble-rule", type=click.Choice(["probs", "logits"]), default=CONFIG.ensemble_rule,
              show_default=True,
              help="Output ensembles: mean of probabilities, or of logits (the official code).")
@click.option("--no-freeze-bn", is_flag=True, help="Update BatchNorm statistics (the protocol freezes them).")
@click.option("--augment", type=click.Choice(AUGMENTATIONS), default=CONFIG.augment, show_default=True,
              help="Training augmentation: pil, DomainBed's PIL transform per image in DataLoader workers (the "
                   "paper's protocol); tensor, the same family batched on the device (faster, not bit-identical to "
                   "pil); none, the deterministic transform. Part of each run's id.")
@click.option("--no-augment", is_flag=True, hidden=True, help="Same as --augment none (earlier releases).")
@click.option("--workers", type=int, default=None,
              help="DataLoader processes decoding images. Default: one per spare core, at most 8.")
@click.option("--device", default="auto", show_default=True)
@precision_option("Fine-tuning refuses float16 (it would need loss scaling).")
@click.option("--launcher", type=click.Choice(LAUNCHERS), default="local", show_default=True,
              help="local: in this process (--gpus N: one process per GPU); slurm: one job per run through submitit.")
@click.option("--gpus", type=int, default=1, show_default=True, help="local launcher: GPUs to use, one run on each.")
@click.option("--slurm-partition", default=None, help="slurm launcher: partition.")
@click.option("--slurm-timeout", type=int, default=24 * 60, show_default=True, help="slurm launcher: minutes per job.")
@click.option("--slurm-gpus", type=int, default=1, show_default=True, help="slurm launcher: GPUs per job.")
@click.option("--no-wait", is_flag=True, help="slurm launcher: return once the jobs are submitted.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder of the run folders. Default: runs/finetune/<dataset>/")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False), default=None,
              help="Also write the records as TensorBoard event files under this folder (pip install "
                   "'linft[tensorboard]'; then: tensorboard --logdir DIR).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary table as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars and no line per evaluation.")
def finetune_cmd(dataset, data_root, backbone, weights, dropouts, last_layer_lr_mult, stochastic_depth,
                 stochastic_depth_mode, linearized, lp_ft, lp_ft_cache, lrs, weight_decays, seeds, split_seed, steps,
                 lr_milestones, eval_every, batch_size, image_size, test_domains, ensembles, average_every_step,
                 ensemble_rule, no_freeze_bn, augment, no_augment, workers, device, precision, launcher, gpus,
                 slurm_partition, slurm_timeout, slurm_gpus, no_wait, out, tensorboard_dir, as_json, quiet):
    """Fine-tune a pretrained backbone leave-one-domain-out, with dropout on the penultimate layer.

    Every held-out domain x seed x dropout x lr x weight decay is one run with
    the paper's protocol (SGD momentum 0.9, 32 images per training domain per
    step, lr ÷10 at half, BatchNorm frozen, evaluation every 300 steps).
    Each run has its folder OUT/<run_id>/ with records.jsonl; killed runs resume
    from their last checkpoint, and finished runs are skipped, so re-running the
    same command completes only what is missing. While it trains, one line per
    evaluation (step, lr, loss, i.i.d. and o.o.d. accuracy) goes to stderr;
    `linft status OUT` shows where the sweep stands from anywhere. Exits with
    status 1 when every run diverged (nothing to report).

    \b
    Examples:
      linft finetune PACS --data-root ~/data --dropout 0 --dropout 0.9 --out runs/pacs_ft
      linft finetune PACS --last-layer-lr-mult 10 --out runs/pacs_ft          # 10x head lr baseline
      linft finetune PACS --stochastic-depth 0.1 --out runs/pacs_ft
      linft finetune PACS --weights none --lr 5e-3 --lr 1e-2 --out runs/pacs_ft  # from scratch
      linft finetune PACS --lp-ft --lp-ft-cache features_cache/pacs_r50v2.h5 --out runs/pacs_ft  # LP-FT
      linft finetune PACS --dropout 0.9 --ensembles --launcher slurm --slurm-partition gpu --out runs/pacs_ft
      linft report runs/pacs_ft
    """
    ds = find_dataset(dataset, data_root)
    out = Path(out) if out else default_finetune_out(ds)
    config = FineTuneConfig(steps=steps, lr_milestones=tuple(lr_milestones), batch_size=batch_size,
                            eval_every=eval_every, image_size=image_size,
                            freeze_bn=not no_freeze_bn, augment="none" if no_augment else augment, workers=workers,
                            trajectory=ensembles, average_every_step=average_every_step, ensemble_rule=ensemble_rule,
                            precision=precision, lp_ft_cache=lp_ft_cache, split_seed=split_seed)
    runs = sweep_runs(ds.domains, test_domains=test_domains, dropouts=dropouts, lrs=lrs, weight_decays=weight_decays,
                      seeds=seeds, last_layer_lr_mult=last_layer_lr_mult, stochastic_depth=stochastic_depth,
                      stochastic_depth_mode=stochastic_depth_mode,
                      linearized=linearized, lp_ft=lp_ft or lp_ft_cache is not None)
    slurm = {"timeout_min": slurm_timeout, "gpus_per_node": slurm_gpus}
    if slurm_partition:
        slurm["slurm_partition"] = slurm_partition
    options = LaunchOptions(launcher=launcher, device=device, gpus=gpus, slurm=slurm, wait=not no_wait,
                            across_runs=ensembles, progress=not quiet, say=None if quiet else say_line,
                            tensorboard_dir=tensorboard_dir)
    result = launch_sweep(ds, out, runs, backbone=backbone, weights=weights, config=config, options=options)
    verb = "submitted" if no_wait and launcher != "local" else "trained"
    counts = done_summary(result.launched, result.skipped, verb=verb, diverged=result.count(RunStatus.DIVERGED),
                          failed=len(result.failed))
    click.echo(f"{counts} -> {out}", err=True)
    for failed in result.failed:
        click.echo(f"failed: run {failed.run_id} (held out {failed.run.test_domain}, seed {failed.run.seed}): "
                   f"{failed.detail}", err=True)
    if no_wait and launcher != "local":
        click.echo(f"jobs: {' '.join(result.jobs)}; once they have ended, run the same command again to complete "
                   f"what is missing (and, with --ensembles, evaluate the ensembles and soups)")
        return
    print_grid_outcome([out], result.divergence, result.usable, as_json)
    if result.failed:
        raise SystemExit(1)

"""Speed of linft's fine-tuning step against a minimal plain PyTorch loop doing the same math.

    python benchmarks/finetune_step.py                          # CPU: demo-resnet, 64 px, 3 x 32 images per step
    python benchmarks/finetune_step.py --device cuda            # GPU: resnet50, 224 px, 3 x 32 images per step
    python benchmarks/finetune_step.py --backbone resnet18 --image-size 128 --steps 5
    python benchmarks/finetune_step.py --augment tensor          # linft's step with the tensor augmentation

Both sides train the same network from the same weights on the same batch
(``--domains`` x ``--batch-size`` images, random, fixed), with dropout on the
penultimate representation, frozen BatchNorm, SGD with momentum 0.9 and weight
decay, and cross-entropy:

* linft: the code path of :func:`linft.train.finetune.run.train_run`: the model of
  :func:`~linft.train.finetune.model.build_run_model`, :func:`~linft.train.finetune.model.set_train_mode`,
  the SGD parameter groups of :func:`~linft.train.finetune.model.run_optimizer`, and
  :func:`~linft.train.finetune.model.train_step` on the uint8 batch (transfer, normalisation
  on the device, channels_last, bfloat16 autocast on CUDA, learning-rate
  schedule, per-step mask seed) followed by ``float(loss)``, the divergence
  check ``train_run`` does every step;
* plain: the loop people write: ``model.train()`` then every BatchNorm back to
  ``eval()``, ``torch.optim.SGD(model.parameters())``, an already normalised
  float batch moved to the device, forward, ``cross_entropy``, backward, step;
  on CUDA with channels_last and bfloat16 autocast as well, so that both do the
  same math. No data loading on either side (train_run decodes images in
  DataLoader workers, in parallel with the step).

After ``--warmup`` steps each, the two are timed in ``--rounds`` alternating
rounds of ``--steps`` steps (shared machines drift); the median round is
reported, as steps/s and images/s, with the ratio linft / plain (goal >= 1).

``--augment tensor`` times linft's step with ``FineTuneConfig.augment="tensor"``
(the batch augmented on the device inside ``train_step``; the plain loop stays
unaugmented, so the ratio shows what the augmentation costs), and also times
the augmentation of one batch alone both ways: ``pil`` — DomainBed's PIL
transform image by image in this one process (what each DataLoader worker
does, without the PNG decoding), ``tensor`` — :func:`linft.data.tensor_augment.augment_batch`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from linft.data.images import normalize_uint8, train_augmentation
from linft.data.tensor_augment import augment_batch
from linft.models import load_backbone
from linft.protocol.schedule import PAPER
from linft.runtime import resolve_device
from linft.train.finetune.model import (FineTuneConfig, FineTuneRun, build_run_model, run_optimizer, set_train_mode,
                                        train_step)

NUM_CLASSES = 7


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def plain_model(backbone: str, weights: str, dropout: float, like: nn.Module, dev, channels_last: bool) -> nn.Module:
    """The backbone with a ``Dropout -> Linear`` head, the head's weights copied from linft's model."""
    model = load_backbone(backbone, weights).model
    model.fc = nn.Sequential(nn.Dropout(dropout), copy.deepcopy(like.fc[1]).cpu())
    model = model.to(dev)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def augmentation_ms(images: torch.Tensor, dev, rounds: int) -> dict[str, float]:
    """Median milliseconds to augment the uint8 batch ``images`` with PIL (image by image, seeded per image as
    the DataLoader workers do, in this process) and with :func:`augment_batch` on ``dev``."""
    size, seeds = images.shape[-1], list(range(len(images)))
    pil = [TF.to_pil_image(x) for x in images]
    augment = train_augmentation(size)
    on_dev = images.to(dev)

    def with_pil():
        with torch.random.fork_rng(devices=[]):
            for img, seed in zip(pil, seeds):
                torch.manual_seed(seed)
                augment(img)

    out = {}
    for kind, fn in (("pil", with_pil), ("tensor", lambda: augment_batch(on_dev, seeds))):
        fn()
        times = []
        for _ in range(rounds):
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            times.append((time.perf_counter() - t) * 1e3)
        out[kind] = statistics.median(times)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default=None, help="default: demo-resnet on the CPU, resnet50 on CUDA")
    ap.add_argument("--weights", default="none", help="weights do not change the speed; none needs no download")
    ap.add_argument("--image-size", type=int, default=None, help="default: 64 with demo-resnet, else 224")
    ap.add_argument("--batch-size", type=int, default=32, help="images per training domain")
    ap.add_argument("--domains", type=int, default=3, help="training domains (the batch is domains x batch-size)")
    ap.add_argument("--dropout", type=float, default=0.9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 4 on the CPU, 30 on CUDA)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--plain-channels-last", action="store_true",
                    help="channels_last in the plain loop on the CPU too (it always is on CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--augment", choices=("none", "tensor"), default="none",
                    help="tensor: linft's step augments the batch on the device; also times one batch's augmentation "
                         "with PIL (per image) and with tensors")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    cuda = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = args.backbone or ("resnet50" if cuda else "demo-resnet")
    size = args.image_size or (64 if backbone == "demo-resnet" else 224)
    steps = args.steps or (30 if cuda else 4)
    if cuda:
        torch.backends.cudnn.benchmark = True
    # precision, channels_last: FineTuneConfig's defaults
    config = FineTuneConfig(steps=PAPER.steps, batch_size=args.batch_size, image_size=size, augment=args.augment)
    run = FineTuneRun("held-out", seed=0, lr=1e-3, weight_decay=1e-4, dropout=args.dropout)

    # linft: train_run's model, mode, optimizer and step
    model, _ = build_run_model(backbone, args.weights, NUM_CLASSES, run, dev, config.channels_last)
    set_train_mode(model, True, config.freeze_bn)
    optimizer = run_optimizer(model, run, config.momentum)

    # plain: the same network and weights, the simplest loop
    plain_cl = cuda or args.plain_channels_last
    plain = plain_model(backbone, args.weights, args.dropout, model, dev, channels_last=plain_cl)
    plain.train()
    for m in plain.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=run.lr, momentum=0.9, weight_decay=run.weight_decay)

    g = torch.Generator().manual_seed(0)
    n = args.domains * args.batch_size
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    normalised = normalize_uint8(images)  # what a DataLoader with ToTensor + Normalize hands the plain loop
    if cuda:
        images, labels, normalised = images.pin_memory(), labels.pin_memory(), normalised.pin_memory()
    counter = {"linft": 0}

    def linft_steps(k):
        for _ in range(k):
            step = counter["linft"]
            loss = train_step(model, optimizer, images, labels, step, run, 0, config)
            if not math.isfinite(float(loss)):  # train_run's per-step divergence check (a sync on CUDA)
                raise SystemExit("linft's loss diverged")
            counter["linft"] += 1

    def plain_steps(k):
        for _ in range(k):
            x = normalised.to(dev, non_blocking=True)
            if plain_cl:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(dev, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = plain(x)
            loss = F.cross_entropy(out.float(), y)
            plain_opt.zero_grad()
            loss.backward()
            plain_opt.step()

    def timed(fn, k) -> float:
        sync(dev)
        t = time.perf_counter()
        fn(k)
        sync(dev)
        return k / (time.perf_counter() - t)

    linft_steps(args.warmup)
    plain_steps(args.warmup)
    rates = {"linft": [], "plain": []}
    for _ in range(args.rounds):
        rates["linft"].append(timed(linft_steps, steps))
        rates["plain"].append(timed(plain_steps, steps))
    linft_rate, plain_rate = statistics.median(rates["linft"]), statistics.median(rates["plain"])

    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    result = {"device": name, "backbone": backbone, "weights": args.weights, "image_size": size, "batch": n,
              "steps_per_round": steps, "rounds": args.rounds,
              "linft_steps_per_s": linft_rate, "plain_steps_per_s": plain_rate, "ratio": linft_rate / plain_rate,
              "linft_rounds": rates["linft"], "plain_rounds": rates["plain"],
              "linft": "channels_last" + (", bf16 autocast" if cuda else " (FineTuneConfig default), fp32"),
              "plain": ("channels_last" if plain_cl else "contiguous") + (", bf16 autocast" if cuda else ", fp32"),
              "augment": args.augment}
    if args.augment != "none":
        result["linft"] += ", tensor augmentation in the step"
        result["augment_ms_per_batch"] = augmentation_ms(images, dev, args.rounds)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{name}, {backbone} ({args.weights}) at {size} px, batch {args.domains} x {args.batch_size} = {n}, "
          f"median of {args.rounds} rounds of {steps} steps")
    print(f"  {'':28s} {'steps/s':>9s} {'images/s':>9s}")
    print(f"  {'linft train_step':28s} {linft_rate:9.2f} {linft_rate * n:9.1f}   ({result['linft']})")
    print(f"  {'plain PyTorch loop':28s} {plain_rate:9.2f} {plain_rate * n:9.1f}   ({result['plain']})")
    print(f"  linft / plain = {linft_rate / plain_rate:.2f}   (goal >= 1)")
    for kind, ms in result.get("augment_ms_per_batch", {}).items():
        print(f"  augmentation of one batch, {kind:6s} {ms:8.1f} ms   ({n / ms * 1e3:.0f} images/s)")


if __name__ == "__main__":
    main()

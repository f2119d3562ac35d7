"""Throughput of `linft extract` against the forward-only floor and a plain loop, in the same run.

    python benchmarks/extract_throughput.py                      # CPU defaults (resnet50, 224 px)
    python benchmarks/extract_throughput.py --device cuda --images 8192 --batch-size 256
    python benchmarks/extract_throughput.py --backbone vit_b_16       # a Vision Transformer (random weights)

Three measurements over the same JPEG files, backbone and batch size:

* forward-only: the φ-block forward on already decoded, normalised tensors that
  sit on the device (no decoding, no writing): the ceiling;
* linft: ``linft.cache.extract_features`` (DataLoader workers, uint8 transfer,
  normalisation on the device, autocast and channels_last on CUDA, HDF5 written
  and flushed per batch). Steady state is timed between batch writes (from the first to
  the second-to-last, as writes trail the forward by one batch); end to end includes model loading and worker start-up;
* plain: the loop people write: PIL + torchvision transforms per image in the
  main process, forward hooks on the blocks of the full model, h5py append
  (resize) per batch, no workers.

It prints images/s and the ratios linft/forward-only (goal >= 0.9) and linft/plain.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from linft.cache import extract_features
from linft.data import IMAGENET_MEAN, IMAGENET_STD, load_image_folder
from linft.data.images import load_image_uint8, normalize_uint8
from linft.data.shapes import DEMO_CLASSES, DEMO_STYLES, render
from linft.models import PooledBlockFeatures, load_backbone, phi_block_names
from linft.runtime import resolve_device


def make_jpegs(root: Path, count: int, side: int) -> Path:
    """``count`` JPEG files of ``side`` px (demo renderings upscaled), DomainBed layout, 2 domains x 2 classes."""
    rng = np.random.default_rng(0)
    for i in range(count):
        d, c = DEMO_STYLES[i % 2], DEMO_CLASSES[(i // 2) % 2]
        folder = root / d / c
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(render(c, d, rng, 64)).resize((side, side), Image.BICUBIC)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def forward_only(paths, root, backbone, weights, image_size, batch_size, dev) -> float:
    model = load_backbone(backbone, weights).model
    ext = PooledBlockFeatures(model, phi_block_names(model)).to(dev).eval()
    use_amp = dev.type == "cuda"
    if use_amp:
        ext = ext.to(memory_format=torch.channels_last)
    images = torch.stack([load_image_uint8(root / p, image_size) for p in paths])
    batches = [normalize_uint8(images[i:i + batch_size].to(dev)) for i in range(0, len(paths), batch_size)]
    if use_amp:
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.float16, enabled=use_amp):
        ext(batches[0])  # warm-up
        sync(dev)
        t = time.perf_counter()
        for b in batches:
            ext(b).cpu()
        sync(dev)
    return len(paths) / (time.perf_counter() - t)


def linft_path(root, out, backbone, weights, image_size, batch_size, workers, dev):
    stamps = []
    t = time.perf_counter()
    extract_features(root, out, backbone=backbone, weights=weights, image_size=image_size, batch_size=batch_size,
                     workers=workers, device=dev, progress=False,
                     on_checkpoint=lambda done, n: stamps.append((time.perf_counter(), done)))
    end_to_end = stamps[-1][1] / (time.perf_counter() - t)
    # Batches are written one behind the forward, so between the first and the
    # second-to-last write exactly the batches in between were decoded and run.
    if len(stamps) < 3:
        raise SystemExit("steady state needs at least 3 batches: raise --images or lower --batch-size")
    (t0, d0), (t1, d1) = stamps[0], stamps[-2]
    steady = (d1 - d0) / (t1 - t0)
    return steady, end_to_end


def plain_loop(paths, root, out, backbone, weights, image_size, batch_size, dev) -> float:
    model = load_backbone(backbone, weights).model.to(dev).eval()
    names = phi_block_names(model)
    got = {}
    # a ResNet block's output is average-pooled; a transformer's as its head reads it (final norm, class token)
    pool = getattr(model, "pool_block_output", lambda o: o.mean((2, 3)))
    for n in names:
        dict(model.named_modules())[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o))
    tf = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    t = time.perf_counter()
    with h5py.File(out, "w") as f, torch.no_grad():
        dset = None
        for i in range(0, len(paths), batch_size):
            x = torch.stack([tf(Image.open(root / p).convert("RGB")) for p in paths[i:i + batch_size]]).to(dev)
            model(x)
            feats = torch.stack([pool(got[n]) for n in names], 1).cpu().numpy().astype(np.float16)
            if dset is None:
                dset = f.create_dataset("features", shape=(0, *feats.shape[1:]), maxshape=(None, *feats.shape[1:]),
                                        dtype=np.float16)
            dset.resize(dset.shape[0] + len(feats), axis=0)
            dset[-len(feats):] = feats
    sync(dev)
    return len(paths) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--source-size", type=int, default=256, help="side of the generated JPEG files")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--weights", default="none", help="weights do not change the speed; none needs no download")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_jpegs(tmp / "data", args.images, args.source_size)
        paths = load_image_folder(root).paths
        common = (args.backbone, args.weights, args.image_size, args.batch_size)
        fwd = forward_only(paths, root, *common, dev)
        steady, e2e = linft_path(root, tmp / "linft.h5", *common, args.workers, dev)
        plain = plain_loop(paths, root, tmp / "plain.h5", *common, dev)
    result = {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "torch_threads": torch.get_num_threads(), "images": args.images, "backbone": args.backbone,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "forward_only_img_s": fwd, "linft_steady_img_s": steady, "linft_end_to_end_img_s": e2e,
        "plain_loop_img_s": plain,
        "linft_over_forward_only": steady / fwd, "linft_over_plain": steady / plain,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['device']}, {args.backbone} at {args.image_size} px, batch {args.batch_size}, {args.images} JPEGs")
    print(f"  forward-only (decoded tensors) {fwd:9.1f} img/s")
    print(f"  linft extract, steady state    {steady:9.1f} img/s   (end to end incl. start-up {e2e:.1f})")
    print(f"  plain loop                     {plain:9.1f} img/s")
    print(f"  linft / forward-only = {steady / fwd:.2f}   (goal >= 0.9)")
    print(f"  linft / plain loop   = {steady / plain:.2f}")


if __name__ == "__main__":
    main()

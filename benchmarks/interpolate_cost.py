"""Cost of the interpolation paths, counted, and of a linearized training step against an ordinary one.

    python benchmarks/interpolate_cost.py                          # CPU: demo-resnet, 64 px, 128 random images
    python benchmarks/interpolate_cost.py --device cuda --backbone resnet50 --image-size 224 --images 2048 \\
        --batch-size 256 --train-batch 32

Setup: a backbone with random weights (``none``) and the head of
``linft.models.build_classifier`` as the pretrained end, the same network
with every float entry perturbed as the fine-tuned end, random uint8 images
(no decoding: only the model's work is timed) and an 11-point α sweep.

* **sweep**: wall time of each path over the sweep with the library's own
  functions (``linft.interpolate``), and the number of forward passes and
  jvps over the evaluation images it used. They are *counted*, not assumed:
  a forward pre-hook on the network counts its calls, the jvp of
  ``linft.linearize`` is wrapped to count its calls, and calls made inside a
  jvp are attributed to it; counts are divided by the number of batches.
  Goal: weights 11 forwards; representation 2 forwards; linearized 1 jvp
  (its primal is f(θ0)), whatever the number of α. The probe head (fitted
  once, shared by every path) is timed on its own row.
* **train step**: time of one SGD step (forward, backward, update; frozen
  BatchNorm) of the ordinary network and of ``linft.linearize.LinearizedModel``
  around it, median of ``--steps`` after one warm-up, and peak memory
  (CUDA: ``torch.cuda.max_memory_allocated`` during the step, less what the
  other model holds between steps, so: this model's weights, gradients and
  optimizer state plus the step's activations; CPU: not measured, shown as
  n/a). Both models are built side by side and their steps alternate.
  Published anchor for linearized training: about 1.9x the time and 3x the memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import linft.models.linearize as linearize
from linft.interpolation.paths import (first_order_outputs, iter_weight_path, parse_alphas,
                                                pooled_features_and_logits, representation_path_predictions)
from linft.models import load_backbone, phi_block_names
from linft.models.heads import LinearHead, build_classifier, fit_probe_head, with_head
from linft.models.linearize import LinearizedModel
from linft.runtime import resolve_device
from linft.train.finetune.model import set_train_mode


class Counter:
    """Counts the network's forward calls (pre-hook) and linft.linearize's jvps; forwards inside a jvp go to the jvp."""

    def __init__(self, model):
        self.forwards = self.jvps = self.in_jvp = 0
        self.handle = model.register_forward_pre_hook(self._pre_hook)
        self._jvp = linearize.jvp
        linearize.jvp = self._counting_jvp

    def _pre_hook(self, module, args):
        if not self.in_jvp:
            self.forwards += 1

    def _counting_jvp(self, *args, **kwargs):
        self.jvps += 1
        self.in_jvp += 1
        try:
            return self._jvp(*args, **kwargs)
        finally:
            self.in_jvp -= 1

    def reset(self):
        self.forwards = self.jvps = 0

    def close(self):
        self.handle.remove()
        linearize.jvp = self._jvp


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def perturbed(state, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.abs().mean() * torch.randn(v.shape, generator=g).to(v.device))
            if v.is_floating_point() else v.clone() for k, v in state.items()}


def sweep_costs(args, dev):
    net = build_classifier(load_backbone(args.backbone, "none").model, args.classes, 0.0).to(dev).eval()
    channels_last = dev.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    blocks = phi_block_names(net)
    start = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    end = perturbed(start)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (args.images, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, args.classes, (args.images,), generator=g)
    images = [data[a:a + args.batch_size] for a in range(0, args.images, args.batch_size)]
    batches = len(images)
    alphas = parse_alphas(f"0:1:{args.alphas}")
    counter = Counter(net)
    rows = []

    def row(name, seconds, note=""):
        rows.append({"path": name, "seconds": seconds, "forwards": counter.forwards / batches,
                     "jvps": counter.jvps / batches, "note": note})
        counter.reset()

    # warm-up (allocator, kernels, torch's jvp decompositions), not counted
    list(iter_weight_path(net, start, end, [0.0], images[:1], dev, channels_last))
    first_order_outputs(net, start, end, images[:1], dev, channels_last)
    counter.reset()

    # representation path: Φ_p, Φ_f once, then every α from the features
    net.load_state_dict(start)
    (phi_p, _), t_p = timed(dev, lambda: pooled_features_and_logits(net, blocks, images, dev, channels_last))
    net.load_state_dict(end)
    (phi_f, _), t_f = timed(dev, lambda: pooled_features_and_logits(net, blocks, images, dev, channels_last))
    head_p, t_probe = timed(dev, lambda: fit_probe_head(phi_p[:, -1].to(dev), labels.numpy(), args.classes))
    head_p = head_p.to("cpu")
    wk = "fc.1.weight" if "fc.1.weight" in end else "fc.weight"
    head_f = LinearHead(end[wk].float(), end[wk[:-6] + "bias"].float())
    _, t_mix = timed(dev, lambda: representation_path_predictions(alphas, phi_p[:, -1].contiguous(),
                                                                  phi_f[:, -1].contiguous(), head_p, head_f, dev,
                                                                  args.batch_size))
    row("representation", t_p + t_f + t_mix,
        f"2 passes {t_p + t_f:.2f} s + {len(alphas)} α from features {t_mix:.3f} s")
    row("probe head (shared)", t_probe, "L-BFGS on the pretrained penultimate features")
    pre = with_head(start, head_p)

    # weight path: one forward pass per α
    def weight_sweep():
        return [logits.argmax(1) for _, logits in iter_weight_path(net, pre, end, alphas, images, dev, channels_last)]
    _, t_w = timed(dev, weight_sweep)
    row("weights", t_w, f"{len(alphas)} α, state_dict interpolation + forward each")

    # linearized path: one jvp pass, then every α
    def linearized_sweep():
        f0, jv = first_order_outputs(net, pre, end, images, dev, channels_last)
        a = torch.tensor(alphas).view(-1, 1, 1)
        return (f0.unsqueeze(0) + a * jv.unsqueeze(0)).argmax(2)
    _, t_l = timed(dev, linearized_sweep)
    row("linearized", t_l, f"1 jvp pass, {len(alphas)} α from f(θ0) + α·J(θf − θ0)")
    counter.close()
    return rows, batches, alphas


def resident_bytes(model, opt) -> int:
    """Bytes held between steps by one model: parameters, buffers, gradients, optimizer state."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers()) + [p.grad for p in model.parameters()]
    tensors += [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    for t in tensors:
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def train_step_costs(args, dev):
    """Both models built side by side, steps alternated (so that a change in machine load hits both alike)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.train_batch, 3, args.image_size, args.image_size, generator=g).to(dev)
    y = torch.randint(0, args.classes, (args.train_batch,), generator=g).to(dev)
    steps = {}
    for kind in ("ordinary", "linearized"):
        net = build_classifier(load_backbone(args.backbone, "none").model, args.classes, 0.5).to(dev)
        if dev.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        if kind == "linearized":
            model = LinearizedModel(net).train()
            del net
        else:
            model = net
            set_train_mode(model, True, freeze_bn=True)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

        def step(model=model, opt=opt):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm-up (and momentum buffers allocated)
        steps[kind] = (step, model, opt)
    out = {kind: {"times": [], "peak_bytes": None} for kind in steps}
    for _ in range(args.steps):
        for kind, (step, model, opt) in steps.items():
            if dev.type == "cuda":
                sync(dev)
                other = torch.cuda.memory_allocated(dev) - resident_bytes(model, opt)
                torch.cuda.reset_peak_memory_stats(dev)
            out[kind]["times"].append(timed(dev, step)[1])
            if dev.type == "cuda":  # this model alone: the peak less what the other model holds
                peak = torch.cuda.max_memory_allocated(dev) - other
                out[kind]["peak_bytes"] = max(out[kind]["peak_bytes"] or 0, peak)
    return {kind: {"ms": 1000 * statistics.median(v["times"]), "peak_bytes": v["peak_bytes"]}
            for kind, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="demo-resnet")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=128, help="evaluation images of the sweep")
    ap.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--alphas", type=int, default=11, help="points of the α sweep")
    ap.add_argument("--train-batch", type=int, default=32, help="images per training step")
    ap.add_argument("--steps", type=int, default=5, help="training steps timed (after one warm-up)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    rows, batches, alphas = sweep_costs(args, dev)
    steps = train_step_costs(args, dev)
    device = str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev)
    result = {"device": device, "backbone": args.backbone, "image_size": args.image_size, "images": args.images,
              "batch_size": args.batch_size, "alphas": len(alphas), "sweep": rows, "train_step": steps}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{device}: {args.backbone} (weights none), {args.image_size} px, {args.images} random images in {batches} "
          f"batches of {args.batch_size}, {len(alphas)}-point α sweep; forwards and jvps counted per pass over the "
          f"images\n")
    print("| path | wall time (s) | forward passes | jvp passes | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['seconds']:.2f} | {r['forwards']:g} | {r['jvps']:g} | {r['note']} |")
    o, lin = steps["ordinary"], steps["linearized"]

    def mem(b):
        return "n/a (CPU: not measured)" if b is None else f"{b / 2**20:,.0f} MiB"
    ratio_mem = "n/a" if o["peak_bytes"] is None else f"{lin['peak_bytes'] / o['peak_bytes']:.2f}x"
    print(f"\none training step, batch {args.train_batch}, median of {args.steps} (published anchor for the "
          f"linearized step: ~1.9x time, ~3x memory)\n")
    print("| model | time (ms) | peak memory |")
    print("|---|---|---|")
    print(f"| ordinary | {o['ms']:.1f} | {mem(o['peak_bytes'])} |")
    print(f"| linearized (torch.func jvp) | {lin['ms']:.1f} | {mem(lin['peak_bytes'])} |")
    print(f"| ratio | {lin['ms'] / o['ms']:.2f}x | {ratio_mem} |")


if __name__ == "__main__":
    main()

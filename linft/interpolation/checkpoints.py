"""The paper's Figure 1 protocol: interpolate any two checkpoints of one architecture, evaluated on distribution
folders (i.i.d. accuracy against the mean o.o.d. accuracy).

The ends are two weights of one backbone (``--pretrained``: an enum name, an open_clip tag or a file;
``--finetuned``: a file — linft's, a torchvision state_dict, a model-soups / wise-ft state_dict, a pickled
wise-ft module exported as ``classifier.state_dict()`` first), the
fine-tuned one with its head ω_f, the pretrained one with a head ω_p chosen by ``pretrained_head``:

- ``zeroshot``: CLIP's zero-shot classifier (:func:`linft.models.clip.zero_shot_head`), prompted with
  :func:`linft.models.clip.prompt_names` (open_clip's ``IMAGENET_CLASSNAMES`` for ImageNet's 1000 classes) and
  open_clip's ``OPENAI_IMAGENET_TEMPLATES`` — the paper's ω_pretrain for CLIP;
- ``probe``: a linear probe fitted on the pretrained features of ``probe_data`` (a class folder);
- a file: a head saved as ``{"weight": (C, D), "bias": (C,)}``.

Evaluation sets are folders ``<set>/<class>/<image>``. The first (``iid``) names the head's classes (its sorted
class folders: ImageNet's class order for wnid folders) and must have as many as the head; every other set's
classes must be among them, and its logits are restricted to the classes it has (as wise-ft evaluates
ImageNet-A and ImageNet-R). ObjectNet's many-to-one class mapping is not supported.

Both ends see the images as the fine-tuned end's weights take them (its own transform, or DomainBed's at its
size). Paths (α = share of the fine-tuned end) as in :mod:`linft.interpolation.paths`: weights, representation
(the appendix A.1 formula on the representation the heads read), and with ``linearity`` the first-order path.
Writes ``figure1.json`` and the plot ``figure1.png`` (the paper's form: o.o.d. against i.i.d. accuracy, one
curve per path, α along it) into the output folder, under its lock; an earlier result there is replaced only
with ``force``. Two ends that take images of different sizes are refused before any forward pass.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from linft.interpolation.paths import (first_order_outputs, iter_weight_path, pooled_features_and_logits,
                                                representation_logits)
from linft.interpolation.result import InterpolateConfig
from linft.analysis.plots import figure_files, plot_figure1
from linft.data.folders import MultiDomainDataset, load_class_folder
from linft.data.images import EvalImages
from linft.errors import LinftError
from linft.locks import output_lock
from linft.models.averaging import check_compatible
from linft.models.blocks import phi_block_names
from linft.models.checkpoints import load_checkpoint
from linft.models.clip import prompt_names, zero_shot_head
from linft.models.heads import LinearHead, classifier_head, fit_probe_head, head_keys, with_head
from linft.models.linearize import relative_linearity_gap
from linft.models.registry import Backbone, load_backbone
from linft.protocol.selection import predicted_classes, split_counts
from linft.output import atomic_write_text, json_text, progress_bar
from linft.runtime import effective_precision, resolve_device



#: The files Figure 1 mode writes into its output folder (the plot as PNG and PDF, when there is one).
FIGURE1_FILES = ("figure1.json", "figure1.png", "figure1.pdf")


@dataclass(frozen=True)
class CheckpointInterpolateConfig(InterpolateConfig):
    """What :func:`interpolate_checkpoints` compares (``backbone``, ``pretrained`` and these), and how
    (:class:`~linft.interpolation.result.InterpolateConfig`'s settings; ``blocks`` is not used)."""

    finetuned: str = ""  # the fine-tuned end's weights file
    pretrained_head: str = "zeroshot"  # zeroshot | probe | a head file
    probe_data: str | None = None  # class folder the probe head is fitted on

    def check(self) -> list[float]:
        alphas = super().check()
        if not (self.backbone and self.pretrained and self.finetuned):
            raise LinftError("interpolating two checkpoints needs the backbone, the pretrained weights and the "
                             "fine-tuned checkpoint")
        if self.pretrained_head == "probe" and not self.probe_data:
            raise LinftError("pretrained_head='probe' needs probe_data=FOLDER (images of the head's classes to fit it "
                             "on, not an evaluation set)", param="probe_data")
        return alphas


@dataclass
class CheckpointInterpolation:
    """Accuracy per set, α and path: ``curves[path] = [{"alpha", "iid", "ood", "sets": {name: acc}}, ...]``."""

    alphas: list[float]
    curves: dict[str, list[dict]]
    iid_set: str
    ood_sets: list[str]
    backbone: str
    pretrained: str
    finetuned: str
    pretrained_head: str
    summary: Path
    plot: Path | None = None
    linearity_gap: dict | None = None  # per set: ‖f(θf) − f_lin(θf)‖ / ‖f(θf) − f(θ0)‖
    set_sizes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(summary=str(self.summary), plot=str(self.plot) if self.plot else None)
        return out


@dataclass
class _Set:
    """One evaluation set: its images and, for its classes, the head's columns."""

    ds: MultiDomainDataset
    columns: torch.Tensor  # head class index of each of the set's classes
    images: EvalImages

    def accuracy(self, logits: torch.Tensor) -> float | None:
        """Accuracy of logits (N, C_head) restricted to this set's classes; None (not a number) when they are not all
        finite."""
        splits = split_counts(predicted_classes(logits[:, self.columns]), self.ds.labels,
                              {(0, "all"): np.arange(len(self.ds))}, self.ds.domains)
        return None if splits is None else splits[f"{self.ds.domains[0]}_all"][0] / len(self.ds)


def _head_of_file(path: str) -> LinearHead:
    obj = load_checkpoint(path, "head file", 'save it with torch.save({"weight": W, "bias": b}, path)')
    if (isinstance(obj, dict) and isinstance(obj.get("weight"), torch.Tensor)
            and isinstance(obj.get("bias"), torch.Tensor)):
        bad = [k for k in ("weight", "bias") if not obj[k].float().isfinite().all()]
        if bad:
            raise LinftError(f"pretrained_head file {path} has NaN or inf values in its {' and '.join(bad)}; pass "
                             "a head file with finite weights", param="pretrained_head")
        return LinearHead(obj["weight"].float(), obj["bias"].float())
    raise LinftError(f"head file {path} holds no weight and bias; save it with torch.save({{\"weight\": W, "
                     "\"bias\": b}, path)")


def _input(bb: Backbone) -> tuple:
    """``(transform, size)`` of the images ``bb`` evaluates: its weights' own, else DomainBed's at its size (224)."""
    transform, _, size = bb.input_transform(bb.image_size or 224)
    return transform, size


def _pretrained_head(config: CheckpointInterpolateConfig, bb: Backbone, classes: list[str], dev: torch.device,
                     images_as: tuple) -> LinearHead:
    """ω_p for the pretrained end ``bb``; a probe is fitted on ``probe_data`` seen as ``images_as``
    (``(transform, size)``: the fine-tuned end's, the images every evaluation feeds both ends)."""
    if config.pretrained_head == "zeroshot":
        return zero_shot_head(bb.name, config.pretrained, prompt_names(classes), device=dev)
    if config.pretrained_head != "probe":
        return _head_of_file(config.pretrained_head)
    probe = load_class_folder(config.probe_data)
    columns = _columns(probe, classes, "the probe data")
    transform, size = images_as
    images = EvalImages(probe, size, config.batch_size, config.workers, transform=transform)
    block = phi_block_names(bb.model, 1)
    phi, _ = pooled_features_and_logits(bb.model.to(dev), block, images, dev, False, config.precision)
    return fit_probe_head(phi[:, -1].to(dev), columns[probe.labels].numpy(), len(classes), config.probe_l2).to("cpu")


def _columns(ds: MultiDomainDataset, classes: list[str], what: str) -> torch.Tensor:
    unknown = [c for c in ds.classes if c not in classes]
    if unknown:
        raise LinftError(f"{what} {ds.root / ds.domains[0]} has classes the head does not know "
                         f"({', '.join(unknown[:3])}"
                         f"{' ...' if len(unknown) > 3 else ''}); pass sets whose classes are among the i.i.d. set's")
    return torch.tensor([classes.index(c) for c in ds.classes])


def _named_sets(folders: list) -> list[MultiDomainDataset]:
    """The evaluation sets of ``folders``, each named by its folder's name; two of one name are refused (one would
    hide the other in the results)."""
    sets = [load_class_folder(f) for f in folders]
    seen: dict[str, MultiDomainDataset] = {}
    for ds in sets:
        name = ds.domains[0]
        if name in seen:
            raise LinftError(f"evaluation sets {seen[name].root / name} and {ds.root / name} have one name '{name}' "
                             "(sets are named by their folder's name); give their folders distinct names")
        seen[name] = ds
    return sets


def _ends(config: CheckpointInterpolateConfig, classes: list[str], dev: torch.device):
    """The network (fine-tuned, C classes), the pretrained state with ω_p, the fine-tuned state, the backbones."""
    bb_p, bb_f = load_backbone(config.backbone, config.pretrained), load_backbone(config.backbone, config.finetuned)
    _check_one_architecture(bb_p, bb_f)  # before the probe pass, which feeds the pretrained end the fine-tuned images
    head_f = classifier_head(bb_f.model)
    if head_f.weight.shape[0] != len(classes):
        raise LinftError(f"the fine-tuned head has {head_f.weight.shape[0]} classes but the i.i.d. set has "
                         f"{len(classes)} class folders; pass the i.i.d. set of the head's classes (ImageNet's val)")
    head_p = _pretrained_head(config, bb_p, classes, dev, _input(bb_f))
    if head_p.weight.shape != head_f.weight.shape:
        raise LinftError(f"the pretrained head has shape {tuple(head_p.weight.shape)} but the fine-tuned one "
                         f"{tuple(head_f.weight.shape)}; give both ends the same classes and features")
    fin_state = {k: v.detach().clone() for k, v in bb_f.model.state_dict().items()}
    pre_state = {k: v.detach().clone() for k, v in bb_p.model.state_dict().items()}
    pre_state.update({k: fin_state[k] for k in head_keys(fin_state)})  # the head's place, then ω_p in it
    pre_state = with_head(pre_state, head_p)
    try:
        check_compatible([pre_state, fin_state])
    except LinftError as exc:
        raise LinftError(f"the two checkpoints are not of one architecture ({str(exc).split(';')[0]}); interpolate "
                         "checkpoints of the same backbone") from None
    return bb_f.model.eval(), pre_state, fin_state, bb_p, bb_f


def _check_one_architecture(bb_p: Backbone, bb_f: Backbone) -> None:
    """One line when the ends are not one architecture, or take images of two sizes (a transformer's position
    embedding fixes its size: weights of two sizes cannot be mixed, and one end's images do not fit the other)."""
    if bb_p.name != bb_f.name:
        raise LinftError(f"the pretrained end is a {bb_p.name} but the fine-tuned one a {bb_f.name}; interpolate "
                         "checkpoints of one architecture")
    if bb_p.image_size is not None and bb_f.image_size is not None and bb_p.image_size != bb_f.image_size:
        raise LinftError(f"the pretrained end takes {bb_p.image_size} px images but the fine-tuned one "
                         f"{bb_f.image_size} px (their position embeddings differ, so their weights cannot be mixed); "
                         "interpolate two checkpoints made at one image size", param="pretrained")


def interpolate_checkpoints(iid: str | os.PathLike, ood: list[str | os.PathLike], config: CheckpointInterpolateConfig,
                            *, out_dir: str | os.PathLike = "runs/figure1", force: bool = False, progress: bool = True,
                            say: Callable[[str], None] | None = None, **settings) -> CheckpointInterpolation:
    """Weight, representation (and first-order) paths between two checkpoints on ``iid`` and the ``ood`` folders.

    ``out_dir`` is locked (:func:`linft.locks.output_lock`) while the sets are evaluated and the results written;
    a folder that already holds a Figure 1 result (:data:`FIGURE1_FILES`) is refused unless ``force``, checked at
    once and again under the lock. Cost per set: 2 forward passes (Φ_p, Φ_f), one per α on the weight path, one
    jvp with ``linearity``.
    """
    config = replace(config, **settings)
    alphas = config.check()
    out = Path(out_dir)
    _refuse_earlier_result(out, force)  # before any computation
    say = say or (lambda _line: None)
    dev = resolve_device(config.device)
    folders = _named_sets([iid] + list(ood))
    classes = list(folders[0].classes)
    net, pre_state, fin_state, bb_p, bb_f = _ends(config, classes, dev)
    transform, size = _input(bb_f)
    sets = {ds.domains[0]: _Set(ds, _columns(ds, classes, "evaluation set"),
                                EvalImages(ds, size, config.batch_size, config.workers, transform=transform))
            for ds in folders}
    with output_lock(out, folder=True):  # a second command on this folder refuses instead of writing beside it
        _refuse_earlier_result(out, force)  # under the lock: a result another process wrote meanwhile
        per_set, gaps = _evaluate_sets(config, alphas, sets, net.to(dev), (pre_state, fin_state), dev,
                                       progress, say)
        return _finish(config, alphas, per_set, list(sets), out, gaps, {n: len(s.ds) for n, s in sets.items()},
                       bb_f)


def _refuse_earlier_result(out: Path, force: bool) -> None:
    present = [name for name in FIGURE1_FILES if (out / name).exists()]
    if present and not force:
        raise LinftError(f"{out} already holds a Figure 1 result ({', '.join(present)}); pass force to replace it "
                         "or choose another out_dir", param="force")


def _evaluate_sets(config: CheckpointInterpolateConfig, alphas: list[float], sets: dict, net, states: tuple, dev,
                   progress: bool, say: Callable[[str], None]) -> tuple[dict, dict]:
    """Accuracy per set, path and α (``per_set[name][path]``), and the linearity gap per set."""
    pre_state, fin_state = states
    precision = effective_precision(dev, config.precision)
    block = phi_block_names(net, 1)
    wk, bk = head_keys(fin_state)
    heads = {end: LinearHead(state[wk].float(), state[bk].float())
             for end, state in (("p", pre_state), ("f", fin_state))}
    per_set: dict[str, dict[str, list[float]]] = {}
    gaps = {}
    for name, s in sets.items():
        say(f"{name}: {len(s.ds)} images, {len(s.ds.classes)} classes")
        phis = {}
        for end, state in (("p", pre_state), ("f", fin_state)):
            net.load_state_dict(state, strict=True)
            phis[end], logits = pooled_features_and_logits(net, block, s.images, dev, False, precision)
        accs = {"representation": [s.accuracy(representation_logits(a, phis["p"][:, -1], phis["f"][:, -1],
                                                                    heads["p"], heads["f"])) for a in alphas]}
        with progress_bar(len(alphas) * len(s.ds), f"{name}: weight path", unit="img", enabled=progress) as update:
            accs["weights"] = [s.accuracy(out) for _, out in iter_weight_path(net, pre_state, fin_state, alphas,
                                                                             s.images, dev, False, precision, update)]
        if config.linearity:
            f0, jv = first_order_outputs(net, pre_state, fin_state, s.images, dev)
            accs["linearized"] = [s.accuracy(f0 + a * jv) for a in alphas]
            gaps[name] = relative_linearity_gap(logits, f0 + jv, f0)
        per_set[name] = accs
    return per_set, gaps


def _mean(accuracies: list) -> float | None:
    """The mean o.o.d. accuracy over the sets; None when there is no set or one set's accuracy is not a number."""
    return None if not accuracies or None in accuracies else float(np.mean(accuracies))


def _finish(config, alphas, per_set, names, out: Path, gaps, sizes, bb) -> CheckpointInterpolation:
    iid_name, ood_names = names[0], names[1:]
    curves = {}
    for path in per_set[iid_name]:
        curves[path] = [{"alpha": a, "iid": per_set[iid_name][path][i],
                         "ood": _mean([per_set[n][path][i] for n in ood_names]),
                         "sets": {n: per_set[n][path][i] for n in names}} for i, a in enumerate(alphas)]
    out.mkdir(parents=True, exist_ok=True)
    result = CheckpointInterpolation(alphas, curves, iid_name, ood_names, bb.name, config.pretrained,
                                     str(config.finetuned), config.pretrained_head, out / "figure1.json",
                                     linearity_gap=gaps or None, set_sizes=sizes)
    if config.plot and ood_names:
        drawn = {k: [p for p in v if p["iid"] is not None] for k, v in curves.items()}  # a missing point: a gap
        result.plot = plot_figure1(drawn, out / "figure1.png",
                                   title=f"{bb.name}: {Path(config.pretrained).name} → {Path(config.finetuned).name}")
    atomic_write_text(result.summary, json_text(result.to_dict(), indent=1, ensure_ascii=False) + "\n")
    if result.plot is None:  # a replaced result's plot is not this one's
        for stale in figure_files(out / "figure1.png"):
            stale.unlink(missing_ok=True)
    return result

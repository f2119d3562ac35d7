"""What :func:`linft.interpolation.run.interpolate` is asked (:class:`InterpolateConfig`) and what it returns
(:class:`InterpolationResult`, also written as the ``.json`` summary beside the records)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from linft.interpolation.paths import DEFAULT_ALPHAS, parse_alphas
from linft.data.images import check_workers
from linft.errors import LinftError
from linft.models.heads import PROBE_L2
from linft.runtime import DEFAULT_PRECISION, check_precision


@dataclass(frozen=True)
class InterpolateConfig:
    """What :func:`interpolate` computes and how."""

    pretrained: str | None = None  # θ_p's weights; None: the weights the run started from
    backbone: str | None = None  # overrides the run's metadata
    alphas: str | tuple = DEFAULT_ALPHAS
    linearity: bool = False  # also the first-order path and the run's post-hoc linearity
    blocks: bool = True  # also the representation path of every φ block
    device: str = "auto"
    batch_size: int = 256
    workers: int | None = None
    precision: str = DEFAULT_PRECISION  # autocast on CUDA (float32: none; else endpoints agree to that precision)
    probe_l2: float = PROBE_L2
    plot: bool = True

    def check(self) -> list[float]:
        """One-line errors for settings that cannot run; returns the α values."""
        alphas = parse_alphas(self.alphas)
        check_precision(self.precision)
        if self.batch_size < 1:
            raise LinftError(f"batch_size must be at least 1, got {self.batch_size}", param="batch_size")
        check_workers(self.workers)
        if not (math.isfinite(self.probe_l2) and self.probe_l2 >= 0):
            raise LinftError(f"the probe head's L2 strength must be finite and >= 0, got {self.probe_l2}")
        return alphas


@dataclass
class InterpolationResult:
    """What :func:`interpolate` measured and where it wrote it.

    ``curves[path] = [{"alpha", "iid", "ood", "splits"}, ...]`` for the paths
    ``weights``, ``representation``, ``linearized`` (with ``linearity``) and
    ``block:<name>`` (per φ block); ``labels[path]`` is the records' label.
    ``linearity`` (with ``linearity=True``): ``gap`` and, for ``f(θf)``,
    ``f_lin(θf)``, ``f(θ0)``, their ``iid``, ``ood`` and ``splits``.
    """

    alphas: list[float]
    curves: dict[str, list[dict]]
    labels: dict[str, str]
    test_domain: str
    seed: int
    finetuned: str
    finetuned_id: str
    pretrained_weights: str
    dataset: str
    out: Path
    records: Path
    plot: Path | None = None
    summary: Path | None = None
    linearity: dict | None = None
    records_written: int = 0
    passes: dict = field(default_factory=dict)
    finetuned_label: str | None = None  # the fine-tuned run's label, as its records say

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update({k: (str(v) if v is not None else None) for k, v in out.items() if isinstance(v, Path)})
        return out

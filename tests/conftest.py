"""Small data made by the tests: image folders and backbone checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

#: The tiny transformers of the tests, built from the real classes: torchvision's VisionTransformer as backbone
#: "vit-tiny", and open_clip's CLIP from tests/tiny_models/linft-tiny-clip.json as "clip:linft-tiny-clip"
#: (its real code paths, its real tokenizer: vocab 49408).
TINY_VIT = dict(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64)
TINY_CLIP = "clip:linft-tiny-clip"


def _register_tiny_transformers() -> None:
    from linft.models.vit import register_vit_config

    register_vit_config("vit-tiny", **TINY_VIT)
    try:
        import open_clip
    except ImportError:  # the clip extra is not installed: the CLIP tests skip
        return
    open_clip.add_model_config(Path(__file__).parent / "tiny_models" / "linft-tiny-clip.json")


_register_tiny_transformers()

DOMAINS = ("domB", "domA", "dom C")  # unsorted on purpose; one name with a space, like "Real World"
CLASSES = ("cat", "dog")


def make_image_folder(root: Path, domains=DOMAINS, classes=CLASSES, per_class=3, size=20, seed=0, ext=".png") -> Path:
    """root/<domain>/<class>/<i>.<ext> with random images of varying sizes."""
    rng = np.random.default_rng(seed)
    for d in domains:
        for c in classes:
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = size + int(rng.integers(0, 9)), size + int(rng.integers(0, 9))
                arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(folder / f"img{i:02d}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "toy")


#: The tiny shape benchmark of the fine-tuning and interpolation tests: 3 style domains x 2 classes x 6 images, 32 px.
SHAPE_CLASSES, SHAPE_STYLES = ("circle", "square"), ("photo", "sketch", "cartoon")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    from linft.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes") / "shapes"
    return write_shapes_dataset(root, classes=SHAPE_CLASSES, styles=SHAPE_STYLES, per_class=6, size=32, seed=0,
                                workers=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads fighting were measured up to 100x slower; one
    thread also makes in-process and subprocess runs use the same kernels (resumed runs match bit for bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_one_line_error(result, *fragments, exit_code: int = 2):
    """A CLI result of bad input: exit status 2, no traceback, exactly one "Error:" line holding every fragment."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

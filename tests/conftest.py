"""Small data made by the tests: image folders and backbone checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

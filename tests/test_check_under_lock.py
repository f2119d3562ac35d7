"""Commands that refuse to replace an existing output without force decide so under their output lock (issue 20,
section 4): an output another process wrote between the first check and the lock is never silently replaced.

The race is made deterministic by a stand-in for ``output_lock`` that writes the other process's output just
before it takes the real lock."""

from contextlib import contextmanager

import pytest
import torch

import linft.data.shapes as shapes
import linft.train.pretrain as pretrain_module
from linft.errors import LinftError
from linft.locks import lock_path, output_lock
from linft.data.shapes import write_shapes_dataset


def _racing_lock(write_other):
    @contextmanager
    def lock(target, **kwargs):
        write_other()
        with output_lock(target, **kwargs) as path:
            yield path
    return lock


def test_a_folder_filled_between_the_check_and_the_lock_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    monkeypatch.setattr(shapes, "output_lock", _racing_lock(
        lambda: out.mkdir(exist_ok=True) or (out / "theirs.txt").write_text("the other command's folder")))
    with pytest.raises(LinftError, match="exists and is not empty") as err:
        shapes.write_demo_data(out, per_class=1, size=16)
    assert err.value.param == "force"
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert not lock_path(out).exists()


def test_a_pretrained_file_saved_between_the_check_and_the_lock_is_not_replaced(tmp_path, monkeypatch):
    data = write_shapes_dataset(tmp_path / "shapes", classes=("circle", "square"), styles=("photo", "sketch"),
                                per_class=2, size=16, seed=0, seed_tag=1, workers=1)
    out = tmp_path / "ck.pt"
    # today's pretrain took no lock at all: the stand-in is then never called and the file is replaced
    monkeypatch.setattr(pretrain_module, "output_lock", _racing_lock(lambda: out.write_bytes(b"theirs")),
                        raising=False)
    with pytest.raises(LinftError, match="already exists") as err:
        pretrain_module.pretrain(data, out, epochs=1, batch_size=4, image_size=16, workers=0, device="cpu",
                                 progress=False)
    assert err.value.param == "force"
    assert out.read_bytes() == b"theirs"
    assert not lock_path(out).exists()
    monkeypatch.undo()
    saved = pretrain_module.pretrain(data, out, epochs=1, batch_size=4, image_size=16, workers=0, device="cpu",
                                     progress=False, force=True)
    assert "state_dict" in torch.load(saved, weights_only=True)

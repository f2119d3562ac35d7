"""Figure 1 mode's output folder (issue 20, sections 4 and 5): it is locked while the mode evaluates and writes,
an earlier ``figure1.*`` is replaced only with ``force`` (checked at once and again under the lock), and two
ends that take images of different sizes are refused before any forward pass (the probe pass used to feed the
pretrained end the fine-tuned end's images: a torch assertion)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from click.testing import CliRunner
from torchvision.models.vision_transformer import VisionTransformer

from linft.cli.main import main
from linft.errors import LinftError
from linft.interpolation import checkpoints as checkpoint_interpolation
from linft.interpolation.checkpoints import CheckpointInterpolateConfig, interpolate_checkpoints
from linft.locks import LOCK_NAME, output_lock

from conftest import TINY_VIT, assert_one_line_error
from helpers import class_folder

CLASSES = ("a", "b", "c")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("figure1_out")
    iid, ood = class_folder(tmp / "val", CLASSES, 2, 0), class_folder(tmp / "sketch", CLASSES[1:], 2, 1)
    torch.manual_seed(3)
    finetuned = tmp / "vit.pt"
    torch.save(VisionTransformer(**TINY_VIT, num_classes=3).state_dict(), finetuned)
    return iid, ood, finetuned


def _config(finetuned, **extra):
    return CheckpointInterpolateConfig(backbone="vit-tiny", pretrained="none", finetuned=str(finetuned),
                                       alphas="0,1", device="cpu", workers=0, pretrained_head="probe",
                                       **extra)


def _run(sets, out, **kwargs):
    iid, ood, finetuned = sets
    return interpolate_checkpoints(iid, [ood], _config(finetuned, probe_data=str(iid)), out_dir=out, progress=False,
                                   **kwargs)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_earlier_figure1_is_replaced_only_with_force(sets, tmp_path):
    out = tmp_path / "out"
    first = _run(sets, out)
    assert {p.name for p in out.iterdir()} == {"figure1.json", "figure1.png", "figure1.pdf"}
    (out / "figure1.json").write_text('{"mine": 1}')  # an earlier result, to tell it from a new one
    before = _snapshot(out)
    with pytest.raises(LinftError, match="already holds a Figure 1 result") as err:
        _run(sets, out)
    assert err.value.param == "force" and "\n" not in str(err.value)
    assert _snapshot(out) == before
    iid, ood, finetuned = sets
    base = ["interpolate", "--backbone", "vit-tiny", "--pretrained", "none", "--finetuned", str(finetuned),
            "--pretrained-head", "probe", "--probe-data", str(iid), "--iid", str(iid), "--ood", str(ood),
            "--alphas", "0,1", "--device", "cpu", "--workers", "0", "--quiet", "--out", str(out)]
    assert_one_line_error(CliRunner().invoke(main, base), "already holds a Figure 1 result (figure1.json")
    assert _snapshot(out) == before
    res = CliRunner().invoke(main, base + ["--force"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "figure1.json").read_text())["curves"] == first.curves
    # a forced result without a plot (no o.o.d. set) leaves no plot of the earlier one behind
    iid, _, finetuned = sets
    interpolate_checkpoints(iid, [], _config(finetuned, probe_data=str(iid)), out_dir=out, progress=False,
                            force=True)
    assert {p.name for p in out.iterdir()} == {"figure1.json"}


def test_a_folder_locked_by_another_process_is_refused_and_left_alone(sets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "command": "linft interpolate", "started": "now"}))
        with pytest.raises(LinftError, match="being written by another linft process"):
            _run(sets, out)
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_a_result_written_between_the_first_check_and_the_lock_is_not_replaced(sets, tmp_path, monkeypatch):
    out = tmp_path / "out"

    @contextmanager
    def racing_lock(target, **kwargs):  # the other command's result lands just before this one takes the lock
        out.mkdir(exist_ok=True)
        (out / "figure1.json").write_text('{"theirs": 1}')
        with output_lock(target, **kwargs) as path:
            yield path
    monkeypatch.setattr(checkpoint_interpolation, "output_lock", racing_lock, raising=False)  # none taken today
    with pytest.raises(LinftError, match="already holds a Figure 1 result"):
        _run(sets, out)
    assert _snapshot(out) == {"figure1.json": b'{"theirs": 1}'}


def test_two_ends_at_different_image_sizes_are_refused_before_the_probe_pass(sets, tmp_path):
    """One ViT at 32 px (pretrained) and at 48 px (fine-tuned: its position embedding has 6 x 6 patches + 1):
    the probe pass fed the 48 px images to the 32 px network (torchvision's "Wrong image height!")."""
    iid, ood, _ = sets
    torch.manual_seed(4)
    big = tmp_path / "vit48.pt"
    torch.save(VisionTransformer(**{**TINY_VIT, "image_size": 48}, num_classes=3).state_dict(), big)
    out = tmp_path / "out"
    with pytest.raises(LinftError, match="takes 32 px images but the fine-tuned one 48 px"):
        interpolate_checkpoints(iid, [ood], _config(big, probe_data=str(iid)), out_dir=out, progress=False)
    assert not out.exists()
    res = CliRunner().invoke(main, ["interpolate", "--backbone", "vit-tiny", "--pretrained", "none", "--finetuned",
                                    str(big), "--pretrained-head", "probe", "--probe-data", str(iid), "--iid", str(iid),
                                    "--ood", str(ood), "--device", "cpu", "--workers", "0", "--quiet",
                                    "--out", str(out)])
    assert_one_line_error(res, "takes 32 px images but the fine-tuned one 48 px", "one image size")
    assert not out.exists()

"""Every stage of linft on transformer backbones, with no model-specific code outside linft.models: extraction (the
last φ is the head's input), linear fine-tuning from that cache, fine-tuning with resume, interpolation with the
first-order path (a jvp through attention). Tiny ViT and CLIP of the real classes (conftest.py), 32 px shapes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from linft.interpolation.run import interpolate
from linft.cache.extract import extract_features
from linft.cache.format import open_cache
from linft.cli.main import main
from linft.data.folders import load_image_folder
from linft.data.images import EvalImages, normalize_uint8
from linft.errors import LinftError
from linft.models.blocks import phi_block_names
from linft.models.registry import load_backbone
from linft.protocol.records import read_records
from linft.train.finetune.run import load_selected, train_run
from linft.train.finetune.hooks import RunHooks
from linft.train.finetune.model import FineTuneConfig, FineTuneRun
from linft.train.linear.driver import train_linear
from linft.train.linear.engine import LinearGridConfig

from conftest import TINY_CLIP, assert_one_line_error

pytestmark = pytest.mark.filterwarnings("ignore:the run started from random weights")

CFG = FineTuneConfig(steps=5, batch_size=4, eval_every=2, image_size=32, eval_batch_size=64, workers=0,
                     channels_last=False)
RUN = FineTuneRun("photo", seed=0, lr=1e-2, weight_decay=1e-4, dropout=0.9)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def shapes(shapes_root):
    return load_image_folder(shapes_root)


@pytest.mark.parametrize("backbone", ["vit-tiny", TINY_CLIP])
def test_extraction_then_linear_fine_tuning(backbone, shapes, tmp_path):
    if backbone.startswith("clip:"):
        pytest.importorskip("open_clip")
    out = tmp_path / "cache.h5"
    res = extract_features(shapes, out, backbone=backbone, weights="none", image_size=32, batch_size=8, workers=0,
                           device="cpu", dtype="float32", progress=False)
    cache = open_cache(res.path)
    bb = load_backbone(backbone, "none")
    assert cache.block_names == phi_block_names(bb.model) and len(cache.block_names) == 3
    transform = cache.meta["transform"]
    assert transform.startswith("Resize(32) [PIL bicubic], CenterCrop(32)" if backbone.startswith("clip:")
                                else "Resize((32, 32)) [PIL bilinear]")
    # the cache's last φ is what the model's head reads, for the images as the cache decoded them
    images = EvalImages(shapes, 32, 64, 0, transform=bb.input_transform(32)[0]).images
    seen = []
    bb.model.fc.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        bb.model(normalize_uint8(images))
    torch.testing.assert_close(torch.from_numpy(cache.features[:, -1]), seen[0], rtol=1e-5, atol=1e-5)
    result = train_linear(res.path, tmp_path / "linear", dropouts=(0.9,), lrs=(0.05,), weight_decays=(1e-4,),
                          seeds=1, config=LinearGridConfig(steps=6, batch_size=4, eval_every=3), device="cpu",
                          progress=False)
    assert result.trained == 3 and result.diverged == 0
    records = read_records([tmp_path / "linear"])
    assert {r["backbone"] for r in records} == {backbone} and all(r["splits"] for r in records)


def test_vit_fine_tuning_resumes_exactly_and_interpolates(shapes, tmp_path):
    states = {}

    def remember(event):
        states[event.step] = {k: v.detach().clone() for k, v in event.model.state_dict().items()}

    ref = train_run(shapes, tmp_path / "ref", RUN, backbone="vit-tiny", weights="none", config=CFG, device="cpu",
                    progress=False, hooks=RunHooks(on_eval=remember))
    assert ref.status == "trained"
    reference = dict(states)

    class Stop(Exception):
        pass

    def stop_at_2(step, path):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        train_run(shapes, tmp_path / "resumed", RUN, backbone="vit-tiny", weights="none", config=CFG, device="cpu",
                  progress=False, hooks=RunHooks(on_checkpoint=stop_at_2))
    states.clear()
    resumed = train_run(shapes, tmp_path / "resumed", RUN, backbone="vit-tiny", weights="none", config=CFG,
                        device="cpu", progress=False, hooks=RunHooks(on_eval=remember))
    assert resumed.status == "resumed" and sorted(states) == [4]
    for k, v in states[4].items():  # the same code path twice: bit for bit
        assert torch.equal(v, reference[4][k]), k
    assert read_records([resumed.run_dir]) == read_records([ref.run_dir])

    result = interpolate(shapes, ref.run_dir, alphas="0:1:3", linearity=True, out_dir=tmp_path / "interp",
                         device="cpu", batch_size=16, workers=0, progress=False)
    assert set(result.curves) >= {"weights", "representation", "linearized"}
    assert len([k for k in result.curves if k.startswith("block:")]) == 3
    assert all(len(curve) == 3 for curve in result.curves.values())
    # the weight path's α = 1 is the fine-tuned model, run by the same forward pass as f(θf)
    assert result.curves["weights"][-1]["splits"] == result.linearity["f(θf)"]["splits"]
    assert np.isfinite(result.linearity["gap"]) and result.linearity["gap"] > 0
    selected, _ = load_selected(ref.run_dir)
    assert "fc.1.weight" in selected and "encoder.layers.encoder_layer_3.self_attention.in_proj_weight" in selected


def test_cli_extract_and_its_one_line_errors(shapes_root, tmp_path):
    runner = CliRunner()
    base = ["extract", str(shapes_root), "--backbone", "vit-tiny", "--weights", "none", "--device", "cpu",
            "--workers", "0", "--quiet"]
    res = runner.invoke(main, base + ["--image-size", "32", "--out", str(tmp_path / "c.h5")])
    assert res.exit_code == 0, res.output
    assert open_cache(tmp_path / "c.h5").meta["blocks"] == ["encoder.layers.encoder_layer_1",
                                                            "encoder.layers.encoder_layer_2",
                                                            "encoder.layers.encoder_layer_3"]
    assert_one_line_error(runner.invoke(main, base + ["--image-size", "48"]), "vit-tiny", "takes 32 px images",
                          "--image-size 32")
    assert_one_line_error(runner.invoke(main, base + ["--image-size", "32", "--blocks", "5"]), "pass 1 to 4")
    unknown = base.copy()
    unknown[unknown.index("vit-tiny")] = "vit_q_99"
    assert_one_line_error(runner.invoke(main, unknown), "unknown backbone 'vit_q_99'", "vit_b_16")


def test_lp_ft_refuses_a_cache_of_another_transform(shapes, tmp_path):
    """A CLIP cache is made with open_clip's preprocessing; LP-FT's run sees DomainBed's: one line, not a probe
    fitted on other images."""
    pytest.importorskip("open_clip")
    weights = tmp_path / "clip.pt"
    torch.save(load_backbone(TINY_CLIP, "none").model.state_dict(), weights)
    cache = extract_features(shapes, tmp_path / "c.h5", backbone=TINY_CLIP, weights=str(weights), image_size=32,
                             workers=0, device="cpu", progress=False).path
    config = FineTuneConfig(steps=2, batch_size=2, eval_every=2, image_size=32, workers=0, channels_last=False,
                            lp_ft_cache=str(cache))
    with pytest.raises(LinftError, match="images transformed as Resize\\(32\\) \\[PIL bicubic\\], CenterCrop"):
        train_run(shapes, tmp_path / "ft", FineTuneRun("photo", 0, 1e-3, 0.0, lp_ft=True), backbone=TINY_CLIP,
                  weights=str(weights), config=config, device="cpu", progress=False)


@pytest.mark.parametrize("backbone", ["demo-resnet", "vit-tiny", TINY_CLIP])
def test_a_linft_selected_checkpoint_loads_as_a_backbone(backbone, shapes, tmp_path):
    """`load_backbone(name, ".../selected.pt")`: linft's head fc.1.* (Dropout → Linear) is read as the backbone's fc;
    the loaded network computes what the run's network computed at its selected step (in eval mode, where the
    dropout is the identity)."""
    if backbone.startswith("clip:"):
        pytest.importorskip("open_clip")
    networks = {}

    def remember(event):
        networks[event.step] = copy.deepcopy(event.model).eval()

    result = train_run(shapes, tmp_path / "run", RUN, backbone=backbone, weights="none", config=CFG, device="cpu",
                       progress=False, hooks=RunHooks(on_eval=remember))
    state, meta = load_selected(result.run_dir)
    assert "fc.1.weight" in state and "fc.weight" not in state
    bb = load_backbone(backbone, str(result.run_dir / "selected.pt"))
    assert isinstance(bb.model.fc, torch.nn.Linear) and bb.model.fc.out_features == 2
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), networks[meta["step"]](x), rtol=1e-5, atol=1e-5)

"""FineTuneConfig.augment: the choice of training augmentation ("pil", "tensor", "none"), its place in a run's
identity, and the tensor augmentation inside fine-tuning: seeded by (seed, held-out domain, step) only, so a run
is deterministic and resumes bit for bit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from linft.data.folders import load_image_folder
from linft.data.images import EvalImages
from linft.data.tensor_augment import augment_batch
from linft.protocol.records import read_records
from linft.train.finetune.run import run_identity, run_splits, train_run
from linft.train.finetune.hooks import RunHooks
from linft.train.finetune.model import (FineTuneConfig, FineTuneRun, augment_seed, build_run_model, finetune_label,
                                        run_optimizer, set_train_mode, train_batches, train_step)
from linft.train.finetune.run_folder import RunFolder
from helpers import refused

# evaluations at steps 0, 4 and 8: step 4 has a checkpoint and is neither the first nor the last evaluation
CFG = FineTuneConfig(steps=9, batch_size=4, eval_every=4, image_size=32, eval_batch_size=64, workers=0,
                     augment="tensor")
RUN = FineTuneRun("photo", seed=1, lr=0.01, weight_decay=1e-4, dropout=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ds(shapes_root):
    return load_image_folder(shapes_root)


def train(ds, out, config=CFG, stop_at_checkpoint: int | None = None):
    def on_checkpoint(step, _path):
        if step == stop_at_checkpoint:
            raise KeyboardInterrupt

    outcome = train_run(ds, out, RUN, backbone="demo-resnet", weights="DEFAULT", config=config, device="cpu",
                        progress=False, hooks=RunHooks(on_checkpoint=on_checkpoint))
    return outcome, read_records([outcome.run_dir / "records.jsonl"]) if outcome.run_dir.exists() else []


def test_augment_is_a_choice_of_three_and_part_of_the_run_id():
    assert FineTuneConfig().augment == "pil"  # the paper's protocol stays the default
    assert FineTuneConfig(augment=True).augment == "pil" and FineTuneConfig(augment=False).augment == "none"
    # pil and none enter the id as the booleans of earlier releases, so their runs keep their ids
    assert FineTuneConfig().protocol()["augment"] is True
    assert FineTuneConfig(augment="none").protocol()["augment"] is False
    ids = {a: run_identity(RUN, "demo-resnet", "w", "d", FineTuneConfig(augment=a)) for a in ("pil", "tensor", "none")}
    assert len({str(i) for i in ids.values()}) == 3
    assert finetune_label(RUN, "w", FineTuneConfig(augment="tensor")) == "full FT, tensor augmentation, dropout 0.5"
    assert finetune_label(RUN, "w", FineTuneConfig(augment="none")) == "full FT, no augmentation, dropout 0.5"
    assert finetune_label(RUN, "w", FineTuneConfig()) == "full FT, dropout 0.5"
    with refused("augment"):
        FineTuneConfig(augment="gpu").check()


def test_train_step_augments_with_the_seeds_of_its_step(ds):
    """train_step with augment="tensor" = augment_batch with the seeds augment_seed(seed, domain, step, j), then
    the unaugmented step: the same computations in the same order, so the models are equal bit for bit."""
    images = EvalImages(ds, 32, 64, 0).images[:8]
    labels = torch.as_tensor(ds.labels[:8]).long()
    models = []
    for config, batch in ((CFG, images),
                          (replace(CFG, augment="none"), augment_batch(images, [augment_seed(1, 2, 3, j)
                                                                                for j in range(8)]))):
        model, _ = build_run_model("demo-resnet", "DEFAULT", 2, RUN, torch.device("cpu"))
        set_train_mode(model, True)
        optimizer = run_optimizer(model, RUN)
        train_step(model, optimizer, batch, labels, 3, replace(RUN, seed=1), 2, config)
        models.append(model.state_dict())
    for k in models[0]:
        assert torch.equal(models[0][k], models[1][k]), k


def test_batches_from_decoded_images_equal_the_decoded_in_workers(ds):
    _, pools = run_splits(ds, RUN)
    decoded = EvalImages(ds, 32, 64, 0).images
    from_memory = train_batches(ds, pools, CFG, 1, 0, 2, decoded)
    from_workers = train_batches(ds, pools, CFG, 1, 0, 2)
    for _ in range(3):  # the same decoding function on the same files: equal bit for bit
        (a, ya, bad_a), (b, yb, bad_b) = next(from_memory), next(from_workers)
        assert torch.equal(a, b) and torch.equal(ya, yb) and bad_a is None and bad_b is None


def test_tensor_augmented_run_is_deterministic_and_resumes_exactly(ds, tmp_path):
    reference, records = train(ds, tmp_path / "a")
    assert reference.status == "trained" and [r["step"] for r in records] == [0, 4, 8]
    assert train(ds, tmp_path / "b")[1] == records  # the same run twice
    unaugmented = train(ds, tmp_path / "c", replace(CFG, augment="none"))[1]
    assert [r["loss"] for r in unaugmented] != [r["loss"] for r in records]  # the augmentation is applied

    with pytest.raises(KeyboardInterrupt):
        train(ds, tmp_path / "d", stop_at_checkpoint=4)
    folder = RunFolder(tmp_path / "d" / reference.run_id)
    assert folder.checkpoint.exists() and not folder.is_done()
    resumed, resumed_records = train(ds, tmp_path / "d")
    assert resumed.status == "resumed" and resumed.steps_trained == 4
    assert resumed_records == records

"""linft.data.images: the stored transform text, decoding, the one Dataset, seeded augmentation, normalisation."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from linft.data.folders import load_image_folder
from linft.data.images import (
    IMAGENET_MEAN, IMAGENET_STD, ImageFiles, augmented_views_uint8, decoded_batches, describe_transform,
    describe_views_transform, eval_transform, image_loader, load_image_uint8, normalize_uint8, train_augmentation,
)
from linft.data.splits import seed_hash
from linft.errors import LinftError

from conftest import make_image_folder

#: The text the previous release stored as a cache's "transform" attribute at 224 px. It is part of the
#: provenance hash: caches made by that release keep their hash only if this text comes out unchanged.
LEGACY_EVAL_224 = ("Resize((224, 224)) [PIL bilinear], ToTensor, "
                   "Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])")


def noise_image(path, size=(37, 23), mode="RGB", seed=0):
    """A random image of ``size`` (width, height) in PIL ``mode``, saved at ``path``."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    if mode == "P":
        img = img.quantize(64)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)
    return path


# ---------------------------------------------------------------- describe_transform

def test_eval_transform_text_is_the_legacy_text():
    assert describe_transform(eval_transform(224)) == LEGACY_EVAL_224


#: The text the previous release stored as "views_transform" (caches with augmented views) at 224 px.
LEGACY_VIEWS_224 = ("RandomResizedCrop(224, scale=(0.7, 1.0)), RandomHorizontalFlip, ColorJitter(0.3, 0.3, 0.3, 0.3), "
                    "RandomGrayscale, ToTensor, Normalize(ImageNet)")


def test_views_transform_text_is_the_legacy_text():
    assert describe_views_transform(224) == LEGACY_VIEWS_224


def test_description_names_every_parameter_that_differs_from_its_default():
    lopsided = transforms.Compose([transforms.ColorJitter(brightness=(0.5, 1.1)),
                                   transforms.RandomResizedCrop(64, ratio=(0.5, 2.0))])
    text = describe_transform(lopsided)
    assert text.startswith("ColorJitter((0.5, 1.1), 0, 0, 0), "
                           "RandomResizedCrop(64, scale=(0.08, 1.0), ratio=(0.5, 2.0))")
    nearest = transforms.RandomResizedCrop(64, interpolation=transforms.InterpolationMode.NEAREST)
    assert describe_transform(transforms.Compose([nearest])).startswith(
        "RandomResizedCrop(64, scale=(0.08, 1.0)) [PIL nearest]")


def test_description_follows_the_transform_parameters():
    assert describe_transform(eval_transform(224)) == describe_transform(eval_transform(224))
    assert describe_transform(eval_transform(160)) == LEGACY_EVAL_224.replace("(224, 224)", "(160, 160)")
    assert describe_transform(train_augmentation(224)) == describe_transform(train_augmentation(224))
    assert describe_transform(train_augmentation(160)) != describe_transform(train_augmentation(224))
    assert describe_transform(train_augmentation(160)).startswith("RandomResizedCrop(160, scale=(0.7, 1.0))")
    wider = train_augmentation(224)
    wider.transforms[0].scale = (0.5, 1.0)  # another crop scale
    assert "RandomResizedCrop(224, scale=(0.5, 1.0))" in describe_transform(wider)
    assert describe_transform(wider) != describe_transform(train_augmentation(224))
    other_norm = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert describe_transform(eval_transform(224), other_norm) != LEGACY_EVAL_224
    assert describe_transform(eval_transform(224), other_norm).endswith(
        "Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])")


# ---------------------------------------------------------------- decoding

@pytest.mark.parametrize("mode,ext,size,image_size", [
    ("RGB", ".png", (37, 23), 16),   # down-sampling (PIL antialiases), non-square
    ("L", ".png", (13, 20), 48),     # grayscale, up-sampling
    ("RGBA", ".png", (30, 30), 24),
    ("P", ".png", (25, 31), 16),     # palette
    ("RGB", ".jpg", (40, 29), 32),
])
def test_load_image_uint8_equals_pil_and_torchvision_functional(tmp_path, mode, ext, size, image_size):
    path = noise_image(tmp_path / f"img{ext}", size, mode)
    got = load_image_uint8(path, image_size)
    assert got.dtype == torch.uint8 and got.shape == (3, image_size, image_size)
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        by_functional = TF.pil_to_tensor(TF.resize(rgb, [image_size, image_size]))
        by_pil = torch.from_numpy(np.array(rgb.resize((image_size, image_size), Image.BILINEAR))).permute(2, 0, 1)
    # Bit for bit: all three end in the same call, PIL's Image.resize(..., BILINEAR) on the same decoded RGB image
    # (Pillow resamples 8-bit images in fixed-point integer arithmetic: the same result on any CPU).
    assert torch.equal(got, by_functional)
    assert torch.equal(got, by_pil)


# ---------------------------------------------------------------- ImageFiles

@pytest.fixture
def folder_with_bad_files(tmp_path):
    """A 2-domain, 1-class folder of 3 images each; row 1 is garbage, row 4 a truncated PNG."""
    root = make_image_folder(tmp_path / "d", domains=("a", "b"), classes=("x",), per_class=3, size=20)
    ds = load_image_folder(root)
    (root / ds.paths[1]).write_bytes(b"not an image at all")
    good = (root / ds.paths[4]).read_bytes()
    (root / ds.paths[4]).write_bytes(good[: len(good) // 2])
    return ds


def test_image_files_flags_an_unreadable_file_instead_of_raising(folder_with_bad_files):
    ds = folder_with_bad_files
    files = ImageFiles(ds, 16, views=2, views_seed=0)
    assert len(files) == 6
    for item in (1, (1, 7)):  # evaluation transform and seeded augmentation alike
        image, views, row, ok, error = files[item]
        assert row == 1 and ok is False
        assert error.startswith("UnidentifiedImageError: ") and "cannot identify image file" in error
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and not image.any()
        assert views.dtype == torch.uint8 and views.shape == (2, 3, 16, 16) and not views.any()
    image, views, row, ok, error = files[4]  # header readable, data cut: fails while decoding
    assert row == 4 and ok is False and error.startswith("OSError: ") and "truncated" in error
    image, views, row, ok, error = files[0]
    assert row == 0 and ok is True and error == ""
    assert torch.equal(image, load_image_uint8(ds.root / ds.paths[0], 16))
    assert views.shape == (2, 3, 16, 16)


def test_bad_rows_travel_flagged_through_the_loader_and_are_named_by_decoded_batches(folder_with_bad_files):
    ds = folder_with_bad_files
    images, _views, rows, ok, errors = next(iter(image_loader(ds, 16, batch_size=6, workers=0)))
    assert rows.tolist() == list(range(6))
    assert ok.tolist() == [True, False, True, True, False, True]
    assert errors[0] == "" and errors[1].startswith("UnidentifiedImageError")
    assert not images[1].any() and images[0].any()
    with pytest.raises(LinftError, match="cannot read image .*UnidentifiedImageError") as err:
        list(decoded_batches(ds, 16, [0, 2, 1], batch_size=3, workers=0))
    assert str(ds.root / ds.paths[1]) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- augmented views

def test_augmented_views_follow_their_seed_and_leave_the_callers_rng_alone(tmp_path):
    path = noise_image(tmp_path / "img.png", (40, 33))
    rng_before = torch.get_rng_state()
    a = augmented_views_uint8(path, 24, 3, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 24, 24)
    assert torch.equal(a, augmented_views_uint8(path, 24, 3, seed=5))  # the same seed, the same views
    b = augmented_views_uint8(path, 24, 3, seed=6)
    for j in range(3):
        assert not torch.equal(a[j], b[j])  # another seed, other views
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # view j is seeded by seed_hash(seed, j)
    # view j is train_augmentation drawn right after torch.manual_seed(seed_hash(seed, j))
    with Image.open(path) as img, torch.random.fork_rng(devices=[]):
        rgb = img.convert("RGB")
        torch.manual_seed(seed_hash(5, 2))
        assert torch.equal(a[2], train_augmentation(24)(rgb))
    assert augmented_views_uint8(path, 24, 0, seed=5).shape == (0, 3, 24, 24)


def test_image_files_views_are_the_same_in_a_worker_and_in_process(tmp_path):
    root = make_image_folder(tmp_path / "d", domains=("a",), classes=("x",), per_class=3, size=20)
    ds = load_image_folder(root)
    files = ImageFiles(ds, 16, views=2, views_seed=3)
    items = [(0, 11), (2, 11), (1, 12)]
    images, views, rows, ok, _ = next(iter(image_loader(ds, 16, items, batch_size=3, workers=1, views=2,
                                                        views_seed=3)))
    assert ok.all() and rows.tolist() == [0, 2, 1]
    for k, (i, seed) in enumerate(items):
        image, v, *_ = files[(i, seed)]
        assert torch.equal(images[k], image) and torch.equal(views[k], v)
        assert torch.equal(image, augmented_views_uint8(root / ds.paths[i], 16, 1, seed)[0])
        assert torch.equal(v, augmented_views_uint8(root / ds.paths[i], 16, 2, seed_hash("views", 3, i)))
    # the views of a row depend on views_seed, not on the item's own seed
    assert torch.equal(files[(0, 11)][1], files[(0, 99)][1]) and torch.equal(files[0][1], files[(0, 11)][1])
    assert not torch.equal(ImageFiles(ds, 16, views=2, views_seed=4)[0][1], files[0][1])


# ---------------------------------------------------------------- normalisation

def test_normalize_uint8_equals_to_tensor_and_normalize():
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.integers(0, 256, size=(3, 3, 10, 12), dtype=np.uint8))
    batch[0, :, 0, 0] = 0
    batch[0, :, 0, 1] = 255  # both ends of the range
    before = batch.clone()
    got = normalize_uint8(batch)
    assert got.dtype == torch.float32 and got.shape == batch.shape
    assert torch.equal(batch, before)  # the uint8 input is left alone
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    expected = torch.stack([normalize(transforms.ToTensor()(Image.fromarray(img.permute(1, 2, 0).numpy())))
                            for img in batch])
    # Two code paths (a batched (x / 255 - mean) / std with in-place ops, and ToTensor then Normalize per image,
    # which may compute in another order or multiply by 1/std): both are float32 with values within [-2.2, 2.7],
    # so they agree to a few roundings (ulp 2.4e-7 near 2): 1e-6 relative and absolute.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_only_a_dead_worker_is_reported_as_one():
    from linft.errors import worker_died
    died = worker_died(RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "))
    assert died is not None and "an image-decoding worker died (DataLoader worker (pid 4242)" in str(died)
    assert worker_died(RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")) is not None
    # an error raised inside a worker (torch re-raises it in the main process) is not a dead worker
    assert worker_died(RuntimeError("Caught RuntimeError in DataLoader worker process 0.")) is None
    assert worker_died(ValueError("DataLoader worker (pid 1) is killed by signal")) is None

"""The command line: real examples, and one-line errors with a non-zero exit and no traceback."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from linft.cli.main import main

from linft.data.shapes import SOURCE_SHAPES, SOURCE_STYLES
from linft.models import checkpoint_metadata

from conftest import assert_one_line_error, make_image_folder

SMALL = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--workers", "0", "--device", "cpu", "--quiet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_for_every_command():
    for args in ([], ["extract"], ["cache"], ["cache", "info"], ["cache", "verify"], ["demo"], ["demo-data"]):
        result = run(*args, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output
        assert "Example" in result.output or args in ([], ["cache"])


def test_installed_entry_point_runs_from_anywhere(tmp_path):
    exe = [sys.executable, "-m", "linft.cli.main", "--version"]
    out = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and "linft" in out.stdout


def test_extract_info_verify(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    result = run("extract", image_folder, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert "18 images extracted, 0 already done" in result.output
    result = run("extract", image_folder, "--out", out, *SMALL)
    assert result.exit_code == 0 and "0 images extracted, 18 already done" in result.output
    assert "already complete" in result.output
    info = run("cache", "info", out)
    assert info.exit_code == 0 and "layer4.0, layer4.1" in info.output and "complete" in info.output
    data = json.loads(run("cache", "info", out, "--json").output)
    assert data["num_examples"] == 18 and data["datasets"]["features"]["shape"] == [18, 2, 512]
    ok = run("cache", "verify", out, "--data", image_folder)
    assert ok.exit_code == 0 and "verified" in ok.output
    make_image_folder(image_folder, domains=("domB",), classes=("dog",), per_class=5, seed=3, ext=".jpg")
    bad = run("cache", "verify", out, "--data", image_folder, "--json")
    assert bad.exit_code == 1 and json.loads(bad.output)["ok"] is False


def test_extract_by_domainbed_name(tmp_path):
    make_image_folder(tmp_path / "PACS", domains=("art_painting", "cartoon", "photo", "sketch"),
                      classes=("dog", "horse"), per_class=1)
    out = tmp_path / "p.h5"
    result = run("extract", "pacs", "--data-root", tmp_path, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert json.loads(run("cache", "info", out, "--json").output)["dataset_name"] == "PACS"


def small(**overrides):
    """The small extraction options of SMALL with some replaced (``blocks=5`` -> ``--blocks 5``)."""
    opts = {"backbone": "resnet18", "weights": "none", "image-size": 32, "batch-size": 8, "workers": 0,
            "device": "cpu", **{k.replace("_", "-"): v for k, v in overrides.items()}}
    return [x for k, v in opts.items() for x in (f"--{k}", str(v))] + ["--quiet"]


@pytest.mark.parametrize("make,args,fragments", [
    (None, ["extract", "{tmp}/nowhere", *small()], ["does not exist"]),
    ("empty", ["extract", "{tmp}/empty", *small()], ["no domain sub-folders"]),
    ("mismatch", ["extract", "{tmp}/mm", *small()], ["class sets differ", "'b' lacks dog"]),
    ("ok", ["extract", "{tmp}/ok", *small(backbone="vgg16")], ["unknown backbone 'vgg16'"]),
    ("ok", ["extract", "{tmp}/ok", *small(blocks=5)], ["--blocks 5 is out of range"]),
    ("ok", ["extract", "{tmp}/ok", *small(weights="{tmp}/no.pt")], ["neither a weight name"]),
    ("ok", ["extract", "{tmp}/ok", *small(device="cuda:7" )], ["cuda:7"]),
    (None, ["cache", "info", "{tmp}/none.h5"], ["does not exist"]),
    (None, ["cache", "verify", "{tmp}/none.h5"], ["does not exist"]),
])
def test_bad_input_gets_a_one_line_error(tmp_path, make, args, fragments):
    if make == "empty":
        (tmp_path / "empty").mkdir()
    elif make == "mismatch":
        make_image_folder(tmp_path / "mm", domains=("a",), classes=("cat", "dog"), per_class=1)
        make_image_folder(tmp_path / "mm", domains=("b",), classes=("cat",), per_class=1)
    elif make == "ok":
        make_image_folder(tmp_path / "ok", domains=("a", "b"), classes=("cat",), per_class=1)
    assert_one_line_error(run(*[a.format(tmp=tmp_path) for a in args]), *fragments)


def test_corrupt_image_error_keeps_existing_cache(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    assert run("extract", image_folder, "--out", out, *SMALL).exit_code == 0
    before = out.read_bytes()
    (image_folder / "domA" / "cat" / "img00.png").write_bytes(b"broken")
    result = run("extract", image_folder, "--out", out, *SMALL)
    assert result.exit_code == 0 and "already complete" in result.output  # same file list, same provenance
    (image_folder / "domA" / "cat" / "img00.png").rename(image_folder / "domA" / "cat" / "img00b.png")
    result = run("extract", image_folder, "--out", out, *SMALL)
    assert_one_line_error(result, "different provenance (file_list_sha256)", "--force")
    assert out.read_bytes() == before
    result = run("extract", image_folder, "--out", out, "--force", *SMALL)
    assert_one_line_error(result, "cannot read image", "img00b.png", "--skip-bad-images")
    assert out.read_bytes() == before


def test_train_linear_then_report(image_folder, tmp_path):
    cache = tmp_path / "c.h5"
    assert run("extract", image_folder, "--out", cache, *SMALL).exit_code == 0
    args = ["train-linear", cache, "--dropout", "0", "--dropout", "0.9", "--probe", "--lr", "0.01",
            "--weight-decay", "0", "--seeds", "2", "--steps", "7", "--eval-every", "3", "--batch-size", "2",
            "--device", "cpu", "--quiet", "--out", tmp_path / "runs"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "18 runs trained, 0 already done" in result.output and "| linear FT, dropout 0.9 |" in result.output
    again = run(*args, "--json")
    assert again.exit_code == 0 and "0 runs trained, 18 already done" in again.output
    rows = json.loads(again.output[again.output.index("["):])
    assert {r["label"] for r in rows} == {"linear probe", "linear FT, dropout 0", "linear FT, dropout 0.9"}
    rep = run("report", tmp_path / "runs", "--out", tmp_path / "rep")
    assert rep.exit_code == 0 and (tmp_path / "rep" / "clouds.png").exists()


@pytest.mark.parametrize("extra,fragment", [
    (["--test-domains", "nowhere"], "held-out domain 'nowhere' is not in the cache"),
    (["--dropout", "1.0"], "outside [0, 1)"),
    (["--memory-gib", "1e-9"], "raise memory_budget to at least"),
    (["--memory-gib", "0"], "memory_budget must be positive"),
])
def test_train_linear_bad_input(image_folder, tmp_path, extra, fragment):
    cache = tmp_path / "c.h5"
    assert run("extract", image_folder, "--out", cache, *SMALL).exit_code == 0
    assert_one_line_error(run("train-linear", cache, "--steps", "2", "--quiet", "--out", tmp_path / "r", *extra),
                          fragment)


def test_train_linear_refuses_unfinished_cache(image_folder, tmp_path):
    import h5py

    cache = tmp_path / "p.h5"
    assert run("extract", image_folder, "--out", cache, *SMALL).exit_code == 0
    with h5py.File(cache, "r+") as f:  # as an extraction stopped after 10 of 18 images leaves it
        f.attrs["complete"] = False
        f.attrs["num_done"] = 10
    assert_one_line_error(run("train-linear", cache, "--quiet"), "unfinished extraction (10 of 18 images)")


def test_cli_pretrain_source_and_pretrain(tmp_path):
    runner = CliRunner()
    for args in (["pretrain", "--help"], ["pretrain-source", "--help"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0 and "Example" in result.output
    src = tmp_path / "src"
    result = runner.invoke(main, ["pretrain-source", str(src), "--per-class", "1", "--size", "16", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert f"{len(SOURCE_STYLES)} domains" in result.output
    assert len(list(src.rglob("*.png"))) == len(SOURCE_STYLES) * len(SOURCE_SHAPES)
    out = tmp_path / "cli.pt"
    args = ["pretrain", str(src), "--out", str(out), "--epochs", "1", "--batch-size", "16", "--image-size", "16",
            "--workers", "0", "--device", "cpu", "--quiet"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"saved {out}" in result.output
    assert checkpoint_metadata(out)["num_classes"] == 16
    assert_one_line_error(runner.invoke(main, args), "already exists", "--force")  # refuses to replace it
    result = runner.invoke(main, ["pretrain", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.pt")])
    assert_one_line_error(result, "does not exist")


def test_train_linear_refuses_a_domain_whose_images_were_all_skipped_before_training(image_folder, tmp_path):
    import h5py

    cache, out = tmp_path / "c.h5", tmp_path / "runs"
    assert run("extract", image_folder, "--out", cache, *SMALL).exit_code == 0
    with h5py.File(cache, "r+") as f:  # as --skip-bad-images leaves a domain of unreadable images
        f["valid"][...] = f["valid"][...] & (f["domains"][...] != 0)
    assert_one_line_error(run("train-linear", cache, "--steps", "2", "--quiet", "--test-domains", "dom C",
                              "--out", out),
                          "domain 'dom C' has no usable image")
    assert not out.exists()


@pytest.mark.parametrize("option,fragment", [("--per-class=0", "--per-class 0"), ("--per-class=-3", "--per-class -3"),
                                             ("--seed=-1", "--seed -1")])
def test_demo_data_bad_numbers_are_one_line(tmp_path, option, fragment):
    assert_one_line_error(run("demo-data", tmp_path / "d", "--size", "16", "--per-class", "1", option), fragment)
    assert not (tmp_path / "d").exists()

"""One precision for extraction, fine-tuning and interpolation: the same values, default and validator
(:data:`linft.runtime.PRECISIONS`), the CPU always in float32, and caches that keep their provenance."""

from __future__ import annotations

import importlib

import h5py
import pytest
import torch
from click.testing import CliRunner

from linft.interpolation.run import InterpolateConfig
from linft.cache.extract import ExtractConfig, compute_text, extract_features
from linft.cache.format import cache_info, provenance_sha256, read_attrs, write_attrs
from linft.cli.main import COMMANDS, main
from linft.runtime import DEFAULT_PRECISION, PRECISIONS, autocast, check_precision, effective_precision
from linft.train.finetune.model import FineTuneConfig
from helpers import refused

from conftest import assert_one_line_error

SMALL = dict(backbone="resnet18", weights="none", image_size=32, batch_size=4, workers=0, device="cpu",
             progress=False)
SMALL_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
              "--workers", "0", "--device", "cpu", "--quiet"]


def command(name: str):
    module, attribute = COMMANDS[name]
    return getattr(importlib.import_module(f"linft.cli.{module}"), attribute)


def test_one_default_and_one_validator_for_the_three_configs():
    configs = [ExtractConfig(), FineTuneConfig(), InterpolateConfig()]
    assert {c.precision for c in configs} == {DEFAULT_PRECISION}
    assert list(PRECISIONS) == ["float32", "bfloat16", "float16"]
    for config in configs:
        bad = type(config)(**{**config.__dict__, "precision": "fp16"})
        with refused("precision"):
            bad.check()
    with refused("precision"):
        check_precision("half")


@pytest.mark.parametrize("name", ["extract", "finetune", "interpolate"])
def test_the_three_commands_have_the_same_precision_option(name):
    options = {o.name: o for o in command(name).params}
    precision = options["precision"]
    assert list(precision.type.choices) == list(PRECISIONS) and precision.default == DEFAULT_PRECISION
    assert "amp" not in options and "no_amp" not in options  # the old switches are only hidden aliases now
    assert "float32" in precision.help and "CPU always computes in float32" in precision.help


def test_the_cpu_computes_in_float32_whatever_the_precision():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert {effective_precision(cpu, p) for p in PRECISIONS} == {"float32"}
    assert [effective_precision(cuda, p) for p in PRECISIONS] == list(PRECISIONS)  # a device object needs no GPU
    x = torch.randn(4, 4)
    for p in PRECISIONS:
        with autocast(cpu, p):
            assert (x @ x).dtype == torch.float32


def test_cache_compute_text_is_that_of_earlier_releases_for_the_same_computation():
    # release 0.2.0 wrote "float32" (CPU, or --no-amp) and "cuda autocast float16" (its CUDA default)
    assert compute_text("float32") == "float32"
    assert compute_text("float16") == "cuda autocast float16"
    assert compute_text("bfloat16") == "cuda autocast bfloat16"


def test_cpu_caches_keep_their_provenance_whatever_the_precision(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    first = extract_features(image_folder, out, precision="float16", **SMALL)
    assert first.status == "extracted" and cache_info(out)["compute"] == "float32"
    for precision in ("float32", "bfloat16"):
        assert extract_features(image_folder, out, precision=precision, **SMALL).status == "up-to-date"
    assert extract_features(image_folder, out, **SMALL).status == "up-to-date"  # the default


def test_a_cache_of_another_precision_is_refused_with_the_precision_that_reuses_it(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    extract_features(image_folder, out, **SMALL)
    with h5py.File(out, "r+") as f:  # as if made on CUDA by release 0.2.0's default (float16 autocast)
        attrs = read_attrs(f)
        attrs["compute"] = "cuda autocast float16"
        attrs["provenance_sha256"] = provenance_sha256(attrs)
        write_attrs(f, {k: attrs[k] for k in ("compute", "provenance_sha256")})
    result = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(out), *SMALL_ARGS])
    assert_one_line_error(result, "different provenance (compute)", "cuda autocast float16",
                          "--precision float16 reuses it", "--force")


def test_finetune_refuses_float16_in_one_line(image_folder):
    with refused("precision"):
        FineTuneConfig(precision="float16").check()
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--precision", "float16", "--backbone",
                                       "resnet18", "--weights", "none", "--seeds", "1", "--device", "cpu", "--quiet"])
    assert_one_line_error(result, "float16", "bfloat16")


def test_deprecated_switches_still_work_with_a_warning(image_folder, tmp_path):
    out = tmp_path / "c.h5"
    result = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(out), "--no-amp", *SMALL_ARGS])
    assert result.exit_code == 0, result.output
    assert "warning: --no-amp is deprecated; use --precision float32" in result.output
    both = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(out), "--no-amp", "--precision",
                                     "float16", *SMALL_ARGS])
    assert_one_line_error(both, "--no-amp (deprecated) means --precision float32")
    help_text = CliRunner().invoke(main, ["extract", "--help"]).output
    assert "--no-amp" not in help_text and "--precision" in help_text

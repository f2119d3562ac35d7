"""The library names parameters, the command line names flags: cli/flags.py maps one to the other, from each click
command's own options, and the error handler shows the flag."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from linft.cache import extract_features
from linft.cli.flags import ALIASES, flag_of, in_flags
from linft.cli.main import COMMANDS, main
from linft.errors import LinftError

from conftest import assert_one_line_error


def command(name: str):
    return main.get_command(None, name)


@pytest.mark.parametrize("name,param,flag", [
    ("extract", "workers", "--workers"),
    ("extract", "num_blocks", "--blocks"),     # the option's flag, not its parameter's name
    ("extract", "out", "--out"),
    ("finetune", "out_dir", "--out"),          # a library name that differs from the option's (ALIASES)
    ("finetune", "lr", "--lr"),
    ("demo-data", "out_dir", "OUT_DIR"),       # an argument: its metavar
    ("cache", "data", "--data"),               # a group: its subcommands' options (cache verify --data)
    ("report", "workers", None),               # a parameter the command does not have
])
def test_flag_of_reads_the_command(name, param, flag):
    assert flag_of(command(name), param) == flag


@pytest.mark.parametrize("name,message,param,shown", [
    ("extract", "workers must be >= 0, got -1", "workers", "--workers must be >= 0, got -1"),
    ("finetune", "linearized and stochastic_depth do not combine; run them separately", "linearized",
     "--linearized and --stochastic-depth do not combine; run them separately"),
    ("extract", "c.h5 exists; pass force=True to replace it or choose another out", "out",
     "c.h5 exists; pass --force to replace it or choose another --out"),
    ("extract", "vit takes 32 px images; pass image_size=32", "image_size",
     "vit takes 32 px images; pass --image-size 32"),
    ("extract", "device cuda asked for but CUDA is not available; use device='cpu'", "device",
     "--device cuda asked for but CUDA is not available; use --device cpu"),
    ("report", "workers must be >= 0, got -1", "workers", "workers must be >= 0, got -1"),  # no such option: as is
    ("extract", "cannot read /data/out_dir/workers/x.png", None, "cannot read /data/out_dir/workers/x.png"),  # a path
    ("finetune", "a run of 300 steps", None, "a run of 300 steps"),  # an English word that is also an option
])
def test_in_flags(name, message, param, shown):
    assert in_flags(message, param, command(name)) == shown


def test_every_alias_names_an_option_of_some_command():
    names = {p.name for name in COMMANDS for p in command(name).params}
    names |= {p.name for sub in command("cache").commands.values() for p in sub.params}
    assert set(ALIASES.values()) <= names


def test_the_cli_shows_the_flag_of_a_library_error(image_folder, tmp_path):
    small = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--device", "cpu", "--quiet"]
    result = CliRunner().invoke(main, ["extract", str(image_folder), "--out", str(tmp_path / "c.h5"), *small,
                                       "--workers", "-1"])
    assert_one_line_error(result, "Error: --workers must be >= 0, got -1")
    result = CliRunner().invoke(main, ["finetune", str(image_folder), "--out", str(tmp_path / "ft"), *small,
                                       "--linearized", "--stochastic-depth", "0.1"])
    assert_one_line_error(result, "Error: --linearized and --stochastic-depth do not combine")
    result = CliRunner().invoke(main, ["pretrain-source", str(tmp_path / "src"), "--per-class", "0"])
    assert_one_line_error(result, "Error: --per-class must be at least 1, got 0")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "c.h5").exists()


def test_a_notebook_reads_the_parameter(image_folder, tmp_path):
    with pytest.raises(LinftError) as err:
        extract_features(image_folder, tmp_path / "c.h5", workers=-1, progress=False)
    assert err.value.param == "workers" and str(err.value) == "workers must be >= 0, got -1"

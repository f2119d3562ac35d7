"""Outputs never land inside inputs: an output inside an image dataset (or a dataset inside an output) is refused in
one line by every command that writes next to images, and nothing is written."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from linft.cli.main import main
from linft.data.folders import check_output_apart, dataset_holding
from linft.errors import LinftError

from conftest import assert_one_line_error, make_image_folder
from helpers import grid_records


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_dataset_is_found_around_any_path_inside_it(tmp_path):
    data = make_image_folder(tmp_path / "toy")
    assert dataset_holding(data / "runs") == data.resolve()
    assert dataset_holding(data / "domA" / "report" / "deeper") == data.resolve()
    assert dataset_holding(data / "domA" / "cat" / "x.h5") == data.resolve()
    assert dataset_holding(tmp_path / "runs") is None  # beside the dataset, not in it
    assert dataset_holding(tmp_path / "toy.h5") is None
    (tmp_path / "docs" / "notes").mkdir(parents=True)  # a folder of other things is no dataset
    assert dataset_holding(tmp_path / "docs" / "out") is None


def test_a_folder_of_reports_is_no_dataset(tmp_path):
    """reports/<name>/ holds PNG figures, like a class folder holds images; its summary.md (or a sweep's records)
    says it is linft's output, so the project folder around it is not taken for a one-domain dataset."""
    project = tmp_path / "project"
    for name in ("figure2", "figure6"):
        (project / "reports" / name).mkdir(parents=True)
        (project / "reports" / name / "clouds.png").write_bytes(b"\x89PNG")
        (project / "reports" / name / "summary.md").write_text("# linft report\n")
    assert dataset_holding(project / "runs" / "VLCS") is None
    check_output_apart(project / "runs" / "VLCS", param="out_dir")
    (project / "reports" / "figure6" / "summary.md").unlink()  # now figure6 is laid out as a class: still no
    assert dataset_holding(project / "runs" / "VLCS") is None  # dataset, since figure2 is not one


def test_outputs_and_named_datasets_must_be_apart(tmp_path):
    data = tmp_path / "empty-dataset"  # named: refused even before it holds images
    data.mkdir()
    for out, fragment in ((data / "o", "inside"), (data, "inside"), (tmp_path, "inside")):
        with pytest.raises(LinftError, match=fragment) as info:
            check_output_apart(out, [data], param="out_dir")
        assert info.value.param == "out_dir"
    check_output_apart(tmp_path / "elsewhere", [data], param="out_dir")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def toy(tmp_path):
    return make_image_folder(tmp_path / "toy", per_class=3, size=16)


def test_finetune_refuses_an_output_inside_its_dataset_and_a_dataset_inside_its_output(toy, tmp_path):
    before = snapshot(tmp_path)
    for out in (toy / "runs", toy / "domA" / "runs", tmp_path):
        result = run("finetune", toy, "--out", out, "--backbone", "resnet18", "--weights", "none", "--steps", "1",
                     "--seeds", "1", "--lr", "0.01", "--weight-decay", "0", "--dropout", "0", "--image-size", "32")
        assert_one_line_error(result, "inside")
        assert snapshot(tmp_path) == before


def test_extract_refuses_a_cache_inside_its_dataset(toy, tmp_path):
    before = snapshot(tmp_path)
    result = run("extract", toy, "--out", toy / "domA" / "c.h5", "--backbone", "resnet18", "--weights", "none",
                 "--image-size", "32", "--quiet")
    assert_one_line_error(result, "inside")
    assert snapshot(tmp_path) == before


def test_report_refuses_an_output_inside_a_dataset(toy, tmp_path):
    records = tmp_path / "runs" / "records.jsonl"
    records.parent.mkdir()
    records.write_text("".join(json.dumps(r) + "\n" for r in grid_records()))
    before = snapshot(tmp_path)
    result = run("report", tmp_path / "runs", "--out", toy / "report")
    assert_one_line_error(result, "inside")
    assert snapshot(tmp_path) == before
    assert run("report", tmp_path / "runs", "--out", tmp_path / "report").exit_code == 0  # beside it: fine


def test_train_linear_refuses_an_output_inside_the_dataset_of_its_cache(toy, tmp_path):
    from linft.cache.extract import ExtractConfig, extract_features

    cache = tmp_path / "c.h5"
    extract_features(toy, cache, ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=8,
                                               device="cpu", dtype="float32"), progress=False)
    before = snapshot(tmp_path)
    for out in (toy / "linear", toy / "domA" / "linear"):
        result = run("train-linear", cache, "--out", out, "--steps", "2", "--seeds", "1", "--quiet")
        assert_one_line_error(result, "inside")
        assert snapshot(tmp_path) == before

"""Every recipe of docs/paper.md, run at demo scale: the commands of its ```bash blocks through the ``linft`` click
group, then the report's figure, checked through the library (the series, their roles and markers).

A recipe is a heading of docs/paper.md with a ``**Shown in:**`` line (the file the report writes). Its blocks are
read as the shell would: continuation lines joined, ``#`` comments dropped, ``for VAR in A B ...; do`` ... ``done``
loops run with their FIRST value only (every loop of the page is over datasets: the first dataset stands for all).
Report inputs of the datasets a loop skipped are dropped. Each recipe runs once, in one working folder, after the
recipes that write what it reads (a report input, ``--finetuned``, a cache, a ``Shown in`` file).

The one substitution table, paper -> demo (:func:`demo_command`):

============================================  =====================================================================
paper                                         demo
============================================  =====================================================================
DATASET (PACS, VLCS, OfficeHome,              the demo benchmark (``linft.data.shapes.write_demo_data``, 4 per
TerraIncognita, DomainNet), ``--data-root``   class per domain) under that name: ``BENCH/<name>``, a link to it
``--backbone resnet50`` (the default)         ``--backbone demo-resnet --image-size 64``
``--weights DEFAULT`` / ``IMAGENET1K_V2``     ``DEFAULT`` (the shipped demo-resnet file)
``--weights IMAGENET1K_V1``                   a second network: the shipped file, seeded noise on its conv kernels
``--steps``, ``--eval-every``                 2 and 1 (evaluations at steps 0 and 1)
``--seeds`` (3)                               1
weight decay grid {1e-4, 5e-5, 1e-5}          1e-4 alone (the lr grids, 2 values each, are kept)
``--batch-size`` (32)                         4
``--alphas`` (0:1:11)                         0,0.5,1
``--launcher slurm`` and ``--slurm-*``        dropped (the local launcher)
``RUN_ID``                                    the first run of its folder labelled ``full FT, dropout 0``
(added)                                       ``--workers 0 --quiet`` where the command has them
============================================  =====================================================================

Figure 1's CLIP block needs OpenAI's and model soups' weights (downloads): it is parsed against the click group
(every command and option exists, values in place), not run.
"""

from __future__ import annotations

import os
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from linft.analysis.aggregate import domainbed_table, run_results
from linft.analysis.figures import (figure2_points, figure3_points, figure4_points, figure5_points, figure6_points,
                                    figure7_points, figure8_points, figure9_points, figure10_points)
from linft.analysis.report import FIGURES, is_interpolation, report_figures
from linft.cli.main import main
from linft.data.shapes import write_demo_data
from linft.models import SHIPPED_CHECKPOINT
from linft.models.checkpoints import read_state_dict
from linft.protocol.records import read_records
from linft.train.sweeps.status import sweep_status

PAPER_MD = Path(__file__).resolve().parents[2] / "docs" / "paper.md"
DATASETS = ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet")
PER_CLASS = 4

# -- the substitution table (see the module docstring) ----------------------------------------------------------------

#: Options dropped from every command.
DROPPED = {"--data-root", "--launcher", "--slurm-partition", "--slurm-timeout", "--slurm-gpus", "--no-wait", "--gpus"}
TRAIN, IMAGES = ("finetune", "train-linear"), ("extract", "finetune")
#: Options set to a value (replaced, or added) in the commands named: option -> (value, commands).
SET = {"--backbone": ("demo-resnet", IMAGES), "--image-size": ("64", IMAGES), "--steps": ("2", TRAIN),
       "--eval-every": ("1", TRAIN), "--seeds": ("1", TRAIN), "--weight-decay": ("1e-4", TRAIN),
       "--batch-size": ("4", TRAIN), "--alphas": ("0,0.5,1", ("interpolate",)),
       "--workers": ("0", ("extract", "finetune", "interpolate"))}
#: Flags added where the command has them.
ADDED_FLAGS = ("--quiet",)
#: --weights: the paper's name -> the demo's (IMAGENET1K_V1: the file the ``runner`` fixture writes).
WEIGHTS = {"DEFAULT": "DEFAULT", "IMAGENET1K_V2": "DEFAULT", "none": "none"}
#: Placeholder of a run folder in the page -> the label of the run that replaces it.
RUN_ID = ("RUN_ID", "full FT, dropout 0")


def command_of(name: str) -> click.Command:
    """The click command ``linft NAME`` (commands are loaded when asked for)."""
    command = main.get_command(click.Context(main), name)
    assert command is not None, f"linft {name}: no such command"
    return command


def split_options(command: click.Command, words: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """``(positionals, [(option, value or None for a flag), ...])``; an option the command lacks fails."""
    params = {o: p for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}
    positionals, options, words = [], [], list(words)
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            positionals.append(word)
            continue
        assert word in params, f"linft {command.name}: no option {word}"
        options.append((word, None if params[word].is_flag else words.pop(0)))
    return positionals, options


def demo_command(words: list[str], bench: Path, v1_weights: Path, skipped: set[str]) -> list[str]:
    """A ``linft`` command of the page (its words after ``linft``) with the substitution table applied."""
    name, command = words[0], command_of(words[0])
    accepted = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
    positionals, options = split_options(command, words[1:])
    if name == "report":  # the records of datasets the loops skipped are not there
        positionals = [p for p in positionals if not set(Path(p).parts) & skipped]
    elif positionals and positionals[0] in DATASETS:
        positionals[0] = str(bench / positionals[0])
    out = [name, *positionals]
    for option, value in options:
        if option in DROPPED or (option in SET and name in SET[option][1]):
            continue
        if option == "--weights":
            value = WEIGHTS.get(value, str(v1_weights) if value == "IMAGENET1K_V1" else None)
            assert value is not None, f"no demo weights for {words}"
        out += [option] if value is None else [option, value]
    for option, (value, commands) in SET.items():
        if name in commands:
            out += [option, value]
    return out + [flag for flag in ADDED_FLAGS if flag in accepted]


# -- the page ---------------------------------------------------------------------------------------------------------

LOOP = re.compile(r"^for (\w+) in ([^;]+); do$")


@dataclass
class Recipe:
    """One heading of docs/paper.md with a ``Shown in`` file: its commands (loops expanded to their first value)."""

    heading: str
    shown_in: str
    commands: list[list[str]] = field(default_factory=list)  # the words after ``linft``
    other_lines: list[str] = field(default_factory=list)  # shell lines that are not linft commands
    skipped: set[str] = field(default_factory=set)  # loop values not run


def read_block(block: str, recipe: Recipe) -> None:
    """Add a bash block's commands to ``recipe``, as the shell would run them with each loop's first value."""
    loop = None
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        head = LOOP.match(line)
        if head:
            values = head.group(2).split()
            loop = (head.group(1), values[0])
            recipe.skipped |= set(values[1:])
            continue
        if line == "done":
            loop = None
            continue
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] != "linft":
            recipe.other_lines.append(line)
            continue
        if loop:
            words = [w.replace(f"${loop[0]}", loop[1]) for w in words]
        recipe.commands.append(words[1:])


def read_recipes(path: Path = PAPER_MD) -> dict[str, Recipe]:
    """``{heading: Recipe}`` of every heading with a ``**Shown in:**`` line, in page order."""
    recipes = {}
    for section in re.split(r"^(?=#{2,3} )", path.read_text(encoding="utf-8"), flags=re.M)[1:]:
        heading = section.splitlines()[0].lstrip("#").strip()
        shown = re.search(r"^\*\*Shown in:\*\* `([^`]+)`", section, flags=re.M)
        if shown is None:
            continue
        recipe = Recipe(heading, shown.group(1))
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
            read_block(block, recipe)
        recipes[heading] = recipe
    return recipes


RECIPES = read_recipes()


def recipe_named(prefix: str) -> Recipe:
    found = [r for h, r in RECIPES.items() if h.startswith(prefix)]
    assert len(found) == 1, f"docs/paper.md: {len(found)} recipes start with {prefix!r}"
    return found[0]


# -- running the recipes ----------------------------------------------------------------------------------------------


@contextmanager
def inside(folder: Path):
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def outputs(recipe: Recipe) -> list[str]:
    return [words[words.index("--out") + 1] for words in recipe.commands if "--out" in words]


def inputs(recipe: Recipe) -> list[str]:
    """What a recipe reads that a command of it does not write: report records, checkpoints, caches, its figure."""
    found = [recipe.shown_in]
    for words in recipe.commands:
        if words[0] in ("report", "status", "train-linear"):
            found += [w for w in words[1:] if re.match(r"^(runs|features_cache)/", w)]
        if "--finetuned" in words:
            found.append(words[words.index("--finetuned") + 1])
    return [path for path in found if not set(Path(path).parts) & recipe.skipped]


def within(path: str, folder: str) -> bool:
    return Path(folder) == Path(path) or Path(folder) in Path(path).parents


class Runner:
    """Runs the recipes at demo scale in one working folder, each once, what it reads first."""

    def __init__(self, work: Path, bench: Path, v1_weights: Path):
        self.work, self.bench, self.v1_weights = work, bench, v1_weights
        self.done: dict[str, list] = {}

    def producer(self, path: str, recipe: Recipe) -> Recipe | None:
        return next((r for r in RECIPES.values() if r is not recipe and any(within(path, o) for o in outputs(r))),
                    None)

    def ensure(self, recipe: Recipe) -> list:
        """Run ``recipe`` (after the recipes it reads from) unless done; return ``[(argv, CliRunner result)]``."""
        if recipe.heading not in self.done:
            self.done[recipe.heading] = []  # a cycle would stop here
            for path in inputs(recipe):
                if not any(within(path, o) for o in outputs(recipe)):
                    source = self.producer(path, recipe)
                    assert source is not None, f"{recipe.heading}: nothing in docs/paper.md writes {path}"
                    self.ensure(source)
            self.done[recipe.heading] = [self.run(words, recipe) for words in recipe.commands]
        return self.done[recipe.heading]

    def run(self, words: list[str], recipe: Recipe):
        argv = demo_command(words, self.bench, self.v1_weights, recipe.skipped)
        with inside(self.work):
            argv = [self.run_id(w) if w.endswith("/" + RUN_ID[0]) else w for w in argv]
            result = CliRunner().invoke(main, argv)
        assert result.exit_code == 0, (f"{recipe.heading}: linft {' '.join(argv)} exited {result.exit_code}\n"
                                       f"{result.output}\n{result.exception!r}")
        return argv, result

    @staticmethod
    def run_id(word: str) -> str:
        folder = word.rsplit("/", 1)[0]
        runs = [r for r in sweep_status(folder).runs if r.label == RUN_ID[1] and r.state == "done"]
        assert runs, f"no done run labelled {RUN_ID[1]!r} in {folder}"
        return str(Path(folder) / sorted(r.run_id for r in runs)[0])

    def report_of(self, shown_in: str) -> tuple[Path, list[Path]]:
        """The report folder of a ``Shown in`` file and the records the command that wrote it read (run)."""
        folder = str(Path(shown_in).parent)
        for recipe in RECIPES.values():
            for words in recipe.commands:
                if words[0] == "report" and words[words.index("--out") + 1] == folder:
                    self.ensure(recipe)
                    argv = demo_command(words, self.bench, self.v1_weights, recipe.skipped)
                    records, _ = split_options(command_of("report"), argv[1:])
                    return self.work / folder, [self.work / r for r in records]
        raise AssertionError(f"no linft report writes {folder}")


@pytest.fixture(scope="module")
def runner(tmp_path_factory, one_thread) -> Runner:
    """The demo benchmark under every dataset name, a second demo network (ResNet #1's stand-in), a working folder."""
    root = tmp_path_factory.mktemp("paper")
    demo = write_demo_data(root / "demo-shapes", seed=0, per_class=PER_CLASS)
    bench = root / "bench"
    bench.mkdir()
    for name in DATASETS:
        (bench / name).symlink_to(demo, target_is_directory=True)
    state = read_state_dict(SHIPPED_CHECKPOINT)
    noise = torch.Generator().manual_seed(0)
    v1 = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=noise) if v.ndim == 4 else v  # conv kernels
          for k, v in state.items()}
    torch.save(v1, root / "demo_resnet_v1.pt")
    work = root / "work"
    work.mkdir()
    return Runner(work, bench, root / "demo_resnet_v1.pt")


# -- what each figure must draw ---------------------------------------------------------------------------------------

#: The paper's markers (linft.analysis.figures.ROLE_STYLES): role -> (marker, drawn as one point).
PAPER_MARKERS = {"baseline": ("o", False), "dropout": ("D", False), "trajectory ensemble": ("^", False),
                 "trajectory average": ("*", False), "ensemble": ("^", True), "soup": ("*", True),
                 "greedy soup": ("P", True), "stochastic depth": ("o", False)}
FIGURE2_ROLES = {"baseline", "dropout", "trajectory ensemble", "trajectory average", "ensemble", "soup", "greedy soup"}


@dataclass
class Drawn:
    """A report's results and the figures :func:`report_figures` draws of them."""

    folder: Path
    results: list
    curves: list
    figures: dict

    def drawn_labels(self, name: str) -> list[str]:
        """The legend labels of every scatter series of figure ``name``."""
        return [c.get_label() for ax in self.figures[name].axes for c in ax.collections if c.get_label()[:1] != "_"]


def drawn(runner: Runner, recipe: Recipe) -> Drawn:
    """Run the recipe, then read the records its report read, and check the figure's file is in the report."""
    runner.ensure(recipe)
    folder, records = runner.report_of(recipe.shown_in)
    everything = run_results(read_records(records))
    results = [r for r in everything if not is_interpolation(r)]
    curves = [r for r in everything if is_interpolation(r)]
    figures = report_figures(results, curves, figure2_points(results))
    name = Path(recipe.shown_in).stem
    if name in FIGURES:
        assert name in figures, f"{recipe.heading}: the report draws no {name} ({sorted(figures)})"
    assert (runner.work / recipe.shown_in).is_file(), recipe.shown_in
    return Drawn(folder, results, curves, figures)


def roles(points: dict) -> dict[str, str]:
    """``{label: role}`` of a figure's points (labels of one dataset and model)."""
    return {k[2]: fp.role for k, fp in points.items()}


def assert_paper_markers(points: dict) -> None:
    for key, fp in points.items():
        assert (fp.marker, fp.single) == PAPER_MARKERS[fp.role], (key, fp.role, fp.marker)
        assert len(fp.points) == 1 if fp.single else len(fp.points) == 2 ** 4, (key, len(fp.points))  # 2 lrs, 4 domains


def assert_drawn(d: Drawn, name: str, labels) -> None:
    shown = d.drawn_labels(name)
    for label in labels:
        assert any(s.endswith(label) or s.startswith(f"{label} (") for s in shown), (name, label, shown)


def check_figure1(d: Drawn) -> None:
    paths = {r.method for r in d.curves}
    assert {"interpolation-weights", "interpolation-representation", "interpolation-linearized"} <= paths, paths
    assert {dict(r.grid)["alpha"] for r in d.curves} == {0.0, 0.5, 1.0}
    assert {r.dataset for r in d.curves} == {"VLCS"}


def check_figure2(d: Drawn) -> None:
    points = figure2_points(d.results)
    assert {k[0] for k in points} == {"VLCS"}
    assert set(roles(points).values()) == FIGURE2_ROLES
    assert roles(points)["full FT, dropout 0"] == "baseline" and roles(points)["full FT, dropout 0.9"] == "dropout"
    assert_paper_markers(points)
    assert_drawn(d, "clouds", roles(points))


def check_figure3(d: Drawn) -> None:
    series = figure3_points(d.results)
    assert series[("VLCS", d.results[0].model, "finetune", "full FT")]["rates"] == [0.0, 0.5, 0.9, 0.95]


def check_figure4(d: Drawn) -> None:
    series = figure4_points(d.results)
    assert [(k[0], k[2]) for k in series] == [("DomainNet", "finetune")], list(series)
    assert "15000/25000" in next(iter(series))[3]  # the label names the DomainNet milestones
    assert next(iter(series.values()))["rates"] == [0.0, 0.5, 0.9]
    assert not figure3_points(d.results)


def check_figure5(d: Drawn) -> None:
    series = figure5_points(d.results)
    assert [(k[0], k[2]) for k in series] == [("VLCS", "scratch")], list(series)
    assert next(iter(series.values()))["rates"] == [0.0, 0.5, 0.9]
    assert not figure3_points(d.results)


def check_figure6(d: Drawn) -> None:
    points = figure6_points(d.results)
    assert all("10x head lr" in label for label in roles(points))
    assert set(roles(points).values()) == FIGURE2_ROLES
    assert_paper_markers(points)
    assert_drawn(d, "figure6", roles(points))


#: The series of Figure 7 that linft draws today: the across-run ensemble and soups of the dropout models are
#: missing (see test_figure7_draws_the_ensemble_and_soups_of_dropout_models).
FIGURE7_ROLES = {"baseline", "dropout", "trajectory ensemble", "trajectory average"}


def check_figure7(d: Drawn) -> None:
    points = figure7_points(d.results)
    assert FIGURE7_ROLES <= set(roles(points).values()) <= FIGURE2_ROLES
    derived = [label for label, role in roles(points).items() if role not in ("baseline", "dropout")]
    assert derived and all("dropout 0.9" in label for label in derived), derived
    assert_paper_markers(points)
    assert_drawn(d, "figure7", roles(points))


def check_figure8(d: Drawn) -> None:
    points = figure8_points(d.results)
    methods = {r.label: r.method for r in d.results}
    assert {methods[label] for label in roles(points)} == {"linear-ft", "linear-probe", "finetune"}
    rates = ("0", "0.5", "0.9", "0.95")
    for method, start in (("linear-ft", "linear FT"), ("finetune", "full FT")):
        labels = {label for label in roles(points) if methods[label] == method}
        assert labels == {f"{start}, dropout {r}" for r in rates}, labels
    assert_drawn(d, "figure8", roles(points))


def check_figure9(d: Drawn) -> None:
    points = figure9_points(d.results)
    models = {k[1] for k in points}
    assert len(models) == 2, models
    for model in models:
        mine = {k[2]: fp for k, fp in points.items() if k[1] == model}
        assert {label for label, fp in mine.items() if fp.role == "naive"} == {"full FT, dropout 0"}
        assert "full FT, 10x head lr, dropout 0.9, trajectory average" in mine
        assert {(fp.role, fp.marker) for fp in mine.values()} == {("naive", "o"), ("advanced", "D")}
    # the call docs/paper.md gives for the paper's diamonds alone
    paper = figure9_points(d.results, naive=["full FT, dropout 0"],
                           advanced=["full FT, 10x head lr, dropout 0.9, trajectory average"])
    assert sorted(fp.role for fp in paper.values()) == ["advanced", "advanced", "naive", "naive"]
    assert_drawn(d, "figure9", [f"{k[1]}: {fp.role}, {k[2]}" for k, fp in points.items()])


def check_figure10(d: Drawn) -> None:
    points = figure10_points(d.results)
    depth = {f"full FT, stochastic depth {p}, dropout 0": "stochastic depth" for p in (0.1, 0.2, 0.3)}
    assert roles(points) == {"full FT, dropout 0": "baseline", "full FT, dropout 0.9": "dropout", **depth}
    assert_paper_markers(points)
    assert_drawn(d, "figure10", roles(points))


def check_tables(d: Drawn) -> None:
    table = domainbed_table(d.results, "iid", "domainbed")
    labels = {r.label for r in d.results}
    assert {label for _, label in table} == labels
    assert all(set(row) == {"cartoon", "painting", "photo", "sketch", "average"} for row in table.values())
    summary = (d.folder / "summary.md").read_text(encoding="utf-8")
    assert "ddof=0" in summary
    assert all(f"| {label} |" in summary for label in labels)
    assert (d.folder / "table.csv").is_file()


#: Recipe heading (its start) -> the check of what its report draws; None: parsed, not run.
CHECKS = {"Figure 1 with CLIP": None, "Figure 1 on a DomainBed dataset": check_figure1, "Figure 2:": check_figure2,
          "Figure 3:": check_figure3, "Figure 4:": check_figure4, "Figure 5:": check_figure5,
          "Figure 6:": check_figure6, "Figure 7:": check_figure7, "Figure 8:": check_figure8,
          "Figure 9:": check_figure9, "Figure 10:": check_figure10, "Tables:": check_tables}
#: The report file each figure of the paper is in (linft.analysis.report.FIGURES' names).
SHOWN_AS = {"Figure 1 on": "interpolation", "Figure 2:": "clouds", "Figure 3:": "dropout", "Figure 4:": "figure4",
            "Figure 5:": "figure5", "Figure 6:": "figure6", "Figure 7:": "figure7", "Figure 8:": "figure8",
            "Figure 9:": "figure9", "Figure 10:": "figure10"}


def test_every_recipe_has_a_check():
    assert sorted(RECIPES) == sorted(recipe_named(prefix).heading for prefix in CHECKS)
    for prefix, name in SHOWN_AS.items():
        assert Path(recipe_named(prefix).shown_in).name == f"{name}.png", prefix


def test_recipe_blocks_hold_only_linft_commands():
    """What the test runs is the whole recipe: outside the CLIP block (downloads), only linft commands."""
    for prefix, check in CHECKS.items():
        recipe = recipe_named(prefix)
        assert recipe.commands or prefix == "Figure 7:", prefix
        if check is not None:
            assert not recipe.other_lines, (prefix, recipe.other_lines)


def test_clip_figure1_commands_parse():
    """The CLIP block's commands parse against the click group: the command, each option and its value."""
    recipe = recipe_named("Figure 1 with CLIP")
    assert recipe.commands and all(words[0] == "interpolate" for words in recipe.commands)
    for words in recipe.commands:
        command = command_of(words[0])
        positionals, options = split_options(command, words[1:])
        assert not positionals
        ctx = command.make_context("interpolate", list(words[1:]), resilient_parsing=True)  # paths need not exist
        assert ctx.params["backbone"] == "clip:ViT-B-32" and ctx.params["pretrained"] == "openai"
        assert ctx.params["linearity"] and len([o for o, _ in options if o == "--ood"]) == 4


@pytest.mark.parametrize("prefix", [p for p, check in CHECKS.items() if check is not None])
def test_recipe_draws_its_figure(runner, prefix):
    recipe = recipe_named(prefix)
    CHECKS[prefix](drawn(runner, recipe))


def test_figure7_draws_the_ensemble_and_soups_of_dropout_models(runner):
    d = drawn(runner, recipe_named("Figure 7:"))
    assert set(roles(figure7_points(d.results)).values()) == FIGURE2_ROLES

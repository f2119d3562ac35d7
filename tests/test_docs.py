"""The reference in docs/ against the code: every option `--help` prints is in docs/commands.md and every option
listed there exists; every name a snippet of docs/api.md imports, and every ``linft.x.y`` the docs name, exists."""

import ast
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from linft.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMMANDS_MD = DOCS / "commands.md"
API_MD = DOCS / "api.md"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def commands(group=main, path=()):
    """``{("cache", "info"): command, ...}``: every leaf command of the ``linft`` group."""
    ctx = click.Context(group)
    found = {}
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            found.update(commands(command, path + (name,)))
        else:
            found[path + (name,)] = command
    return found


COMMANDS = commands()


def help_flags(path) -> set[str]:
    """The long options in the Options section of ``linft PATH --help`` (``--help`` itself aside)."""
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    options = result.output.split("\nOptions:\n", 1)[1]
    flags = set()
    for line in options.splitlines():
        m = re.match(r"^\s{2}(?:-\w, )?(--[\w-]+)(?:\s*/\s*(--[\w-]+))?", line)
        if m:
            flags.update(f for f in m.groups() if f)
    return flags - {"--help"}


def all_flags(command) -> set[str]:
    """Every long option the command accepts, hidden ones included."""
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts
            if o.startswith("--")} | {"--help"}


def sections(text: str) -> dict[tuple, str]:
    """``{("cache", "info"): text of the section '## `linft cache info`'}`` of docs/commands.md."""
    parts = re.split(r"^## `linft ([\w -]+)`\s*$", text, flags=re.M)
    return {tuple(parts[i].split()): parts[i + 1] for i in range(1, len(parts), 2)}


def listed_flags(section: str) -> set[str]:
    """The options a section lists: its lines ``- `--flag ...`: ...``."""
    return {m.group(1) for m in re.finditer(r"^- `(--[\w-]+)", section, flags=re.M)}


def test_help_output_is_parsed():
    assert {"--dropout", "--lr", "--memory-gib", "--out"} <= help_flags(("train-linear",))
    assert help_flags(("cache", "info")) == {"--json"}


def test_every_command_has_a_section_with_an_example():
    documented = sections(COMMANDS_MD.read_text(encoding="utf-8"))
    assert set(documented) == set(COMMANDS), set(documented) ^ set(COMMANDS)
    for path, text in documented.items():
        assert re.search(rf"```bash\n(?:.*\n)*?linft {' '.join(path)} ", text), f"no example of linft {' '.join(path)}"


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_commands_md_lists_exactly_the_options_of_help(path):
    section = sections(COMMANDS_MD.read_text(encoding="utf-8"))[path]
    printed, listed = help_flags(path), listed_flags(section)
    assert not printed - listed, f"linft {' '.join(path)}: options --help prints that docs/commands.md lacks"
    assert not listed - all_flags(COMMANDS[path]), f"linft {' '.join(path)}: listed options that do not exist"


def test_every_option_named_in_the_docs_exists():
    """A ``--flag`` in any prose of README.md or docs/ is an option of some linft command (a renamed option is
    found)."""
    known = set().union(*(all_flags(c) for c in COMMANDS.values())) | {"--version"}
    # flags of other programs the docs show in their own commands (pip, tensorboard)
    known |= {"--logdir"}
    unknown = {}
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md"]:
        bad = set(FLAG.findall(path.read_text(encoding="utf-8"))) - known - benchmark_flags(path)
        if bad:
            unknown[path.name] = sorted(bad)
    assert not unknown, unknown


def benchmark_flags(path: Path) -> set[str]:
    """The options of the benchmark scripts (named in benchmarks/README.md), read from their argparse calls."""
    if path != ROOT / "benchmarks" / "README.md":
        return set()
    flags = set()
    for script in (ROOT / "benchmarks").glob("*.py"):
        flags |= set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text(encoding="utf-8")))
    for script in (ROOT / "benchmarks").glob("*.sh"):
        flags |= set(FLAG.findall(script.read_text(encoding="utf-8")))
    return flags


def snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


def test_every_name_a_snippet_imports_exists():
    blocks = snippets(API_MD)
    assert len(blocks) >= 5
    missing = []
    for block in blocks:
        for node in ast.walk(ast.parse(block)):  # a snippet that is not valid Python fails here
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                missing += [f"{node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)
                            and not importlib.util.find_spec(f"{node.module}.{a.name}")]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    importlib.import_module(a.name)
    assert not missing, missing


def resolves(dotted: str) -> bool:
    """Whether ``linft.a.b.c`` is a module, or an attribute chain of the longest module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_dotted_linft_name_in_the_docs_exists():
    names = set()
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md",
                 ROOT / "CHANGELOG.md"]:
        names |= set(re.findall(r"`(linft(?:\.\w+)+)", path.read_text(encoding="utf-8")))
    names = {n for n in names if not n.startswith("linft.cli")}  # cli modules: the commands, checked above
    assert len(names) >= 20
    assert not [n for n in sorted(names) if not resolves(n)]


def package_rows():
    """Rows ``| `linft.pkg`, ... | ... `name` ... |`` of the package table in docs/api.md."""
    for line in API_MD.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| ((?:`linft\.[\w.]+`(?:, )?)+) \| (.*) \|$", line)
        if m:
            yield re.findall(r"`(linft\.[\w.]+)`", m.group(1)), re.findall(r"`([A-Za-z_]\w*)`", m.group(2))


def test_every_name_of_the_package_table_imports():
    rows = list(package_rows())
    assert len(rows) >= 8  # runtime/output, data, models, cache, protocol, train, interpolation, analysis
    missing = []
    for packages, names in rows:
        modules = [importlib.import_module(p) for p in packages]
        for name in names:
            if not any(hasattr(m, name) or (hasattr(m, "__path__") and importlib.util.find_spec(f"{m.__name__}.{name}"))
                       for m in modules):
                missing.append(f"{'/'.join(packages)}: {name}")
    assert not missing, missing


#: Pages written on another branch at the same time (docs/paper.md: the figures and tables of the paper); a link to
#: one is accepted while it is missing. Empty this once every branch is merged.
ELSEWHERE = {DOCS / "paper.md"}


def test_docs_links_point_to_files():
    broken = []
    for path in [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "README.md",
                 ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            linked = (path.parent / target).resolve()
            if "://" not in target and not linked.exists() and linked not in ELSEWHERE:
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def example_commands(path: Path) -> list[list[str]]:
    """The ``linft ...`` lines of a file's bash blocks (continuation lines joined, comments dropped), split."""
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("linft "):
                examples.append(shlex.split(line, comments=True)[1:])
    return examples


def test_every_example_names_a_command_and_its_options():
    wrong = []
    files = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    for path in files:
        for words in example_commands(path):
            command = next((p for p in sorted(COMMANDS, key=len, reverse=True) if tuple(words[:len(p)]) == p), None)
            if command is None:
                wrong.append(f"{path.name}: linft {' '.join(words)}: no such command")
                continue
            flags = {w.split("=")[0] for w in words[len(command):] if w.startswith("--")}
            wrong += [f"{path.name}: linft {' '.join(command)} {f}"
                      for f in sorted(flags - all_flags(COMMANDS[command]))]
    assert sum(len(example_commands(p)) for p in files) >= 30
    assert not wrong, wrong

"""The house rules of the package, read from its source: layers import only downwards, no cycle, no hidden imports.

The import graph is read with ``ast`` (every ``import linft...`` / ``from linft... import``
of every module), so a cycle is found whatever order a program imports the modules in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import linft

PACKAGE = Path(linft.__file__).parent
CLI = PACKAGE.parent / "cli"

#: Each layer may import from itself and the layers before it in this list.
#: ``linft.protocol`` (the protocol as data, no torch) sits below every layer that computes, so models may use its
#: checks.
LAYERS = ["linft.errors", "linft.lazy", "linft.output", "linft.locks", "linft.protocol", "linft.runtime",
          "linft._kernels", "linft.data", "linft.models", "linft.cache", "linft.analysis", "linft.train",
          "linft.interpolation", "linft.demo"]
#: Imports allowed inside a function body: optional extras only (huggingface_hub comes with open_clip).
OPTIONAL = {"submitit", "open_clip", "huggingface_hub", "timm", "tensorboard", "torch.utils.tensorboard"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + ".")
               or (prefix == "linft.errors" and name == "linft"))


def linft_imports(tree: ast.AST, module: str) -> set[str]:
    """The linft modules a module imports (``from linft.x import y`` counts ``linft.x.y`` when that is a module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("linft")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("linft"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES and m != module}


def graph() -> dict[str, set[str]]:
    return {m: linft_imports(ast.parse(p.read_text()), m) for m, p in MODULES.items()}


def test_layers_import_only_downwards():
    wrong = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
             if m != "linft" and layer(d) > layer(m)]
    assert not wrong, wrong


def test_no_import_cycle():
    edges, state, cycles = graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges[m]):
            if d.startswith(m + "."):  # a package importing its own submodules to re-export them
                continue
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


@pytest.mark.parametrize("root", [PACKAGE, CLI], ids=["linft", "cli"])
def test_no_imports_inside_functions_except_optional_extras(root):
    found = []
    for path in sorted(root.rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                        if not all(n.split(".")[0] in OPTIONAL or n in OPTIONAL for n in names):
                            found.append(f"{path.name}:{node.lineno} {names}")
    assert not found, found


def test_every_module_imports_in_a_fresh_interpreter():
    # one interpreter per module would take a minute (torch); the static cycle check above covers the order
    # dependence, and this catches a module that fails to import at all
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    names = sorted(MODULES) + ["linft.cli.main"]
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_command_table_matches_the_commands():
    """The help `linft --help` reads from each command's source, without importing it, is the command's own."""
    from linft.cli.main import COMMANDS, main, short_help

    for name in COMMANDS:
        command = main.get_command(None, name)
        assert command.name == name
        assert short_help(name) == " ".join(command.help.split("\n\n")[0].split()), name


def test_help_does_not_import_torch():
    code = "import sys\nfrom linft.cli.main import main\nsys.argv = ['linft', '--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_every_package_is_installed():
    """setup.cfg lists every package, so a wheel (not only an editable install) holds all of linft."""
    import configparser

    config = configparser.ConfigParser()
    config.read(PACKAGE.parent / "setup.cfg")
    listed = {p.strip() for p in config["options"]["packages"].split(",")}
    found = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")} | {"linft.cli"}
    assert listed == found


@pytest.mark.parametrize("module", ["linft.cli.report", "linft.cli.status", "linft.analysis.report",
                                    "linft.train.sweeps.status"])
def test_commands_that_read_records_do_not_import_torch(module):
    """`report` and `status` read records and files only: they start without torch (well under a second)."""
    code = f"import sys, importlib\nimportlib.import_module({module!r})\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


#: Layers that load or run networks (or compile their kernels): what records-only layers never import.
NETWORK_LAYERS = ("linft.models", "linft.train", "linft.cache", "linft.interpolation", "linft._kernels")


def _reachable(module: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for d in edges[todo.pop()] - seen:
            seen.add(d)
            todo.append(d)
    return seen


@pytest.mark.parametrize("package", ["linft.protocol", "linft.analysis"])
def test_records_only_layers_import_no_network_layer_and_no_torch(package):
    """protocol/ (the protocol as data) and analysis/ (reads records) reach no layer that runs networks, directly or
    through another linft module, and no module they reach imports torch at import time (an optional extra imported
    where it is used, as TensorBoard's writer in protocol/sinks.py, is the rule of the test above)."""
    edges = graph()
    modules = [m for m in MODULES if m == package or m.startswith(package + ".")]
    reached = set(modules).union(*(_reachable(m, edges) for m in modules))
    assert not sorted(m for m in reached if m.startswith(NETWORK_LAYERS))
    torch_users = []
    for m in sorted(reached):
        for node in ast.parse(MODULES[m].read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            torch_users += [f"{m} imports {n}" for n in names if n.split(".")[0] == "torch"]
    assert not torch_users, torch_users
    code = (f"import sys, importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_one_header_builder():
    """Every record header is built by linft.protocol.identity.run_header: no other module calls RunHeader(...)."""
    calls = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "RunHeader":
                calls.append(name)
    assert calls == ["linft.protocol.identity"], calls


def _error_texts(tree: ast.AST):
    """The string pieces of every exception built or warning issued in a module (``raise X(f"...")``,
    ``warnings.warn(...)``): its error text."""
    for call in ast.walk(tree):
        if isinstance(call, ast.Call):
            name = getattr(call.func, "id", None) or getattr(call.func, "attr", "")
            if name.endswith(("Error", "Exception")) or name == "warn":
                yield from (n for n in ast.walk(call) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_library_errors_name_parameters_not_flags():
    """Only cli/ names `--flags`: a library error names the parameter (``workers must be >= 0``), and the CLI
    shows the flag that sets it (cli/flags.py)."""
    found = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value!r}"
             for path in sorted(PACKAGE.rglob("*.py")) if "cli" not in path.relative_to(PACKAGE).parts
             for node in _error_texts(ast.parse(path.read_text())) if "--" in node.value]
    assert not found, found


def test_the_rule_finds_a_flag_in_error_text():
    tree = ast.parse('raise LinftError(f"--workers must be >= 0, got {w}")\nwarnings.warn("use --force")')
    assert [n.value for n in _error_texts(tree) if "--" in n.value] == ["--workers must be >= 0, got ", "use --force"]


def test_tests_import_no_private_names():
    """Tests go through the public API: no ``from linft... import _name`` (a private helper is tested through the
    public function that uses it, or made public with a docstring)."""
    found = []
    for path in sorted((PACKAGE.parent / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("linft"):
                found += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found

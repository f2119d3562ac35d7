"""Every name the README's package table promises imports from the package it is listed under."""

import importlib
import importlib.util
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def table_rows():
    for line in README.read_text().splitlines():
        m = re.match(r"^\| ((?:`linft\.[\w.]+`(?:, )?)+) \| (.*) \|$", line)
        if m:
            yield re.findall(r"`(linft\.[\w.]+)`", m.group(1)), re.findall(r"`([A-Za-z_]\w*)`", m.group(2))


def test_every_name_of_the_package_table_imports():
    rows = list(table_rows())
    assert len(rows) >= 7  # runtime/output, data, models, cache, protocol, train, analysis
    missing = []
    for packages, names in rows:
        modules = [importlib.import_module(p) for p in packages]
        for name in names:
            if not any(hasattr(m, name) or (hasattr(m, "__path__") and importlib.util.find_spec(f"{m.__name__}.{name}"))
                       for m in modules):
                missing.append(f"{'/'.join(packages)}: {name}")
    assert not missing, missing

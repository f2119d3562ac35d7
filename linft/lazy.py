"""Lazy re-exports: a package names what its submodules hold, and imports a submodule only when a name is used.

``from linft.analysis import write_report`` then imports ``linft.analysis.report`` alone, not every
submodule of the package (and so not torch, for the modules that read only records).
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``(__getattr__, __dir__)`` for ``package``, re-exporting ``exports[submodule]`` names (PEP 562)."""
    home = {name: submodule for submodule, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__

"""The one map from the library's parameter names to the command line's flags.

Library errors name parameters (``workers must be >= 0, got -1``, ``LinftError.param == "workers"``); a command-line
user sets them through options, so :func:`in_flags` rewrites the message in the command's own flags
(``--workers must be >= 0, got -1``). The flag of a parameter is read from the click command itself (its option of
that name, or of the name in :data:`ALIASES`), so a renamed option cannot fall out of step with this map.
"""

from __future__ import annotations

import re

import click

#: Library parameter -> the click parameter that sets it, where the two names differ.
ALIASES = {
    "out_dir": "out",
    "out_path": "out",
    "lr": "lrs",
    "weight_decay": "weight_decays",
    "dropout": "dropouts",
    "dropout_rate": "dropouts",
    "blocks": "num_blocks",
}


def _params(command: click.Command) -> list[click.Parameter]:
    """The parameters of ``command``, and of its subcommands when it is a group (``cache info``, ``cache verify``)."""
    subcommands = command.commands.values() if isinstance(command, click.Group) else []
    return [*command.params, *(p for sub in subcommands for p in _params(sub))]


def flag_of(command: click.Command | None, param: str) -> str | None:
    """How ``command``'s user sets the library parameter ``param``: its longest flag (``--workers``), an argument's
    metavar (``OUT_DIR``), or None when the command has no such parameter."""
    if command is None:
        return None
    by_name = {p.name: p for p in _params(command)}
    found = by_name.get(param) or by_name.get(ALIASES.get(param, ""))
    if found is None:
        return None
    if isinstance(found, click.Argument):
        return found.human_readable_name
    return max((o for o in found.opts if o.startswith("--")), key=len, default=found.opts[0])


def in_flags(message: str, param: str | None, command: click.Command | None) -> str:
    """``message`` as the command's user reads it, each parameter replaced by its flag: the one the message is
    about (``param``), any written as a keyword (``force=True`` -> ``--force``, ``image_size=224`` ->
    ``--image-size 224``), and any written with an underscore (``stochastic_depth``: never an English word).
    Parameters the command does not have are left as the library wrote them."""
    if command is None:
        return message
    known = {p.name for p in _params(command) if p.name} | set(ALIASES)
    for name in sorted(known, key=len, reverse=True):
        flag = flag_of(command, name)
        if flag is None:
            continue
        message = re.sub(rf"(?<![\w./-]){re.escape(name)}=(True\b|'[^']*'|\S+)",
                         lambda m: flag if m[1] == "True" else f"{flag} {m[1].strip(chr(39))}", message)
        if name == param or "_" in name:
            message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w/=-])", flag, message)
    return message

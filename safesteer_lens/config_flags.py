"""Command-line flags from a config dataclass, so a setting is written down once.

A config's field gives the flag's name (``lora_rank`` -> ``--lora-rank``), its type and its
help: the field's entry in the class docstring's ``Attributes:`` section, the same text the
API documentation shows. :func:`add_config_flags` adds every field of a config to a
subcommand with the default None ("the preset's"), and :func:`config_overrides` reads back the
fields the user set, for ``preset(name, **overrides)``. A new field is then a flag with help
without touching the CLI, and no default is written twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Mapping, Sequence

_ENTRY = re.compile(r"^(?P<indent>\s+)(?P<name>\w+): (?P<text>.*)$")


def attribute_help(cls: type) -> dict[str, str]:
    """Each attribute's description from a Google-style ``Attributes:`` docstring section, on one line."""
    lines = (cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    if start is None:
        return {}
    helps: dict[str, list[str]] = {}
    name, indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        match = _ENTRY.match(line)
        if match and (indent is None or len(match["indent"]) == indent):
            indent, name = len(match["indent"]), match["name"]
            helps[name] = [match["text"].strip()]
        elif name is not None and indent is not None and len(line) - len(line.lstrip()) > indent:
            helps[name].append(line.strip())
        else:
            break
    return {key: " ".join(parts) for key, parts in helps.items()}


def _plain(text: str) -> str:
    """Docstring markup as a terminal shows it: ``x`` -> x, :func:`~a.b` -> b, :mod:`a.b` -> a.b."""
    text = re.sub(r":\w+:`~([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = re.sub(r":\w+:`([^`]+)`", r"\1", text)
    return text.replace("``", "")


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls`` to ``parser``, each defaulting to None.

    Args:
        parser: The subcommand's parser.
        cls: A config dataclass whose docstring documents every field under ``Attributes:``.
        aliases: Extra flag names for a field (kept for flags that predate the field's name).
        choices: The allowed values of a field (from a registry).
        helps: Help that replaces the docstring's for a field (e.g. a registry's own listing).

    Raises:
        ValueError: A field has no docstring entry or a type a flag cannot parse.
    """
    aliases, choices, helps = aliases or {}, choices or {}, helps or {}
    documented = attribute_help(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        text = helps.get(field.name) or documented.get(field.name)
        if not text:
            raise ValueError(f"{cls.__name__}.{field.name} has no entry under Attributes: in its docstring")
        kind = hints[field.name]
        kwargs: dict[str, Any] = {"dest": field.name, "default": None,
                                  "help": f"{_plain(text)} (default: the preset's)".replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float, str):
            kwargs["type"] = kind
            kwargs["metavar"] = {int: "N", float: "X", str: "NAME"}[kind] if field.name not in choices else None
        else:
            raise ValueError(f"{cls.__name__}.{field.name} has type {kind}, which no flag parses")
        if field.name in choices:
            kwargs["choices"] = list(choices[field.name])
        parser.add_argument(f"--{field.name.replace('_', '-')}", *aliases.get(field.name, ()), **kwargs)


def config_overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line (those not None)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}

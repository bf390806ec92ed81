"""Hugging Face ``from_pretrained`` calls that never run code shipped with the files.

A model folder or hub repository can carry Python modules that ``transformers`` imports when
its ``config.json`` or ``tokenizer_config.json`` names them under ``auto_map`` (and, left to
itself, ``transformers`` asks on stdin whether to run them, so a ``y`` piped in runs them).
A run directory, a judge or a colleague's model folder is data, not a program, so every load
here passes ``trust_remote_code=False`` and a local folder that asks for custom code is
refused, in one line that names the field, before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from safesteer_lens.errors import SafeSteerError

NO_REMOTE_CODE: dict[str, bool] = {"trust_remote_code": False}
CODE_FIELDS = ("auto_map",)
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def refuse_custom_code(source: str | Path) -> None:
    """Fail when a local model folder asks ``transformers`` to import its own Python modules.

    Args:
        source: A local directory (a hub id or a missing path is left to the loader, which
            gets ``trust_remote_code=False``).

    Raises:
        SafeSteerError: A config file of the folder has an ``auto_map`` entry.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # the loader reports an unreadable config in its own words
        if isinstance(data, dict):
            asks = [field for field in CODE_FIELDS if data.get(field)]
            if asks:
                raise SafeSteerError(f"{path} names custom code under {asks[0]!r}, which safesteer-lens never runs; "
                                     f"remove the {asks[0]!r} entry or use a model that transformers supports itself")


def refuse_loaded_custom_code(config: Any, source: str) -> None:
    """The same refusal for a config already loaded (a hub repository's), before it is saved or reused."""
    for field in CODE_FIELDS:
        if getattr(config, field, None):
            raise SafeSteerError(f"{source}'s config names custom code under {field!r}, which safesteer-lens never runs; "
                                 "use a model that transformers supports itself")


def from_pretrained(load: Callable[..., Any], source: str, **kwargs: Any) -> Any:
    """``load(source, trust_remote_code=False, **kwargs)`` after :func:`refuse_custom_code`.

    Args:
        load: A ``from_pretrained`` classmethod (``AutoModelForCausalLM.from_pretrained``...).
        source: A local directory or a hub id.
        **kwargs: Passed on; ``trust_remote_code`` cannot be among them.
    """
    if "trust_remote_code" in kwargs:
        raise TypeError("from_pretrained() never trusts remote code; drop the trust_remote_code argument")
    refuse_custom_code(source)
    try:
        return load(source, **NO_REMOTE_CODE, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise SafeSteerError(f"{source} needs custom code to load, which safesteer-lens never runs; use a model "
                                 "that transformers supports itself") from exc
        raise

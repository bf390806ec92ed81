"""One way to write a run directory's files: beside the final name, then moved into place.

A crash or a full disk mid-write then leaves the previous file (or none), never a truncated
one that a later stage would read as complete; the temporary file is removed on any error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on ``.<name>.tmp`` beside ``path``, then move it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` for a text file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))

"""One way to write a run directory's files: beside the final name, then moved into place.

A crash or a full disk mid-write then leaves the previous file (or none), never a truncated
one that a later stage would read as complete; the temporary file is removed on any error.
Every file gets the process's normal mode (``0o666`` less the umask), whatever the writer
chose: ``safetensors`` creates its files readable by their owner only, and a run directory is
meant to be read by colleagues on a shared machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once, at import, while nothing else runs


def share(path: str | Path) -> None:
    """Give a file the mode a plain ``open()`` would have: ``0o666`` less the process's umask."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on ``.<name>.tmp`` beside ``path``, then move it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        share(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` for a text file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))

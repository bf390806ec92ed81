"""The run directory's guard: one writer at a time, and loaders that never trust a file.

A run directory is data a user can edit, copy, truncate or share, so everything read from it
goes through a loader here that turns any malformed or partial file into one line naming the
file and the command that remakes it. Tensors are read with ``safetensors`` or with
``torch.load(weights_only=True)``, never by unpickling objects, so a planted file cannot run
code. Writers take :func:`locked`, so a second ``train`` (or ``run``, ``tokens``, ``sweep``)
on the same directory stops at once instead of interleaving its steps with the first.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from safesteer_lens.errors import SafeSteerError, first_line

LOCK = ".safesteer.lock"
F = TypeVar("F", bound=Callable[..., Any])

_held: dict[Path, list[Any]] = {}  # lock files this process holds, with a re-entry count


def artifact_error(path: str | Path, problem: str, remake: str) -> SafeSteerError:
    """The one-line error for an unusable artifact: which file, what is wrong, what remakes it."""
    return SafeSteerError(f"{path} {problem}; remake it with `{remake}`")


@contextmanager
def locked(run_dir: str | Path, command: str, active: bool = True) -> Iterator[None]:
    """Hold ``RUN/.safesteer.lock`` for the block; fail at once if another process holds it.

    Re-entrant within one process (``safesteer run`` locks the directory and then trains in
    it). The lock is an ``flock`` on the file, which the kernel releases when the holder exits,
    even on ``kill -9``, so a crashed run never leaves a stale lock behind.

    Args:
        run_dir: The directory to lock.
        command: What is writing, written into the lock file for the error others see.
        active: False on the ranks of a torchrun job that do not write (only rank 0 locks).
    """
    run_dir = Path(run_dir)
    if not active:
        yield
        return
    check_out_dir(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SafeSteerError(f"cannot create the run directory {run_dir} ({exc.strerror}); choose a writable path") from exc
    key = Path(os.path.abspath(run_dir / LOCK))  # not resolved: a planted symlink must not redirect the lock
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        # O_NOFOLLOW: a symlink planted as the lock file fails here instead of truncating its target
        handle = os.fdopen(os.open(key, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as exc:
        raise SafeSteerError(f"cannot use the lock file {key} ({exc.strerror}); remove it if it is not a plain "
                             "file, or choose a writable run directory") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise SafeSteerError(f"{run_dir} is in use by {holder}; wait for it to finish or use another run "
                                 "directory") from exc
        raise
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} ({command})")
    handle.flush()
    _held[key] = [handle, 1]
    try:
        yield
    finally:
        _held.pop(key)
        handle.close()  # closing releases the flock


def check_out_dir(path: str | Path) -> None:
    """Fail in one line, before any compute, when ``path`` cannot be a run directory to write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SafeSteerError(f"{path} is a file, not a run directory; pass a directory to --out")
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise SafeSteerError(f"cannot write in {existing}; choose a writable run directory")


def require_run_dir(path: str | Path) -> Path:
    """A run directory that a stage reads must exist (and be writable, since the stage writes back)."""
    path = Path(path)
    if not path.is_dir():
        raise SafeSteerError(f"no run directory {path}; make one with `safesteer direction --out {path}` first")
    check_out_dir(path)
    return path


def check_out_file(path: str | Path) -> Path:
    """Fail in one line, before any work, when ``path`` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise SafeSteerError(f"{path} is a directory; pass a file name to write, e.g. {path / 'refusal.gguf'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SafeSteerError(f"no directory {parent} to write {path.name} into; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SafeSteerError(f"cannot write {path} (read-only); choose a writable place")
    return path


def holds_lock(command: str) -> Callable[[F], F]:
    """Decorate a writer whose first argument is the run directory: it runs under :func:`locked`.

    Only rank 0 of a torchrun job takes the lock; the other ranks write nothing.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(run_dir: str | Path, *args: Any, **kwargs: Any) -> Any:
            from safesteer_lens.parallel import current_world

            with locked(run_dir, command, current_world().is_main):
                return fn(run_dir, *args, **kwargs)

        return guarded  # type: ignore[return-value]

    return wrap


def read_json(path: str | Path, remake: str) -> Any:
    """A JSON artifact, or a one-line error when it is missing, truncated or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise artifact_error(path, "does not exist", remake)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise artifact_error(path, f"is not valid JSON ({first_line(exc, 80)})", remake) from exc


def read_jsonl(path: str | Path, remake: str) -> list[dict[str, Any]]:
    """A JSON-lines artifact (no file: no rows); a truncated or foreign line is a one-line error."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise artifact_error(path, f"cannot be read as text ({first_line(exc)})", remake) from exc
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise artifact_error(path, f"line {number} is not JSON (truncated?)", remake) from exc
        if not isinstance(row, dict):
            raise artifact_error(path, f"line {number} is not a JSON object", remake)
        rows.append(row)
    return rows


def read_tensors(path: str | Path, remake: str) -> dict[str, Any]:
    """A safetensors file's tensors, or a one-line error for a missing or partial file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise artifact_error(path, "does not exist", remake)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a header or size mismatch
        raise artifact_error(path, f"cannot be read as safetensors ({first_line(exc, 80)})", remake) from exc


def read_checkpoint(path: str | Path, remake: str) -> dict[str, Any]:
    """A training checkpoint, loaded as tensors and plain data only (``weights_only=True``)."""
    import torch

    path = Path(path)
    try:
        # mmap: the ranks of a machine share one page cache of the file
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, foreign, or carrying objects beyond tensors and plain data
        raise artifact_error(path, f"cannot be read as a checkpoint ({first_line(exc)})", remake) from exc
    if not isinstance(state, dict):
        raise artifact_error(path, "is not a safesteer checkpoint", remake)
    return state

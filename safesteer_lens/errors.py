"""The one exception type the toolkit raises for problems the user can fix.

Everything that is the user's to fix (a wrong model name, a missing file, a run directory
without the artifact a stage needs) raises :class:`SafeSteerError` with a one-line message
that says what to do next. The CLI turns it into ``error: <message>`` and exit code 2, with
no traceback; in Python and Jupyter it is an ordinary ``ValueError`` subclass.
"""

from __future__ import annotations


class SafeSteerError(ValueError):
    """A problem with the user's input, explained in one line with the fix."""


def first_line(exc: BaseException, width: int | None = 120) -> str:
    """A library exception's first line of text (its type's name when it has none), cut to ``width``.

    What a :class:`SafeSteerError` quotes of the error behind it, so the message stays one line.
    """
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:width]

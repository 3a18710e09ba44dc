"""Errors that the ``unifusion`` command reports as one line (no traceback).

Library code raises :class:`UserError` (or a subclass) for problems the user can fix — a
missing or corrupt file, a bad option, incompatible parts — with a message that names what
is wrong and how to fix it. The CLI prints ``error: <message>`` and exits non-zero; Python
callers get an ordinary exception.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, option, config), reported without a traceback."""


class CheckpointError(UserError):
    """A checkpoint or exported model folder that cannot be loaded (missing, corrupt, unsafe)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for
    one-line error reports."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]

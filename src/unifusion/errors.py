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


def first_line(e: BaseException, with_type: bool = False) -> str:
    """The message of ``e`` as one line, for one-line error reports: its first line, or, for a
    config error jsonargparse wraps ("... Errors: - <the constructor's message> - Expected a
    NoneType ..."), the wrapped message; a KeyError's key without the quotes ``str()`` adds.
    An empty message gives the type name; ``with_type`` prefixes it (``OSError: ...``)."""
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0].strip()
    lines = [line.strip() for line in text.splitlines()]
    line = next((line for line in lines if line), "")
    if "Errors:" in lines:
        bullets = [b[2:] for b in lines[lines.index("Errors:") + 1 :] if b.startswith("- ")]
        real = [b for b in bullets if not b.startswith("Expected a <class 'NoneType'>")]
        if real:
            line = real[0]
    if not line:
        return type(e).__name__
    return f"{type(e).__name__}: {line}" if with_type else line

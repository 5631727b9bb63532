"""The one base of every user-facing error in amoe.

An `AmoeError`'s message names the problem and the fix; the `amoe` command prints it as one line and
exits with code 2 (`amoe --debug ...` shows the traceback). Each error also derives from the builtin
exception it specialises (ValueError, KeyError, OSError ...), so callers that catch those keep working.
Anything that is not an AmoeError is a bug and keeps its traceback.
"""
from __future__ import annotations


class AmoeError(Exception):
    """Bad input, a missing file or an environment problem the user can fix; the message says how."""


def message(e: BaseException) -> str:
    """One line for the user (KeyError's str() would wrap the message in quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)
    return " ".join(str(text).split()) or type(e).__name__

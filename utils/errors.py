"""Errors caused by the user's input (bad paths, bad data, impossible episode sizes).

``main.py`` catches :class:`UserError`, prints ``error: <message>`` and exits with code 2, so the message must be
one line: the constructor folds any line breaks into spaces.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; ``str(err)`` is always a single line."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split("\n"))
        super().__init__(" ".join(text.split("\r")).strip())

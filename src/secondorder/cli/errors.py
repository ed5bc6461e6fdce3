"""The error of bad input on the command line (its own module, so that every ``cli`` module can raise it)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: reported in one line, exit status 2."""

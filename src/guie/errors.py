"""The one base of every error the user can fix, in a leaf module every layer may import.

A `UserError` is a mistake in what the user typed or gave (a config name or override, a path,
a file of the wrong kind, data that is missing, a Kaggle answer about their account): the
command line prints its message as the one line `error: <message>` and exits 2. Its message
says what is wrong and what would be right. Anything that is not a `UserError` is a bug of the
kit and keeps its traceback.

Subclasses keep the built-in type a caller may already catch as a second base (`ConfigError`
is also a `ValueError`), so deriving from this never changes who catches what.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message is one line for `error: ...`."""


class UserValueError(UserError, ValueError):
    """A value the user gave (an argument, a setting, a reference) that the kit refuses."""

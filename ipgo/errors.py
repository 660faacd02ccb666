"""The base of errors caused by user input: the command lines print their message, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input with a message that names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (a command line prints its message, not a traceback)."""


class NonFiniteRewardError(UserError, FloatingPointError):
    """A reward that came back NaN or infinite."""


class NonFiniteGradientError(UserError, FloatingPointError):
    """A finite reward whose gradient at the tokens is NaN or infinite."""


@contextmanager
def reported(program: str) -> Iterator[None]:
    """Turn a `UserError` into `program: error: message` on stderr and exit code 2."""
    try:
        yield
    except (UserError, ValueError) as error:
        cause = user_error_behind(error)
        if cause is None:
            raise
        print(f"{program}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def user_error_behind(error: BaseException) -> UserError | None:
    """`error` itself if a `UserError`, else the one it was raised from: jsonargparse re-raises the error of a class
    it builds from a config (a reward given a missing file) as a ValueError "Does not validate against any of the
    Union subtypes"."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None

"""The base of errors caused by user input: the command line prints their message, not a traceback."""


class UserError(Exception):
    """Bad input with a message that names the problem and the fix."""

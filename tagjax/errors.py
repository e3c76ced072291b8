"""Errors a user can cause and fix, and the exit statuses every ``tagjax`` command uses.

The CLI prints a UserError as one line, without a traceback, and exits with EXIT_USER_ERROR.
"""

EXIT_OK = 0
EXIT_SOME_INPUTS_FAILED = 1  # the command finished, but some inputs (images, hashtags) were skipped
EXIT_USAGE = 2  # a bad flag or argument (argparse's status)
EXIT_USER_ERROR = 3  # a UserError: bad data, path or config value that the user must fix
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)


class UserError(Exception):
    """Something the user must fix (a bad path, config value or input). The message says what to do."""

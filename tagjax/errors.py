"""Errors a user can cause and fix. The CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Something the user must fix (a bad path, config value or input). The message says what to do."""

"""The argparse type of every path a user gives a command: made absolute once, here, at the edge.

Orbax refuses relative checkpoint paths, and a relative path means something else once any library code
changes directory, so every command option that names a file or directory is declared as
``parser.add_argument("--workdir", type=path)``. URLs (``gs://bucket/run``) are left as they are; ``~`` is
expanded. Only the standard library is imported, so ``tagjax X --help`` stays fast.
"""

from __future__ import annotations

import os


def absolute(text: str | os.PathLike) -> str:
    """``text`` as an absolute local path (``~`` expanded), or unchanged when it is a URL."""
    text = os.fspath(text)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def path(text: str) -> str:
    """argparse ``type=`` for a file or directory argument; an empty string stays empty (unset)."""
    return absolute(text) if text else text

"""Progress bars and progress lines, on stderr, the one way every command draws them.

The convention (docs/cli.md): stdout carries results (a table, or with ``--json`` one JSON document or
JSON Lines and nothing else); bars and progress lines go to stderr. A bar is drawn only when stderr is a
terminal, unless forced with ``--progress`` (``--no-progress`` turns it off), so a redirected log never
receives the carriage-return updates a bar is made of. Library functions take ``progress: bool | None``:
True draws, False does not, None (the default) draws when stderr is a terminal.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def progress_bar(iterable=None, *, enabled: bool | None = None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; ``enabled`` None draws it only when stderr is a terminal."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(
        iterable, file=sys.stderr, disable=None if enabled is None else not enabled, **kwargs
    )


def say(line: str) -> None:
    """One progress line on stderr, printed above any bar instead of through it."""
    tqdm.write(line, file=sys.stderr)


@contextlib.contextmanager
def logging_above_bars() -> Iterator[None]:
    """Routes the root logger's console handlers through ``tqdm.write`` while the block runs, so a log
    line never overwrites a bar. Only the root's: tagjax's loggers have no handlers of their own and
    propagate there (a redirect of the ``tagjax`` logger too would print each line twice)."""
    with logging_redirect_tqdm():
        yield


def wanted(enabled: bool | None) -> bool:
    """Whether bars are drawn for ``enabled`` (None: when stderr is a terminal), for libraries that
    draw their own (TFDS)."""
    return sys.stderr.isatty() if enabled is None else bool(enabled)

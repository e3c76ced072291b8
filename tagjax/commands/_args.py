"""The flags every command spells the same way, and how a command prints its result.

Every path a flag names is made absolute (tagjax.commands.paths). One name per meaning across subcommands (docs/cli.md): ``--checkpoint`` for a checkpoint to read,
``--output``/``-o`` for what a command writes, ``--data-dir`` for a TFDS data directory, ``--json`` for
machine-readable stdout, ``--progress``/``--no-progress`` for bars on stderr. Old spellings still work
for a while: each command module may list them in ``ALIASES`` (old -> new); tagjax.cli rewrites them
before parsing and warns once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from tagjax.commands import paths
from tagjax.errors import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help once, unless the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default is None
            or action.default is False
            or action.default in ([], "", argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def add_checkpoint(parser, help: str, *, required: bool = True) -> None:
    parser.add_argument(
        "--checkpoint", type=paths.path, required=required, metavar="PATH", help=help
    )


def add_output(parser, help: str, *, required: bool = False) -> None:
    parser.add_argument(
        "--output", "-o", type=paths.path, required=required, metavar="PATH", help=help
    )


def add_data_dir(parser) -> None:
    parser.add_argument(
        "--data-dir",
        type=paths.path,
        default=None,
        metavar="DIR",
        help="TFDS data directory of downstream datasets (default $TFDS_DATA_DIR or "
        "~/tensorflow_datasets)",
    )


def add_json(parser, help: str = "print the result as one JSON document on stdout") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_progress(parser, *, draws_bars: bool = True) -> None:
    """``--progress``/``--no-progress`` (None when neither is given: bars only on a terminal). Every
    command takes it, so a script can pass it to all; ``draws_bars`` False says this one has none."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: only when stderr is a terminal)"
        if draws_bars
        else "accepted for uniformity: this command draws no progress bars",
    )


def plain(x):
    """``x`` as strict JSON values: numpy scalars and arrays as numbers and lists, NaN and infinities
    as null, paths and other objects as strings."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return plain(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, bool | int | str):
        return x
    return str(x)


def print_json(args, payload) -> None:
    """The command's result as one JSON document on the real stdout (tagjax.cli sends every other
    print of a ``--json`` run to stderr)."""
    stream = getattr(args, "json_stdout", None) or sys.stdout
    stream.write(json.dumps(plain(payload), indent=1, ensure_ascii=False) + "\n")
    stream.flush()


def print_json_lines(args, rows: Iterable) -> None:
    """The command's result as JSON Lines (one object per line) on the real stdout."""
    stream = getattr(args, "json_stdout", None) or sys.stdout
    for row in rows:
        stream.write(json.dumps(plain(row), ensure_ascii=False) + "\n")
    stream.flush()


def check_path_or_name(spec: str, flag: str) -> None:
    """A ``spec`` written as a path (absolute, ``~``, ``./``, ``../``) must exist: "no such path", not
    "unknown dataset", when a path is mistyped. Bare names (cifar10, emoji_subgroups/32px) pass."""
    if spec.startswith(("/", "~", "./", "../")) and not Path(spec).expanduser().exists():
        raise UserError(f"{flag} {spec}: no such path.")


def check_output(path: str | None, flag: str) -> None:
    """Refuses, before any work, an output whose folder cannot be made because a path above it is a
    file (the write would fail only at the end, after the whole computation)."""
    if not path or "://" in path:
        return
    for parent in Path(path).expanduser().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a directory.")
            return


def invocation(fallback: str) -> str:
    """The command line as the user typed it, recorded in demo/study summaries; ``fallback`` when tagjax
    runs from Python (a notebook, a test) rather than from the ``tagjax`` script."""
    if sys.argv and "tagjax" in Path(sys.argv[0]).name:
        return "tagjax " + " ".join(sys.argv[1:])
    return fallback

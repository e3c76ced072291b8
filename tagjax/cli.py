"""The ``tagjax`` command: an explicit registry of subcommands, each one module of tagjax.commands.

Every command module exposes two functions and nothing else is looked up:

* ``add_arguments(parser)``: its options, on the ``argparse`` subparser;
* ``run(args) -> int | None``: does the work by calling library modules; the exit status (None is 0).

Only the chosen command's module is imported (for running it or for its ``--help``), and command modules
import the heavy library (JAX, grain, the models) inside ``run``, so ``tagjax --help`` and
``tagjax X --help`` are fast for every X.

Training-style subcommands take ``--config FILE[:arg]`` plus any number of ``--config.key=value`` (or
``--config.key value``) overrides (see tagjax.config); they reach ``run`` as ``args.config_overrides``.

The conventions every command follows are in docs/cli.md: shared flag names (tagjax.commands._args),
``--json`` (stdout holds the JSON alone; other prints go to stderr), progress bars on stderr only on a
terminal unless forced (tagjax.progress), and the exit statuses of tagjax.errors: 0 ok, 1 some inputs
failed, 2 usage, 3 a UserError (one line, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import logging
import sys

from tagjax import __version__, progress
from tagjax import config as config_lib
from tagjax.commands import _args
from tagjax.errors import EXIT_INTERRUPTED, EXIT_USAGE, EXIT_USER_ERROR, UserError


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: the module that defines its ``add_arguments`` and ``run``, and its help line."""

    module: str
    help: str

    def load(self):
        """The command module, checked for the two functions every command module exposes."""
        module = importlib.import_module(self.module)
        for name in ("add_arguments", "run"):
            if not callable(getattr(module, name, None)):
                raise TypeError(f"{self.module} does not define {name}()")
        return module


# name -> command, in the order of the data flow.
COMMANDS: dict[str, Command] = {
    "vocab": Command(
        "tagjax.commands.vocab",
        "build, show and look up hashtag vocabularies (WordNet synsets)",
    ),
    "build": Command(
        "tagjax.commands.build", "tagged posts -> filtered, deduplicated ArrayRecord shards"
    ),
    "train": Command(
        "tagjax.commands.train", "pretrain a model on hashtags (config file + overrides)"
    ),
    "evaluate": Command(
        "tagjax.commands.evaluate",
        "hashtag metrics on held-out shards; top-1/5 of a classifier on a dataset",
    ),
    "transfer": Command(
        "tagjax.commands.transfer", "linear probe or fine-tuning on a downstream dataset"
    ),
    "predict": Command("tagjax.commands.predict", "top hashtags for images"),
    "embed": Command(
        "tagjax.commands.embed", "pooled trunk features for images or shards, to .npy"
    ),
    "decontaminate": Command(
        "tagjax.commands.decontaminate",
        "training images near evaluation images in feature space -> exclude list",
    ),
    "import-weights": Command(
        "tagjax.commands.import_weights",
        "PyTorch WSL/torchvision ResNeXt weights -> checkpoint",
    ),
    "export-weights": Command(
        "tagjax.commands.export_weights", "checkpoint -> torchvision-layout .safetensors"
    ),
    "demo": Command(
        "tagjax.commands.demo", "the whole system end to end on the openclipart corpus, on CPU"
    ),
    "study": Command(
        "tagjax.commands.study",
        "the paper's findings and controls as arms x seeds on the demo corpus, paired by seed",
    ),
}


def build_parser(command: str | None):
    """The parser of ``tagjax``, with the options of ``command`` (None: none) -> (parser, its module)."""
    parser = argparse.ArgumentParser(
        prog="tagjax",
        description="Weakly supervised image pretraining from hashtags (JAX/Flax).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tagjax COMMAND --help` for a command's options. Conventions (flags, --json, "
        "progress, exit codes): docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"tagjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(
            name, help=cmd.help, description=cmd.help, formatter_class=_args.HelpFormatter
        )
        if name == command:  # only the chosen command's module is imported
            module = cmd.load()
            module.add_arguments(sp)
    return parser, module


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` -> (its ``--config.key=value`` overrides, the rest). ``--config.key value`` (space
    separated, as absl accepts it) is joined into ``--config.key=value``."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config.") and "=" not in arg:
            value = argv[i + 1] if i + 1 < len(argv) else None
            if value is not None and not value.startswith("--"):
                overrides.append(f"{arg}={value}")
                i += 2
                continue
            overrides.append(arg)  # a bare boolean, `--config.flag`
        elif arg.startswith("--config."):
            overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def rewrite_aliases(argv: list[str], aliases: dict[str, str], command: str) -> list[str]:
    """Old flag spellings (a command's ``ALIASES``, old -> new) -> the new ones, with one warning each."""
    out, warned = [], set()
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name in aliases:
            if name not in warned:
                print(
                    f"tagjax {command}: warning: {name} is now {aliases[name]}; the old name will go",
                    file=sys.stderr,
                )
                warned.add(name)
            arg = aliases[name] + eq + value
        out.append(arg)
    return out


def _without_closed_loop_noise(hook):
    """``sys.unraisablehook`` minus one message: after a failed asynchronous checkpoint save, Orbax's
    background thread may still schedule a callback on the asyncio loop the failure already closed, and
    Python prints "RuntimeError: Event loop is closed" as a traceback after tagjax's one-line error. The
    callback has nothing left to do (the save is reported and the run stopped), so only that message is
    dropped; every other unraisable exception still reaches ``hook``."""

    def hook_without_noise(unraisable) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        hook(unraisable)

    hook_without_noise.wraps_tagjax_hook = (
        True  # installed once per process, however often main runs
    )
    return hook_without_noise


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and runs the command -> the exit status (tagjax.errors: 0 ok, 1 some inputs
    failed, 2 usage, 3 UserError, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    parser, module = build_parser(command)
    # `--config.key=value` overrides are not argparse options; they are collected and validated
    # against the config file itself (tagjax.config.load).
    overrides, rest = split_overrides(argv)
    if module is not None:
        rest = rewrite_aliases(rest, getattr(module, "ALIASES", {}), command)
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    args.config_overrides = overrides
    if overrides and not hasattr(args, "config"):
        print(
            f"tagjax {args.command}: error: this command takes no --config overrides",
            file=sys.stderr,
        )
        return EXIT_USAGE
    config_lib.ensure_absl_flags_parsed()
    if not getattr(sys.unraisablehook, "wraps_tagjax_hook", False):
        sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    if not logging.getLogger().handlers:
        # Log lines go to stderr; set up before the bars, so they are printed above them.
        logging.basicConfig(
            level=logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    # With --json, stdout carries the result document alone: every other print goes to stderr.
    args.json_stdout = sys.stdout
    quiet_stdout = (
        contextlib.redirect_stdout(sys.stderr)
        if getattr(args, "json", False)
        else contextlib.nullcontext()
    )
    try:
        with quiet_stdout, progress.logging_above_bars():
            return int(module.run(args) or 0)
    except UserError as e:
        print(f"tagjax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"tagjax {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

"""The ``tagjax`` command: an explicit registry of subcommands, each one module of tagjax.commands.

Every command module exposes two functions and nothing else is looked up:

* ``add_arguments(parser)``: its options, on the ``argparse`` subparser;
* ``run(args) -> int | None``: does the work by calling library modules; the exit status (None is 0).

Only the chosen command's module is imported (for running it or for its ``--help``), and command modules
import the heavy library (JAX, grain, the models) inside ``run``, so ``tagjax --help`` and
``tagjax X --help`` are fast for every X.

Training-style subcommands take ``--config FILE[:arg]`` plus any number of ``--config.key=value``
overrides (see tagjax.config); the overrides reach ``run`` as ``args.config_overrides``.

Errors a user can fix (tagjax.errors.UserError) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

from tagjax import __version__
from tagjax import config as config_lib
from tagjax.errors import UserError


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
        epilog="Run `tagjax COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tagjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == command:  # only the chosen command's module is imported
            module = cmd.load()
            module.add_arguments(sp)
    return parser, module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    parser, module = build_parser(command)
    # `--config.key=value` overrides are not argparse options; they are collected and validated
    # against the config file itself (tagjax.config.load).
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    args = parser.parse_args(rest)
    if args.command is None:
        parser.print_help()
        return 2
    args.config_overrides = overrides
    if overrides and not hasattr(args, "config"):
        print(
            f"tagjax {args.command}: error: this command takes no --config overrides",
            file=sys.stderr,
        )
        return 2
    config_lib.ensure_absl_flags_parsed()
    try:
        return int(module.run(args) or 0)
    except UserError as e:
        print(f"tagjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tagjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The ``tagjax`` command.

Each subcommand lives in the module of its stage of the data flow; that module defines
``add_arguments(parser)`` and ``run(args) -> int | None``. Modules are imported only when their subcommand
runs (or its ``--help`` is asked for), so ``tagjax --help`` is fast.

Training-style subcommands take ``--config FILE[:arg]`` plus any number of ``--config.key=value``
overrides (see tagjax.config); the overrides reach ``run`` as ``args.config_overrides``.

Errors a user can fix (tagjax.errors.UserError) print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tagjax import __version__
from tagjax.errors import UserError

# name -> (module, one-line help); in the order of the data flow.
COMMANDS = {
    "vocab": ("tagjax.vocab", "build, show and look up hashtag vocabularies (WordNet synsets)"),
    "build": ("tagjax.build", "tagged posts -> filtered, deduplicated ArrayRecord shards"),
    "train": ("tagjax.commands.train", "pretrain a model on hashtags (config file + overrides)"),
    "evaluate": (
        "tagjax.evaluate",
        "hashtag metrics on held-out shards; top-1/5 of a classifier on a dataset",
    ),
    "transfer": ("tagjax.commands.transfer", "linear probe or fine-tuning on a downstream dataset"),
    "predict": ("tagjax.predict", "top hashtags for images"),
    "embed": ("tagjax.predict", "pooled trunk features for images or shards, to .npy"),
    "decontaminate": (
        "tagjax.downstream",
        "training images near evaluation images in feature space -> exclude list",
    ),
    "import-weights": (
        "tagjax.interop.torchvision",
        "PyTorch WSL/torchvision ResNeXt weights -> checkpoint",
    ),
    "export-weights": (
        "tagjax.interop.torchvision",
        "checkpoint -> torchvision-layout .safetensors",
    ),
    "demo": ("tagjax.demo", "the whole system end to end on the openclipart corpus, on CPU"),
}


def _command_module(name: str):
    module_name = COMMANDS[name][0]
    return importlib.import_module(module_name)


def _function_suffix(name: str) -> str:
    """Modules holding two subcommands name their functions after them (add_embed_arguments, run_embed)."""
    return name.replace("-", "_")


def _hooks(name: str):
    module = _command_module(name)
    suffix = _function_suffix(name)
    add = getattr(module, f"add_{suffix}_arguments", None) or module.add_arguments
    run = getattr(module, f"run_{suffix}", None) or module.run
    return add, run


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tagjax",
        description="Weakly supervised image pretraining from hashtags (JAX/Flax).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tagjax COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tagjax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            add, _ = _hooks(name)
            add(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in COMMANDS else None
    parser = build_parser(command)
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
    from tagjax.config import ensure_absl_flags_parsed

    ensure_absl_flags_parsed()
    _, run = _hooks(args.command)
    try:
        return int(run(args) or 0)
    except UserError as e:
        print(f"tagjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tagjax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

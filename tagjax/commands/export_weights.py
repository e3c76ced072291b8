"""The ``tagjax export-weights`` command: a checkpoint -> torchvision-layout .safetensors (the work is
tagjax.interop.torchvision.export_weights)."""

from __future__ import annotations

import argparse
import sys
import time

from tagjax.commands import _args, paths
from tagjax.errors import UserError

# Old flag spellings, still accepted with a warning (tagjax.cli).
ALIASES = {"--out": "--output"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write a tagjax checkpoint's weights as a torchvision-layout .safetensors file (for PyTorch / timm)."
    _args.add_checkpoint(
        parser,
        "workdir (newest checkpoint), checkpoints/ folder or checkpoint directory",
        required=False,
    )
    # The checkpoint used to be positional; still accepted, with a warning.
    parser.add_argument(
        "legacy_checkpoint", type=paths.path, nargs="?", default=None, help=argparse.SUPPRESS
    )
    _args.add_output(parser, "FILE.safetensors to write", required=True)
    parser.add_argument("--no-head", action="store_true", help="export the trunk only (no 'fc')")
    _args.add_json(parser, "print what was written (path, arch, size) as one JSON document")
    _args.add_progress(parser, draws_bars=False)


def run(args: argparse.Namespace) -> int:
    from tagjax.interop.torchvision import export_weights

    checkpoint = args.checkpoint
    if args.legacy_checkpoint:
        if checkpoint:
            raise UserError("give the checkpoint once, as --checkpoint PATH.")
        print(
            "tagjax export-weights: warning: the checkpoint is now --checkpoint PATH; "
            "the positional form will go",
            file=sys.stderr,
        )
        checkpoint = args.legacy_checkpoint
    if not checkpoint:
        raise UserError("pass --checkpoint PATH (a workdir, checkpoints/ folder or checkpoint).")
    _args.check_output(args.output, "--output")
    t0 = time.perf_counter()
    path, header = export_weights(checkpoint, args.output, head=not args.no_head)
    size = path.stat().st_size / 2**20
    if args.json:
        _args.print_json(
            args,
            {"output": str(path), "bytes": path.stat().st_size, **header},
        )
        return 0
    head = f"{header['num_classes']}-way head" if "num_classes" in header else "no head"
    print(
        f"exported {header['arch']} ({head}) to {path} ({size:,.1f} MiB, torchvision layout) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0

"""The ``tagjax export-weights`` command: a checkpoint -> torchvision-layout .safetensors (the work is
tagjax.interop.torchvision.export_weights)."""

from __future__ import annotations

import argparse
import sys
import time

from tagjax.commands import paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Write a tagjax checkpoint's weights as a torchvision-layout .safetensors file (for PyTorch / timm)."
    parser.add_argument(
        "checkpoint",
        type=paths.path,
        help="workdir (newest checkpoint), checkpoints/ folder or checkpoint directory",
    )
    parser.add_argument("--out", required=True, type=paths.path, help="FILE.safetensors to write")
    parser.add_argument("--no-head", action="store_true", help="export the trunk only (no 'fc')")


def run(args: argparse.Namespace) -> int:
    from tagjax.interop.torchvision import export_weights

    t0 = time.perf_counter()
    path, header = export_weights(args.checkpoint, args.out, head=not args.no_head)
    size = path.stat().st_size / 2**20
    head = f"{header['num_classes']}-way head" if "num_classes" in header else "no head"
    print(
        f"exported {header['arch']} ({head}) to {path} ({size:,.1f} MiB, torchvision layout) "
        f"in {time.perf_counter() - t0:.1f} s",
        file=sys.stdout,
    )
    return 0

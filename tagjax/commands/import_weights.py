"""The ``tagjax import-weights`` command: PyTorch WSL/torchvision ResNeXt weights -> a tagjax checkpoint
(the work is tagjax.interop.torchvision.import_weights)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tagjax import config as config_lib
from tagjax.commands import _args, paths
from tagjax.errors import UserError

# Old flag spellings, still accepted with a warning (tagjax.cli).
ALIASES = {"--out": "--output"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Convert torchvision-layout ResNet/ResNeXt weights (the released WSL ig_resnext101_32x*d and SWSL "
        "models; .safetensors without PyTorch, .pth with PyTorch's weights-only loader) into a tagjax "
        "checkpoint for predict, embed, evaluate and transfer."
    )
    parser.add_argument(
        "file", type=paths.path, help="weights file: .safetensors, or .pth/.pt (needs PyTorch)"
    )
    parser.add_argument(
        "--arch",
        required=True,
        metavar="ARCH",
        help="architecture of the weights, a name in tagjax.models.ARCHS (a wrong name lists them)",
    )
    _args.add_output(parser, "new checkpoint directory to write", required=True)
    parser.add_argument(
        "--no-head", action="store_true", help="import the trunk only (drop or allow no 'fc')"
    )
    parser.add_argument(
        "--classes",
        type=paths.path,
        default=None,
        help="text file with one class name per line for a head that is not ImageNet-1k's",
    )
    parser.add_argument(
        "--config",
        default="default",
        help="tagjax config stored with the weights (preprocessing, model options); default: default, tagjax/configs/default.py",
    )
    _args.add_json(parser, "print what was written (path, parameters, head) as one JSON document")
    _args.add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from tagjax.interop.torchvision import import_weights  # an unknown --arch is a UserError there

    t0 = time.perf_counter()
    cfg = config_lib.load(args.config, getattr(args, "config_overrides", []))
    # The released models were trained and evaluated in float32; keep that unless asked otherwise.
    if not any(o.startswith("--config.model.dtype") for o in getattr(args, "config_overrides", [])):
        cfg.model.dtype = "float32"
    class_names = None
    if args.classes:
        classes_path = Path(args.classes).expanduser()
        if not classes_path.is_file():
            raise UserError(
                f"--classes {args.classes!r} does not exist; pass a text file, one class per line."
            )
        class_names = [
            line.strip() for line in classes_path.read_text().splitlines() if line.strip()
        ]
    path, meta = import_weights(
        args.file,
        args.arch,
        args.output,
        head=not args.no_head,
        config=cfg,
        class_names=class_names,
    )
    if args.json:
        _args.print_json(args, {"output": str(path), "arch": args.arch, **meta})
        return 0
    if args.no_head:
        head = "no head"
    else:
        head = f"{meta['num_classes']}-way head"
        if meta.get("label_set") == "imagenet2012":
            head += " (ImageNet-1k classes)"
    print(
        f"imported {args.arch} from {Path(args.file).name}: {meta['num_params']:,} parameters, {head}, "
        f"in {time.perf_counter() - t0:.1f} s -> {path}"
    )
    return 0

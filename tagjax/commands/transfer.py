"""``tagjax transfer``: the linear probe or fine-tuning of a pretrained checkpoint on a downstream dataset
(tagjax.transfer.run_linear / run_finetune).

Only argparse is imported at the top, so ``tagjax transfer --help`` answers without loading JAX.
"""

from __future__ import annotations

import argparse

from tagjax.commands import _args, paths
from tagjax.errors import EXIT_INTERRUPTED, UserError

MODES = ("linear", "finetune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        required=True,
        choices=MODES,
        help="linear: frozen trunk + logistic regression; "
        "finetune: the whole network with a new head",
    )
    _args.add_checkpoint(
        parser,
        "the pretrained checkpoint: a training workdir, its checkpoints/ folder, one checkpoint "
        "directory, or an imported one",
    )
    parser.add_argument(
        "--workdir",
        type=paths.path,
        required=True,
        help="output directory: features cache, checkpoints, results.json",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="downstream dataset (default: the config's transfer.dataset): "
        "cifar10, caltech_birds2011, oxford_iiit_pet, places365_small, imagenet2012, "
        "emoji_subgroups, another prepared TFDS name, or a class-per-folder directory",
    )
    _args.add_data_dir(parser)
    parser.add_argument(
        "--config",
        default=None,
        help="config file (default configs/transfer_MODE.py); override "
        "fields with --config.key=value",
    )
    _args.add_json(parser, "print the results (results.json) as one JSON document on stdout")
    _args.add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from tagjax import config as config_lib
    from tagjax import transfer

    name = args.config or f"transfer_{args.mode}"
    cfg = config_lib.load(name, args.config_overrides)
    if "transfer" not in cfg:
        raise UserError(
            f"{name} has no `transfer` section; start from configs/transfer_{args.mode}.py."
        )
    if args.dataset:
        _args.check_path_or_name(args.dataset, "--dataset")
    with cfg.unlocked():
        if args.dataset:
            cfg.transfer.dataset = args.dataset
        if args.data_dir:
            cfg.transfer.data_dir = args.data_dir
    if args.mode == "linear":
        if "linear" not in cfg:
            raise UserError(
                f"{name} has no `linear` section; start from configs/transfer_linear.py."
            )
        result = transfer.run_linear(cfg, args.checkpoint, args.workdir, progress=args.progress)
    else:
        result = transfer.run_finetune(cfg, args.checkpoint, args.workdir, progress=args.progress)
    if args.json:
        _args.print_json(args, result)
    # A preemption (SIGTERM) is a clean stop, not the end of the run: launchers resume on non-zero.
    return EXIT_INTERRUPTED if result.get("preempted") else 0

"""``tagjax train``: pretraining from a config file (tagjax.train.train_and_evaluate).

Only argparse and logging are imported at the top, so ``tagjax train --help`` answers without loading JAX.
"""

from __future__ import annotations

import argparse
import logging

from tagjax.commands import _args, paths
from tagjax.errors import EXIT_INTERRUPTED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        required=True,
        help="config file (configs/NAME.py[:arg], or a bare NAME from configs/); override fields with "
        "--config.key=value",
    )
    parser.add_argument(
        "--workdir",
        type=paths.path,
        required=True,
        help="run directory: checkpoints, metrics.jsonl, TensorBoard events; rerun to resume",
    )
    _args.add_json(parser, "print the final metrics as one JSON document on stdout")
    _args.add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from tagjax import config as config_lib
    from tagjax import train

    # Libraries speak at WARNING and above (tagjax.cli); tagjax's own progress (restores, saves) at INFO.
    logging.getLogger("tagjax").setLevel(logging.INFO)
    cfg = config_lib.load(args.config, args.config_overrides)
    if cfg.data.get("dataset"):
        # Stored in the checkpoints' config, where predict and evaluate look for the vocabulary: a
        # path relative to where training started would point nowhere from anywhere else.
        with cfg.unlocked():
            cfg.data.dataset = paths.absolute(cfg.data.dataset)
    result = train.train_and_evaluate(cfg, args.workdir, progress=args.progress)
    if args.json:
        _args.print_json(args, result)
    # A preemption (SIGTERM) is a clean stop, not the end of the run: launchers resume on non-zero.
    return EXIT_INTERRUPTED if result["preempted"] else 0

"""The ``tagjax demo`` command: the whole system end to end on the openclipart corpus, on CPU (the work is
tagjax.demo.run_all)."""

from __future__ import annotations

import argparse

from tagjax import config as config_lib
from tagjax import progress
from tagjax.commands import _args, paths

DEFAULT_WORKDIR = "runs/demo"
DEFAULT_CONFIG = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + (
        ": openclipart -> WordNet hashtag vocabulary -> shards -> pretraining -> hashtag metrics -> linear "
        "probes against a random and a downstream-only trunk -> summary and plots."
    )
    parser.add_argument(
        "--workdir",
        type=paths.path,
        default=DEFAULT_WORKDIR,
        help=f"output directory (default {DEFAULT_WORKDIR}); rerun to reuse finished stages",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="config name or file (default: demo, tagjax/configs/demo.py); override fields with --config.key=value",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="repeat pretraining, baselines and probes with this many seeds and report mean "
        "± std (default: the config's demo.seeds)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every stage (the rasterized-SVG cache is still used)",
    )
    _args.add_json(parser, "print the summary (summary.json) as one JSON document on stdout")
    _args.add_progress(parser)


def run(args) -> int:
    from tagjax.demo import render_table, run_all

    cfg = config_lib.load(args.config, args.config_overrides)
    if args.seeds is not None:
        with cfg.unlocked():
            cfg.demo.seeds = int(args.seeds)
    command = _args.invocation(
        f"tagjax demo --workdir {args.workdir}" + (f" --seeds {args.seeds}" if args.seeds else "")
    )
    # Stage banners, progress lines and the training lines all go to stderr; the result to stdout.
    summary = run_all(
        cfg,
        args.workdir,
        fresh=args.fresh,
        progress=args.progress,
        log=progress.say,
        command=command,
    )
    if args.json:
        _args.print_json(args, summary)
    else:
        print(render_table(summary))
    return 0

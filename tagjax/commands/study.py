"""The ``tagjax study`` command: arms x seeds on the demo's corpus, paired by seed (the work is
tagjax.study.run_study)."""

from __future__ import annotations

import argparse

from tagjax import config as config_lib
from tagjax import progress
from tagjax.commands import _args, paths

DEFAULT_WORKDIR = "runs/study"
DEFAULT_CONFIG = "study"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (parser.description or "") + (
        ": for each arm the linear probe and held-out hashtag mAP, against the baseline the per-seed "
        "paired difference with its 95% interval; study.json, study.md and one figure per finding "
        "(docs/study.md)."
    )
    parser.add_argument(
        "--workdir",
        type=paths.path,
        default=DEFAULT_WORKDIR,
        help=f"output directory (default {DEFAULT_WORKDIR}); rerun to reuse finished runs",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="config name or file (default: study, tagjax/configs/study.py); override fields with "
        "--config.key=value",
    )
    parser.add_argument(
        "--arms",
        default=None,
        help="comma-separated arms to run (default: config.study.default_arms); the baseline is "
        "always included",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds or ranges, e.g. 0,1 or 0-5 (default: config.study.seeds)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every run (the rasterized-SVG cache is still used)",
    )
    _args.add_json(parser, "print study.json's content as one JSON document on stdout")
    _args.add_progress(parser)


def run(args) -> int:
    from tagjax.study import run_study

    cfg = config_lib.load(args.config, args.config_overrides)
    command = _args.invocation(
        f"tagjax study --workdir {args.workdir}"
        + (f" --arms {args.arms}" if args.arms else "")
        + (f" --seeds {args.seeds}" if args.seeds else "")
    )
    summary = run_study(
        cfg,
        args.workdir,
        arms=args.arms,
        seeds=args.seeds,
        fresh=args.fresh,
        progress=progress.wanted(args.progress),
        # stage lines and the final table on stdout (on stderr under --json, where stdout is the JSON)
        log=lambda line: print(line, flush=True),
        command=command,
    )
    if args.json:
        _args.print_json(args, summary)
    return 0

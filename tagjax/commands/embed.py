"""The ``tagjax embed`` command: pooled trunk features for images or shards, to .npy (the work is
tagjax.inference.embed)."""

from __future__ import annotations

import argparse
import os
import sys

from tagjax.commands import _args
from tagjax.errors import EXIT_SOME_INPUTS_FAILED, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _args.add_checkpoint(parser, "a training workdir, checkpoints/ folder or checkpoint")
    parser.add_argument(
        "--input",
        required=True,
        help="a built dataset directory (dataset.json), a folder of "
        "images, or a downstream dataset name (cifar10, emoji_subgroups, ...)",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split of a built dataset (default train) or of a downstream dataset (default test)",
    )
    _args.add_data_dir(parser)
    _args.add_output(
        parser, "output prefix: writes PREFIX.npy and PREFIX.index.jsonl", required=True
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: 64, tagjax.inference.DEFAULT_BATCH_SIZE)",
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="center-crop side (default: the checkpoint's)"
    )
    parser.add_argument(
        "--l2-normalize", action="store_true", help="unit-length rows (cosine search)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "float16"), help="stored dtype"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="image decoding threads (default: 4, tagjax.inference.DEFAULT_THREADS)",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="stop once more than this fraction of at least 1,000 images could not be read "
        '(default 0.01); unreadable images are zero rows marked "valid": false in the index',
    )
    _args.add_json(parser, "print the summary (rows, dim, bad images, files) as one JSON document")
    _args.add_progress(parser)


def run(args) -> int:
    from tagjax.inference import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_THREADS,
        Inference,
        embed,
        resolve_input,
    )

    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    threads = DEFAULT_THREADS if args.threads is None else args.threads
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    if args.image_size is not None and args.image_size < 1:
        raise UserError("--image-size must be at least 1.")
    if not 0.0 <= args.max_bad_fraction <= 1.0:
        raise UserError(f"--max-bad-fraction must be in [0, 1], got {args.max_bad_fraction}.")
    _args.check_path_or_name(args.input, "--input")
    _args.check_output(args.output, "--output")
    if os.path.isdir(args.output):  # `-o out/` would write out.npy beside the folder
        raise UserError(
            f"--output is a prefix (PREFIX.npy, PREFIX.index.jsonl) and {args.output} is a "
            f"directory: pass {os.path.join(args.output, 'NAME')}."
        )
    inference = Inference(args.checkpoint, head=False, image_size=args.image_size)
    source = resolve_input(args.input, args.split, args.data_dir)
    summary = embed(
        inference,
        source,
        args.output,
        batch_size=batch_size,
        l2_normalize=args.l2_normalize,
        dtype=args.dtype,
        max_bad_fraction=args.max_bad_fraction,
        num_threads=threads,
        progress=args.progress,
        threshold_name="--max-bad-fraction",
    )
    if args.json:
        _args.print_json(args, summary)
    else:
        print(
            f"embedded {summary['rows']:,} images ({summary['dim']}-d, {summary['bad_images']} unreadable) in "
            f"{summary['seconds']:.1f} s -> {summary['embeddings']}, {summary['index']}"
        )
    if summary["bad_images"]:
        print(
            f"tagjax embed: {summary['bad_images']} of {summary['rows']} images could not be read; "
            f'their rows are zeros, marked "valid": false in {summary["index"]}',
            file=sys.stderr,
        )
        return EXIT_SOME_INPUTS_FAILED
    return 0

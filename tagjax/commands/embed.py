"""The ``tagjax embed`` command: pooled trunk features for images or shards, to .npy (the work is
tagjax.inference.embed)."""

from __future__ import annotations

import argparse

from tagjax.commands import paths
from tagjax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        type=paths.path,
        required=True,
        help="a training workdir, checkpoints/ folder or checkpoint",
    )
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
    parser.add_argument(
        "--data-dir",
        type=paths.path,
        default=None,
        help="TFDS data directory for downstream datasets",
    )
    parser.add_argument(
        "--output",
        type=paths.path,
        required=True,
        help="output prefix: writes PREFIX.npy and PREFIX.index.jsonl",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: tagjax.inference.DEFAULT_BATCH_SIZE)",
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
        help="image decoding threads (default: tagjax.inference.DEFAULT_THREADS)",
    )


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
    inference = Inference(args.checkpoint, head=False, image_size=args.image_size)
    source = resolve_input(args.input, args.split, args.data_dir)
    max_bad = float(
        ((inference.meta.get("config") or {}).get("data") or {}).get(
            "max_bad_record_fraction", 0.001
        )
    )
    summary = embed(
        inference,
        source,
        args.output,
        batch_size=batch_size,
        l2_normalize=args.l2_normalize,
        dtype=args.dtype,
        max_bad_fraction=max_bad,
        num_threads=threads,
    )
    print(
        f"embedded {summary['rows']:,} images ({summary['dim']}-d, {summary['bad_images']} unreadable) in "
        f"{summary['seconds']:.1f} s -> {summary['embeddings']}, {summary['index']}"
    )
    return 0

"""The ``tagjax predict`` command: top hashtags for images (the work is tagjax.predict)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tagjax.commands import _args, paths
from tagjax.errors import EXIT_SOME_INPUTS_FAILED, UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        type=paths.path,
        nargs="+",
        metavar="IMAGE",
        help="image files (JPEG, PNG, GIF, WebP, SVG, ...) or folders of them (read recursively, "
        "in sorted order, as `tagjax embed` reads a folder)",
    )
    _args.add_checkpoint(
        parser,
        "a training workdir, its checkpoints/ folder, or one checkpoint directory (trained or "
        "imported)",
    )
    parser.add_argument(
        "--vocab",
        type=paths.path,
        default=None,
        help="the vocabulary (vocab.json) the checkpoint was trained on; "
        "default: found beside the checkpoint or in its training dataset",
    )
    parser.add_argument("--top-k", type=int, default=5, help="hashtags per image (default 5)")
    parser.add_argument(
        "--aliases", type=int, default=5, help="hashtag spellings shown per label (default 5)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="center-crop side (default: the checkpoint's data.eval_image_size)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: 64, tagjax.inference.DEFAULT_BATCH_SIZE)",
    )
    _args.add_json(
        parser, "print one JSON document (a list, one entry per image) instead of a table"
    )
    _args.add_progress(parser)


def run(args) -> int:
    from tagjax.inference import DEFAULT_BATCH_SIZE, Inference, image_files
    from tagjax.predict import ClassNames, find_vocabulary, predict_files

    batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1.")
    if args.aliases < 0:
        raise UserError("--aliases must be at least 0.")
    if args.image_size is not None and args.image_size < 1:
        raise UserError("--image-size must be at least 1.")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    paths = []  # folders expand to their image files, in embed's order
    for given in args.images:
        if Path(given).expanduser().is_dir():
            paths.extend(str(f) for f in image_files(given))
        else:
            paths.append(given)
    inference = Inference(args.checkpoint, head=True, image_size=args.image_size)
    vocab = find_vocabulary(inference.meta, args.vocab, inference.path)
    results, failed = {}, {}
    for path, hashtags, error in predict_files(
        inference, vocab, paths, top_k=args.top_k, num_aliases=args.aliases, batch_size=batch_size
    ):
        if hashtags is None:
            failed[path] = error
        else:
            results[path] = hashtags
    if args.json:
        payload = [
            {"image": p, "hashtags": results[p]}
            if p in results
            else {"image": p, "error": failed[p]}
            for p in paths
        ]
        _args.print_json(args, payload)
    else:
        for path in paths:
            print(path)
            if path in failed:
                print(f"  error: {failed[path]}")
                continue
            for rank, e in enumerate(results[path], 1):
                synsets = ", ".join(e["synsets"][:3]) + (" ..." if len(e["synsets"]) > 3 else "")
                aliases = " ".join("#" + a for a in e["aliases"])
                tag = e["hashtag"] if isinstance(vocab, ClassNames) else "#" + e["hashtag"]
                print(f"  {rank:2d}. {tag:<25s} {e['probability']:7.2%}  {synsets:<40s} {aliases}")
    if failed:
        print(
            f"tagjax predict: {len(failed)} of {len(paths)} images could not be read",
            file=sys.stderr,
        )
        return EXIT_SOME_INPUTS_FAILED
    return 0

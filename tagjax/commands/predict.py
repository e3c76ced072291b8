"""The ``tagjax predict`` command: top hashtags for images (the work is tagjax.predict)."""

from __future__ import annotations

import argparse
import json
import sys

from tagjax.commands import paths
from tagjax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images",
        type=paths.path,
        nargs="+",
        metavar="IMAGE",
        help="image files (JPEG, PNG, GIF, WebP, SVG, ...)",
    )
    parser.add_argument(
        "--checkpoint",
        type=paths.path,
        required=True,
        help="a training workdir, its checkpoints/ folder, or one "
        "checkpoint directory (trained or imported)",
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
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    import numpy as np

    from tagjax import augment
    from tagjax.inference import Inference
    from tagjax.predict import ClassNames, find_vocabulary, read_user_image, top_hashtags

    if args.top_k < 1:
        raise UserError("--top-k must be at least 1.")
    inference = Inference(args.checkpoint, head=True, image_size=args.image_size)
    vocab = find_vocabulary(inference.meta, args.vocab, inference.path)
    loaded, failed = [], {}
    for path in args.images:
        try:
            loaded.append((path, inference.preprocess(read_user_image(path))))
        except (UserError, augment.BadImage) as e:
            failed[path] = str(e)
    size = inference.image_size
    crops = np.stack([c for _, c in loaded]) if loaded else np.zeros((0, size, size, 3), np.uint8)
    results = dict(
        zip([p for p, _ in loaded], top_hashtags(inference, vocab, crops, args.top_k, args.aliases))
    )
    if args.json:
        payload = [
            {"image": p, "hashtags": results[p]}
            if p in results
            else {"image": p, "error": failed[p]}
            for p in args.images
        ]
        print(json.dumps(payload, indent=1))
    else:
        for path in args.images:
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
            f"tagjax predict: {len(failed)} of {len(args.images)} images could not be read",
            file=sys.stderr,
        )
        return 1
    return 0

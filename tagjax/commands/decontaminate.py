"""The ``tagjax decontaminate`` command: embeds the training and the evaluation images with one trunk and
writes the exclude list of training images near an evaluation image (the work is tagjax.decontaminate)."""

from __future__ import annotations

import sys
from pathlib import Path

from tagjax.commands import _args, paths
from tagjax.errors import UserError


def add_arguments(parser) -> None:
    _args.add_checkpoint(
        parser,
        "the trunk whose features define similarity (a trained or imported checkpoint; the better "
        "the features, the better the matches)",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="the pretraining images: a dataset built by `tagjax build` "
        "(ids are post ids) or a folder of images (ids are relative paths)",
    )
    parser.add_argument(
        "--train-split", default="train", help="split of a built dataset (default train)"
    )
    parser.add_argument(
        "--eval",
        required=True,
        action="append",
        dest="evals",
        metavar="EVAL",
        help="evaluation images: a downstream dataset name (cifar10, emoji_subgroups, ...), "
        "a class-per-folder directory or a folder of images; repeat for several",
    )
    parser.add_argument(
        "--eval-split", default="test", help="split of each downstream dataset (default test)"
    )
    _args.add_data_dir(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine similarity (of mean-centred "
        "features) at or above which a training image is excluded (default 0.95)",
    )
    parser.add_argument(
        "--neighbours", type=int, default=5, help="neighbours examined per evaluation image"
    )
    _args.add_output(
        parser,
        required=True,
        help="the exclude list (one post id per line) for "
        "`tagjax build`; PATH.pairs.jsonl lists every match for inspection",
    )
    parser.add_argument(
        "--embeddings-dir",
        type=paths.path,
        default=None,
        help="where embeddings are cached (default: beside --output); an interrupted run resumes",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    _args.add_json(
        parser, "print the result (counts, similarity quantiles, files) as one JSON document"
    )
    _args.add_progress(parser)


def run(args) -> int:
    import numpy as np

    from tagjax import inference as inference_lib
    from tagjax.decontaminate import find_near_duplicates, write_exclude_list

    if not -1.0 <= args.threshold <= 1.0:
        raise UserError(
            f"--threshold {args.threshold} is not a cosine similarity (between -1 and 1)."
        )
    output = Path(args.output).expanduser()
    cache = (
        Path(args.embeddings_dir).expanduser()
        if args.embeddings_dir
        else output.parent / f"{output.name}.embeddings"
    )
    inference = inference_lib.Inference(args.checkpoint, head=False)

    def embed(spec: str, split: str | None, prefix: Path):
        _args.check_path_or_name(spec, "--train" if prefix.name == "train" else "--eval")
        source = inference_lib.resolve_input(spec, split, args.data_dir)
        print(f"embedding {source.description}: {source.length:,} images", file=sys.stderr)
        inference_lib.embed(
            inference, source, prefix, batch_size=args.batch_size, progress=args.progress
        )
        rows = inference_lib.read_index(f"{prefix}.index.jsonl")
        emb = np.load(f"{prefix}.npy", mmap_mode="r")
        keep = np.asarray([r["valid"] for r in rows], bool)
        return emb, [str(r["id"]) for r in rows], keep

    train_emb, train_ids, train_ok = embed(args.train, args.train_split, cache / "train")
    eval_parts, eval_names = [], []
    for i, spec in enumerate(args.evals):
        emb, ids, ok = embed(spec, args.eval_split, cache / f"eval{i}")
        eval_parts.append(np.asarray(emb)[ok])
        eval_names.extend(np.asarray(ids)[ok].tolist())
    rows = np.flatnonzero(train_ok)
    result = find_near_duplicates(
        np.concatenate(eval_parts),
        np.asarray(train_emb)[rows],
        [train_ids[r] for r in rows],
        threshold=args.threshold,
        k=args.neighbours,
        eval_names=eval_names,
    )
    write_exclude_list(result, output)
    q = (
        np.percentile(result.nearest, [50, 90, 99, 100])
        if len(result.nearest)
        else [float("nan")] * 4
    )
    if args.json:
        _args.print_json(
            args,
            {
                "excluded": len(result.train_ids),
                "num_train": result.num_train,
                "num_eval": result.num_eval,
                "threshold": args.threshold,
                "nearest_similarity": dict(zip(("median", "p90", "p99", "max"), q)),
                "output": str(output),
                "pairs": f"{output}.pairs.jsonl",
            },
        )
        return 0
    print(
        f"nearest training image per evaluation image, cosine similarity: median {q[0]:.3f}, p90 {q[1]:.3f}, "
        f"p99 {q[2]:.3f}, max {q[3]:.3f}"
    )
    print(
        f"{len(result.train_ids):,} of {result.num_train:,} training images are within {args.threshold} of one of "
        f"{result.num_eval:,} evaluation images -> {output} (pairs for inspection: {output}.pairs.jsonl)"
    )
    return 0

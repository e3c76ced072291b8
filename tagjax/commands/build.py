"""The ``tagjax build`` command: its options become a tagjax.build_steps.BuildConfig, run by the local
builder (tagjax.build) or, with ``--beam``, by the Apache Beam pipeline (tagjax.build_beam);
``--apply-optout`` removes opted-out posts from a finished dataset instead, and ``--upgrade-labels``
converts an old dataset's label index to the memory-mapped label store."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path

from tagjax import build_steps, dedup
from tagjax import images as images_lib
from tagjax import posts as posts_lib
from tagjax import vocab as vocab_lib
from tagjax.commands import _args, paths
from tagjax.errors import UserError

# Old flag spellings, still accepted with a warning (tagjax.cli).
ALIASES = {"--tfds-data-dir": "--data-dir"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Inputs are KIND:PATH with KIND one of "
        + ", ".join(posts_lib.SOURCE_KINDS)
        + "; `openclipart` alone reads Debian's openclipart-svg. Example: tagjax build "
        "openclipart --output /tmp/clipart --max-side 96 --limit 3000"
    )
    d = build_steps.BuildConfig(inputs=(), output="")
    io_ = parser.add_argument_group("inputs and output")
    io_.add_argument("inputs", nargs="*", help="post sources, KIND:PATH")
    _args.add_output(io_, "dataset directory to create")
    io_.add_argument(
        "--overwrite", action="store_true", help="replace a previous build in --output"
    )
    io_.add_argument("--limit", type=int, default=d.limit, help="read at most N posts (0 = all)")
    io_.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="image worker processes (0 = one per CPU core, 1 = no subprocesses)",
    )
    io_.add_argument(
        "--yfcc-images",
        type=paths.path,
        default=None,
        help="folder of YFCC100M photos (yfcc inputs)",
    )
    io_.add_argument(
        "--image-root",
        type=paths.path,
        action="append",
        default=[],
        metavar="DIR",
        help="a folder image paths may point into besides each input's own folder (repeatable); "
        "paths resolving anywhere else are refused",
    )
    io_.add_argument(
        "--max-file-mb",
        type=float,
        default=d.images.max_file_bytes / 2**20,
        help="size cap of one image file, tar member or manifest line, MiB (checked before reading)",
    )
    io_.add_argument(
        "--no-drops-file",
        action="store_true",
        help="do not write drops.jsonl (the id and reason of every dropped post)",
    )
    io_.add_argument(
        "--raster-cache",
        default=None,
        help="cache of rasterized SVGs (default ~/.cache/tagjax/raster; '' = off)",
    )
    _args.add_progress(io_)
    _args.add_json(io_, "print the build summary (stats.json) as one JSON document on stdout")
    io_.add_argument(
        "--beam",
        action="store_true",
        help="run as an Apache Beam pipeline (tagjax.build_beam) instead of local workers",
    )
    io_.add_argument(
        "--beam-options",
        default="",
        help="Beam pipeline options, e.g. '--runner=FlinkRunner --flink_master=host:8081'",
    )
    pv = parser.add_argument_group("privacy")
    pv.add_argument(
        "--assume-public",
        action="store_true",
        help="use posts whose source does not record visibility (only your own data)",
    )
    pv.add_argument(
        "--optout-posts",
        type=paths.path,
        default=None,
        help="file of post ids to exclude, one per line",
    )
    pv.add_argument(
        "--optout-users",
        type=paths.path,
        default=None,
        help="file of user ids to exclude, one per line",
    )
    pv.add_argument(
        "--keep-user-ids", action="store_true", help="store the uploader id in each record"
    )
    pv.add_argument(
        "--apply-optout",
        type=paths.path,
        metavar="DATASET",
        default=None,
        help="instead of building: remove the opted-out posts/users from DATASET",
    )
    io_.add_argument(
        "--upgrade-labels",
        metavar="DATASET",
        default=None,
        help="instead of building: convert DATASET's old *.labels.npz to the memory-mapped label "
        "store (training does this on the fly where the folder is writable)",
    )
    lb = parser.add_argument_group("labels")
    lb.add_argument(
        "--vocab",
        default=None,
        help="vocab.json to label with, or 'in1k' (default: build one from the corpus)",
    )
    lb.add_argument(
        "--vocab-mode",
        default=d.vocab_mode,
        choices=vocab_lib.MODES,
        help="which hashtags become labels when the vocabulary is built from the corpus",
    )
    lb.add_argument(
        "--vocab-top-k",
        type=int,
        default=d.vocab_top_k,
        help="keep the K most frequent canonical hashtags as labels (0 = all)",
    )
    lb.add_argument(
        "--vocab-min-count",
        type=int,
        default=d.vocab_min_count,
        help="drop canonical hashtags seen on fewer posts",
    )
    lb.add_argument(
        "--drop-ancestors",
        action="store_true",
        help="keep #goldenretriever, drop #dog when both are on a post",
    )
    lb.add_argument(
        "--habit-fraction",
        type=float,
        default=d.habit_fraction,
        help="a hashtag on more than this fraction of one uploader's posts is a habit, not content",
    )
    lb.add_argument(
        "--habit-min-posts",
        type=int,
        default=d.habit_min_posts,
        help="uploaders with fewer posts are not checked for habits",
    )
    lb.add_argument(
        "--habit-min-users",
        type=int,
        default=d.habit_min_users,
        help="the habit filter is off for corpora with fewer uploaders (a topic is not a habit)",
    )
    lb.add_argument(
        "--max-hashtags-per-post",
        type=int,
        default=d.max_hashtags_per_post,
        help="posts with more distinct hashtags are dropped as spam (too_many_hashtags)",
    )
    lb.add_argument(
        "--habit-action",
        default=d.habit_action,
        choices=("drop", "keep"),
        help="drop habitual hashtags from those posts, or only report them",
    )
    lb.add_argument(
        "--max-posts-per-user",
        type=int,
        default=d.max_posts_per_user,
        help="keep at most N posts of one uploader (0 = no cap)",
    )
    im = parser.add_argument_group("images")
    o = d.images
    im.add_argument("--max-side", type=int, default=o.max_side, help="shorter side at most, px")
    im.add_argument(
        "--min-side", type=int, default=o.min_side, help="smaller sources are skipped, px"
    )
    im.add_argument("--max-pixels", type=int, default=o.max_pixels, help="decompression-bomb limit")
    im.add_argument(
        "--max-aspect",
        type=float,
        default=o.max_aspect,
        help="images more elongated than this long/short side ratio are skipped",
    )
    im.add_argument(
        "--jpeg-quality", type=int, default=o.jpeg_quality, help="JPEG quality of stored images"
    )
    im.add_argument(
        "--max-failure-fraction",
        type=float,
        default=d.max_failure_fraction,
        help="stop the build when more than this fraction of images cannot be read",
    )
    dd = parser.add_argument_group("deduplication and split")
    dd.add_argument(
        "--near-dup-threshold",
        type=int,
        default=d.dedup.near_threshold,
        help="Hamming distance of 64-bit perceptual hashes; -1 = off",
    )
    dd.add_argument(
        "--no-exact-dedup",
        action="store_true",
        help="keep pixel-identical copies (exact deduplication off)",
    )
    dd.add_argument(
        "--eval-set",
        action="append",
        default=[],
        help="folder or tfds:NAME/SPLIT whose near duplicates are removed (repeatable)",
    )
    dd.add_argument(
        "--eval-threshold",
        type=int,
        default=d.dedup.eval_threshold,
        help="Hamming distance to an --eval-set image at or below which a post is removed",
    )
    _args.add_data_dir(dd)
    dd.add_argument(
        "--heldout-fraction",
        type=float,
        default=d.heldout_fraction,
        help="share of near-duplicate groups (by hashed post id) in the held-out split",
    )
    dd.add_argument(
        "--split-seed", default=d.split_seed, help="salt of the post-id hash that assigns splits"
    )
    dd.add_argument("--shard-size", type=int, default=d.shard_size, help="records per shard")


def config_from_args(args) -> build_steps.BuildConfig:
    try:
        image_options = images_lib.ImageOptions(
            max_side=args.max_side,
            min_side=args.min_side,
            max_pixels=args.max_pixels,
            max_aspect=args.max_aspect,
            jpeg_quality=args.jpeg_quality,
            max_file_bytes=int(args.max_file_mb * 2**20),
        )
    except ValueError as e:
        raise UserError(f"bad image option: {e}.") from None
    for name in ("near_dup_threshold", "eval_threshold"):
        t = getattr(args, name)
        if not -1 <= t < dedup.HASH_BITS // 2:
            raise UserError(f"--{name.replace('_', '-')} must be in [-1, 31], got {t}.")
    return build_steps.BuildConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        vocab=args.vocab,
        vocab_mode=args.vocab_mode,
        vocab_top_k=args.vocab_top_k,
        vocab_min_count=args.vocab_min_count,
        drop_ancestors=args.drop_ancestors,
        images=image_options,
        dedup=dedup.DedupOptions(
            exact=not args.no_exact_dedup,
            near_threshold=args.near_dup_threshold,
            eval_threshold=args.eval_threshold,
        ),
        eval_sets=tuple(args.eval_set),
        tfds_data_dir=args.data_dir,
        assume_public=args.assume_public,
        optout_posts=args.optout_posts,
        optout_users=args.optout_users,
        keep_user_ids=args.keep_user_ids,
        max_posts_per_user=args.max_posts_per_user,
        habit_fraction=args.habit_fraction,
        habit_min_posts=args.habit_min_posts,
        habit_min_users=args.habit_min_users,
        max_hashtags_per_post=args.max_hashtags_per_post,
        image_roots=tuple(args.image_root),
        drops_file=not args.no_drops_file,
        habit_action=args.habit_action,
        heldout_fraction=args.heldout_fraction,
        split_seed=args.split_seed,
        shard_size=args.shard_size,
        workers=args.workers,
        max_failure_fraction=args.max_failure_fraction,
        limit=args.limit,
        raster_cache=args.raster_cache,
        overwrite=args.overwrite,
        yfcc_images=args.yfcc_images,
        progress=args.progress,
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    from tagjax import build as local_build

    if args.apply_optout:
        optout = build_steps.OptOut.load(args.optout_posts, args.optout_users)
        if not optout.posts and not optout.users:
            raise UserError("--apply-optout needs --optout-posts and/or --optout-users.")
        result = local_build.apply_optout(
            args.apply_optout, optout, args.inputs, args.yfcc_images, progress=args.progress
        )
        if args.json:
            _args.print_json(args, {"dataset": args.apply_optout, **result})
            return 0
        print(
            f"removed {result['removed']} records ({result['per_split']}) from {args.apply_optout}"
        )
        return 0
    if args.upgrade_labels:
        from tagjax import records, vocab

        root = Path(args.upgrade_labels).expanduser()
        manifest = records.load_manifest(root)
        num_labels = vocab.Vocabulary.load(root / manifest.vocab_file).num_labels
        for split in manifest.splits:
            store = records.open_label_store(root, split, num_labels)
            print(f"{split}: {store.num_records:,} records in {store.offsets_path.parent}")
        return 0
    if not args.output:
        raise UserError("pass --output DIR for the dataset.")
    cfg = config_from_args(args)
    # `kill`, a batch scheduler's timeout or `docker stop` send SIGTERM: clean up as for Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.beam:
        from tagjax import build_beam  # Apache Beam is an optional dependency

        summary = build_beam.build(cfg, shlex.split(args.beam_options))
    else:
        summary = local_build.build(cfg)
    explanation = summary.get("habits", {}).get("explanation")
    if explanation:
        print(f"tagjax build: note: {explanation}", file=sys.stderr)
    if args.json:
        _args.print_json(args, {"dataset": cfg.output, **summary})
        return 0
    print(build_steps.render_report(summary))
    print(f"dataset written to {cfg.output}")
    return 0

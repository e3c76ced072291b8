"""The ``tagjax evaluate`` command: arguments and run (the work is tagjax.evaluate and tagjax.metrics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tagjax.commands import _args
from tagjax.errors import UserError


def _default_output(step_dir: Path, dataset: str, split: str, step: int) -> Path:
    workdir = step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent
    name = "synthetic" if dataset == "synthetic" else Path(dataset).name
    return workdir / "eval" / f"{name}-{split}-step{step}.json"


def _classification_output(step_dir: Path, dataset: str, split: str, step: int) -> Path:
    """WORKDIR/eval/<dataset>-<split>-step<N>.json for a workdir's checkpoint; beside a standalone
    (imported) checkpoint directory, eval/<checkpoint>-<dataset>-<split>.json, so two imports never collide."""
    path = Path(dataset).expanduser()
    name = path.name if path.is_dir() else dataset
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    if step_dir.parent.name == "checkpoints":
        return step_dir.parent.parent / "eval" / f"{name}-{split}-step{step}.json"
    return step_dir.parent / "eval" / f"{step_dir.name}-{name}-{split}.json"


def _write_and_report(args, out: Path, metrics: dict, table: str) -> int:
    """Both evaluations end alike: metrics as JSON at ``out``, the table beside it (.txt), and on stdout
    either the table or, with --json, the metrics and where they were written."""
    from tagjax.metrics import to_json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(to_json(metrics), indent=1) + "\n")
    out.with_suffix(".txt").write_text(table + "\n")
    if args.json:
        _args.print_json(args, {"output": str(out), **to_json(metrics)})
        return 0
    print(table)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0


def run_classification(args) -> int:
    """``tagjax evaluate`` on a downstream dataset: writes the JSON and the table, prints the table."""
    from tagjax.evaluate import evaluate_classification, format_classification_table

    metrics = evaluate_classification(
        args.checkpoint,
        args.dataset,
        args.split or "test",
        data_dir=args.data_dir,
        max_images=args.max_images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        resize=args.resize,
        progress=args.progress,
    )
    step = int(metrics.get("step") or 0)
    out = (
        Path(args.output)
        if args.output
        else _classification_output(
            Path(metrics["checkpoint"]), args.dataset, metrics["split"], step
        )
    )
    table = format_classification_table(
        metrics,
        title=f"{metrics['checkpoint']} on {metrics['dataset']} ({metrics['split']}), step {step:,}",
    )
    return _write_and_report(args, out, metrics, table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _args.add_checkpoint(
        parser,
        "a training workdir (newest checkpoint), its checkpoints/ folder, or one checkpoint "
        "directory",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="a dataset built by `tagjax build` (its vocabulary must "
        "be the checkpoint's), 'synthetic' for the checkpoint config's synthetic task, or, for a "
        "classifier checkpoint (ImageNet import, fine-tuned), a downstream dataset (imagenet2012, "
        "emoji_subgroups, any prepared TFDS name) or class-per-folder directory: top-1/top-5",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split to evaluate (default heldout for built datasets; "
        "test for downstream ones, where validation and val name the same split)",
    )
    _args.add_data_dir(parser)
    parser.add_argument(
        "--max-images", type=int, default=0, help="evaluate the first N images (0 = all)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="center-crop side (default: the checkpoint's data.eval_image_size)",
    )
    parser.add_argument(
        "--resize",
        type=int,
        default=None,
        help="shorter side before the crop (default: the "
        "checkpoint's data.eval_resize, scaled with --image-size)",
    )
    _args.add_output(
        parser,
        "JSON file to write (default: WORKDIR/eval/"
        "<dataset>-<split>-step<N>.json, or eval/<checkpoint>-<dataset>-<split>.json beside a "
        "standalone checkpoint directory); the table is written beside it as .txt",
    )
    _args.add_json(parser, "print the metrics (the JSON file's contents) on stdout, not the table")
    _args.add_progress(parser)


def run(args) -> int:
    from tagjax.evaluate import evaluate_checkpoint, is_hashtag_dataset
    from tagjax.metrics import format_table

    if args.batch_size < 1 or args.max_images < 0:
        raise UserError("--batch-size must be at least 1 and --max-images at least 0.")
    for flag, value in (("--image-size", args.image_size), ("--resize", args.resize)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1.")
    _args.check_path_or_name(args.dataset, "--dataset")
    _args.check_output(args.output, "--output")
    if not is_hashtag_dataset(args.dataset):
        return run_classification(args)
    split = args.split or "heldout"
    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        split,
        max_images=args.max_images,
        batch_size=args.batch_size,
        image_size=args.image_size,
        resize=args.resize,
        progress=args.progress,
    )
    step = int(metrics.get("step") or 0)
    out = (
        Path(args.output)
        if args.output
        else _default_output(Path(metrics["checkpoint"]), args.dataset, split, step)
    )
    table = format_table(
        metrics, title=f"{metrics['checkpoint']} on {args.dataset} ({split}), step {step:,}"
    )
    return _write_and_report(args, out, metrics, table)

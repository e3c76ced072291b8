"""Evaluating a checkpoint: hashtag metrics (tagjax.metrics) on held-out shards of a built dataset, or
top-1 / top-5 of a classifier checkpoint on a downstream dataset. The ``tagjax evaluate`` command
(tagjax.commands.evaluate) calls these.

**Classification** (``tagjax evaluate --dataset imagenet2012`` or any other downstream dataset of
tagjax.downstream): a checkpoint whose head is a classifier (an ImageNet-1k import from ``tagjax
import-weights``, or a ``tagjax transfer --mode finetune`` checkpoint) is scored by top-1 / top-5 over its
*own* outputs, at its own evaluation preprocessing (shorter side to ``data.eval_resize``, center crop
``data.eval_image_size``, ``data.mean`` / ``data.std``). Dataset labels are mapped onto the checkpoint's
outputs by name (:func:`map_classes`): by wnid when the checkpoint lists ``class_wnids`` (the ImageNet-1k
imports), else by ``class_names``; a dataset class the head does not predict is refused, and outputs the
dataset lacks stay in the ranking (predicting one is an error, as it would be in use).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tagjax import augment, downstream, input_pipeline, records
from tagjax import metrics as metrics_lib
from tagjax.errors import UserError
from tagjax.inference import DEFAULT_THREADS, BadImageCounter, Inference, image_batches
from tagjax.progress import progress_bar

# ----------------------------------------------------------------------------------------------------
# Hashtag metrics of a checkpoint on a built dataset.
# ----------------------------------------------------------------------------------------------------


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    dataset: str,
    split: str = "heldout",
    *,
    max_images: int = 0,
    batch_size: int = 256,
    image_size: int | None = None,
    resize: int | None = None,
    ks: Sequence[int] = metrics_lib.DEFAULT_KS,
    bucket_fractions: Sequence[float] = metrics_lib.DEFAULT_BUCKET_FRACTIONS,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Hashtag metrics of a checkpoint on one split of a built dataset (``"synthetic"``: the synthetic task
    of the checkpoint's config). Returns the :func:`hashtag_metrics` dict plus where it came from."""

    inference = Inference(checkpoint_path, head=True, image_size=image_size, resize=resize)
    config = inference.config
    synthetic = dataset == "synthetic"
    with config.unlocked():
        config.data.synthetic = synthetic
        if not synthetic:
            config.data.dataset = str(Path(dataset).expanduser())
        config.data.eval_image_size = inference.transform.size
        config.data.eval_resize = inference.transform.resize
    dataset_dir = None if synthetic else config.data.dataset
    if not synthetic:
        vocab = input_pipeline.load_vocabulary(config, dataset_dir)
        expected = inference.meta.get("vocab_fingerprint")
        if expected and vocab.fingerprint() != expected:
            raise UserError(
                f"{dataset} uses vocabulary {vocab.fingerprint()} but the checkpoint was trained on {expected}: "
                "evaluate on a dataset built with the checkpoint's vocabulary."
            )
    if inference.num_classes != input_pipeline.num_labels(config, dataset_dir):
        raise UserError(
            f"the checkpoint predicts {inference.num_classes} labels but {dataset} has "
            f"{input_pipeline.num_labels(config, dataset_dir)}; evaluate on the dataset it was trained on."
        )
    it = input_pipeline.make_eval_iterator(
        config,
        dataset_dir,
        split,
        batch_size=batch_size,
        max_images=max_images,
        process_index=0,
        process_count=1,
    )
    acc = metrics_lib.accumulator_from_config(config, inference.num_classes, it.num_images)
    loss = str(config.get("loss", "softmax"))
    start = time.perf_counter()
    bar = progress_bar(total=it.num_images, unit="img", desc=f"evaluate {split}", enabled=progress)
    for batch in it:
        logits = inference.logits(batch["image"])
        acc.update(metrics_lib.scores_from_logits(logits, loss), batch["labels"], batch["mask"])
        bar.update(int(np.asarray(batch["mask"]).sum()))
    bar.close()
    if synthetic:
        counts = input_pipeline.synthetic_task(config, "train").label_index.counts(
            inference.num_classes
        )
    else:
        counts = metrics_lib.label_counts_of(
            dataset_dir, inference.num_classes, config.data.train_split
        )
    metrics = acc.result(label_counts=counts, ks=ks, bucket_fractions=bucket_fractions)
    metrics.update(
        {
            "checkpoint": inference.path,
            "step": inference.meta.get("step"),
            "images_seen": inference.meta.get("images_seen"),
            "dataset": str(dataset),
            "split": split,
            "bad_records": int(it.bad_records),
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return metrics


# ----------------------------------------------------------------------------------------------------
# A classifier checkpoint on a downstream dataset: top-k accuracy.
# ----------------------------------------------------------------------------------------------------

# --split names of a downstream dataset -> tagjax.downstream's split. "test" is the dataset's labelled
# evaluation split (ImageNet's and Places365's "validation", a folder's test/, val/ or validation/).
CLASSIFICATION_SPLITS = {"train": "train", "test": "test", "validation": "test", "val": "test"}
DEFAULT_MAX_BAD_FRACTION = (
    0.001  # unreadable images tolerated before the pass fails (as tagjax embed)
)


def is_hashtag_dataset(dataset: str) -> bool:
    """``synthetic`` or a directory built by ``tagjax build`` (it has dataset.json); anything else is a
    downstream dataset name or a class-per-folder directory (tagjax.downstream)."""

    return dataset == "synthetic" or (Path(dataset).expanduser() / records.MANIFEST).is_file()


@dataclasses.dataclass(frozen=True)
class ClassMapping:
    """Which checkpoint output each dataset label is: ``to_checkpoint[label]``."""

    to_checkpoint: np.ndarray  # int32 [dataset classes]
    num_outputs: int  # classes of the checkpoint's head
    by: str  # "wnid" (metadata class_wnids) or "name" (class_names)

    @property
    def identity(self) -> bool:
        """Same classes in the same order: dataset labels are output ids as they are."""
        n = len(self.to_checkpoint)
        return n == self.num_outputs and bool((self.to_checkpoint == np.arange(n)).all())

    @property
    def outputs_outside_dataset(self) -> int:
        """Outputs no dataset class maps to (they still compete in the top-k)."""
        return self.num_outputs - len(np.unique(self.to_checkpoint))


def map_classes(
    meta: Mapping[str, Any],
    num_outputs: int,
    dataset_classes: Sequence[str],
    dataset: str = "the dataset",
) -> ClassMapping:
    """Places each of a dataset's classes (by name) on a classifier checkpoint's outputs, from its metadata.

    Tried in order: ``class_wnids`` (ImageNet-1k imports; TFDS's imagenet2012 names its classes by wnid,
    labels.txt order, and so do ImageNet class folders), then ``class_names`` (a fine-tuned checkpoint stores
    its training dataset's class names; an import with ``--classes`` its file's). The first list that names
    every dataset class wins; matching is by name, never by position, so a dataset listing the same classes
    in another order is remapped rather than silently misread. Raises UserError naming the classes no list
    places (or a name the checkpoint lists twice, which would be ambiguous).
    """
    lists = [
        (by, meta[key])
        for by, key in (("wnid", "class_wnids"), ("name", "class_names"))
        if meta.get(key)
    ]
    if not lists:
        what = (
            "a hashtag model (its head predicts a hashtag vocabulary)"
            if meta.get("vocab_fingerprint")
            else f"a {num_outputs}-way head without class names in its metadata"
        )
        raise UserError(
            f"the checkpoint is {what}, so its outputs cannot be matched to the classes of {dataset}: evaluate a "
            "classifier (an ImageNet-1k checkpoint from `tagjax import-weights`, or one from `tagjax transfer "
            "--mode finetune`), or a hashtag model on a dataset built by `tagjax build`."
        )
    best = None
    for by, names in lists:
        names = [str(n) for n in names]
        if len(names) != num_outputs:
            raise UserError(
                f"the checkpoint's metadata lists {len(names)} classes (by {by}) for its {num_outputs}-way head, "
                "so it is damaged: import or fine-tune it again."
            )
        position: dict[str, int] = {}
        repeated = set()
        for i, name in enumerate(names):
            if name in position:
                repeated.add(name)
            position.setdefault(name, i)
        missing = [c for c in dataset_classes if c not in position or c in repeated]
        if not missing:
            return ClassMapping(
                np.asarray([position[c] for c in dataset_classes], np.int32), int(num_outputs), by
            )
        if best is None or len(missing) < len(best[1]):
            best = (by, missing, repeated)
    by, missing, repeated = best
    twice = " or named twice" if any(c in repeated for c in missing) else ""
    raise UserError(
        f"{len(missing):,} of the {len(dataset_classes):,} classes of {dataset} are not among the checkpoint's "
        f"{num_outputs:,} outputs{twice} (matched by {by}), e.g. {', '.join(repr(c) for c in missing[:3])}: "
        "evaluate a checkpoint whose head predicts this dataset's classes."
    )


def evaluate_classification(
    checkpoint_path: str | Path,
    dataset: str,
    split: str = "test",
    *,
    data_dir: str | None = None,
    max_images: int = 0,
    batch_size: int = 256,
    image_size: int | None = None,
    resize: int | None = None,
    ks: Sequence[int] = metrics_lib.DEFAULT_KS,
    num_threads: int | None = None,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Top-k accuracy of a classifier checkpoint on one split of a downstream dataset (module docstring).

    ``dataset``: a tagjax.downstream name (imagenet2012, emoji_subgroups, ...) or a class-per-folder
    directory; ``split``: "test" (or "validation" / "val": the dataset's labelled evaluation split) or
    "train". Preprocessing is the checkpoint's (``image_size`` / ``resize`` override it, as in
    ``tagjax predict``). Unreadable images are skipped and counted; past ``max_bad_fraction`` it fails.
    Returns fractions ``top1``, ``top5``, ... plus where they came from and how classes were matched.
    """

    if split not in CLASSIFICATION_SPLITS:
        raise UserError(
            f"split {split!r}: a downstream dataset has 'train' and 'test' (also called 'validation')."
        )
    ds = downstream.open_split(dataset, CLASSIFICATION_SPLITS[split], data_dir)
    inference = Inference(checkpoint_path, head=True, image_size=image_size, resize=resize)
    if "fc" not in inference.variables["params"]:
        raise UserError(
            f"{inference.path} has no classifier head (imported with --no-head?); evaluate a checkpoint "
            "with one, or measure its features with `tagjax transfer --mode linear`."
        )
    mapping = map_classes(inference.meta, inference.num_classes, ds.class_names, ds.name)
    num = len(ds.source) if max_images <= 0 else min(max_images, len(ds.source))
    tf = inference.transform
    kmax = min(max(ks), inference.num_classes)

    def load(i: int):
        ex = ds.source[i]
        return ex["image"], int(ex["label"])

    counter = BadImageCounter(max_bad_fraction, f"{ds.name} ({split})")
    hits, labels = [], []
    start = time.perf_counter()
    bar = progress_bar(total=num, unit="img", desc=f"evaluate {ds.name} {split}", enabled=progress)
    for batch in image_batches(
        load,
        range(num),
        preprocess=lambda image, out: augment.eval_image(image, out, tf),
        size=tf.size,
        batch_size=batch_size,
        num_threads=num_threads or DEFAULT_THREADS,
    ):
        # Every row goes through top-k (one compiled shape per batch size); unreadable rows are dropped after.
        y = np.asarray([e if ok else 0 for e, ok in zip(batch.extras, batch.valid)], np.int64)
        target = np.where(batch.valid, mapping.to_checkpoint[y], -1).astype(np.int32)
        _, h = metrics_lib.topk_predictions(inference.logits(batch.images), target[:, None], kmax)
        hits.append(h[batch.valid])
        labels.append(y[batch.valid])
        counter.add(batch)
        bar.update(len(batch.indices))
    bar.close()
    counter.check(final=True)
    hits = np.concatenate(hits) if hits else np.zeros((0, kmax), bool)
    metrics: dict[str, Any] = {
        f"top{k}": float(hits[:, : min(k, kmax)].any(axis=1).mean()) if len(hits) else float("nan")
        for k in ks
    }
    metrics.update(
        {
            "task": "classification",
            "num_images": len(hits),
            "bad_images": int(counter.bad),
            "num_classes": int(ds.num_classes),
            "checkpoint_outputs": int(mapping.num_outputs),
            "class_mapping": {
                "by": mapping.by,
                "same_order": mapping.identity,
                "outputs_outside_dataset": mapping.outputs_outside_dataset,
            },
            "checkpoint": inference.path,
            "step": inference.meta.get("step"),
            "images_seen": inference.meta.get("images_seen"),
            "dataset": ds.name,
            "split": split,
            "image_size": int(tf.size),
            "resize": int(tf.resize),
            "mean": [float(x) for x in inference.mean],
            "std": [float(x) for x in inference.std],
            "seconds": round(time.perf_counter() - start, 2),
        }
    )
    return metrics


def format_classification_table(
    metrics: Mapping[str, Any], ks: Sequence[int] = metrics_lib.DEFAULT_KS, title: str = ""
) -> str:
    """A readable table of :func:`evaluate_classification` output (percentages)."""
    m = metrics["class_mapping"]
    mapping = f"matched by {m['by']}, {'same order' if m['same_order'] else 'remapped'}"
    if m["outputs_outside_dataset"]:
        mapping += (
            f", {m['outputs_outside_dataset']:,} of the checkpoint's outputs not in the dataset"
        )
    lines = [title] if title else []
    lines.append(
        f"{metrics['num_images']:,} images, {metrics['num_classes']:,} classes ({mapping}); "
        f"resize {metrics['resize']}, center crop {metrics['image_size']}"
    )
    header = f"{'':10s}" + "".join(f"{f'top-{k}':>7s}" for k in ks)
    lines += [
        header,
        "-" * len(header),
        f"{'accuracy':10s}"
        + "".join(f"{metrics_lib.format_percent(metrics[f'top{k}']):>7s}" for k in ks),
    ]
    lines.append(
        f"(percent of images whose class is among the checkpoint's k highest outputs; "
        f"{metrics['bad_images']:,} unreadable images skipped)"
    )
    return "\n".join(lines)

"""``tagjax predict`` (top hashtags for images) and ``tagjax embed`` (pooled trunk features to .npy).

Both run a checkpoint (trained, or imported with ``tagjax import-weights``) through :class:`Inference`:
the model the checkpoint's own config describes, its variables replicated on every local device, the
batch split across them, and the same evaluation preprocessing as training's held-out evaluation
(``tagjax.augment.eval_image``: shorter side to ``data.eval_resize``, center crop ``data.eval_image_size``,
ImageNet mean/std on the device). Evaluation (tagjax.evaluate) and transfer (tagjax.transfer) use the
same class, so every number tagjax reports comes from one forward path.

::

    tagjax predict --checkpoint WORKDIR photo.jpg clipart.svg --top-k 5
    tagjax embed --checkpoint WORKDIR --input DIR_OR_DATASET --output /tmp/emb   # emb.npy + emb.index.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tagjax.bad_records import too_many_bad
from tagjax.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = (
    64  # images per forward pass across all local devices (rounded up to a multiple)
)
DEFAULT_THREADS = 4  # image decoding threads (OpenCV and libjpeg-turbo release the GIL)


# ----------------------------------------------------------------------------------------------------
# A checkpoint ready for forward passes.
# ----------------------------------------------------------------------------------------------------


class Inference:
    """A checkpoint's model, replicated over the local devices, applied to uint8 image batches.

    ``head=False`` reads only the trunk (``checkpoint.load_backbone``: the hashtag head is never read),
    for feature extraction with a 17k-way head that is not needed. ``image_size`` / ``resize`` override
    the checkpoint's evaluation resolution (``data.eval_image_size`` / ``data.eval_resize``); ``dtype``
    its compute dtype (``model.dtype``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        head: bool = True,
        image_size: int | None = None,
        resize: int | None = None,
        dtype: str | None = None,
    ):
        import jax
        import ml_collections

        from tagjax import augment, checkpoint, models

        loader = checkpoint.load_for_inference if head else checkpoint.load_backbone
        variables, meta = loader(path)
        self.path = str(checkpoint.resolve(path))
        self.meta = meta
        config = ml_collections.ConfigDict(meta.get("config") or {})
        if "model" not in config:
            raise UserError(
                f"{self.path} has no model config in its metadata; it was not written by tagjax."
            )
        self.config = config
        if dtype:
            config.model.dtype = dtype
        data = config.get("data", ml_collections.ConfigDict())
        self.mean = tuple(data.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(data.get("std", (0.229, 0.224, 0.225)))
        cfg_size, cfg_resize = (
            int(data.get("eval_image_size", 224)),
            int(data.get("eval_resize", 256)),
        )
        size = int(image_size or cfg_size)
        # A new crop size keeps the checkpoint's resize-to-crop ratio (256/224 for the released models).
        resize = int(resize or round(size * cfg_resize / cfg_size))
        if size > resize:
            raise UserError(
                f"image size {size} exceeds the resize {resize}: the center crop must fit inside."
            )
        self.transform = augment.EvalTransform(resize=resize, size=size)
        self.num_classes = int(meta.get("num_classes") or 0)
        if head and "fc" in variables["params"]:
            self.num_classes = int(np.shape(variables["params"]["fc"]["kernel"])[-1])
        self.model = models.create(config.model, max(self.num_classes, 1))
        self.feature_dim = models.get_spec(config.model.name).feature_dim

        self.devices = jax.local_devices()
        self.mesh = jax.make_mesh(
            (len(self.devices),),
            ("batch",),
            devices=self.devices,
            axis_types=(jax.sharding.AxisType.Auto,),
        )
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec("batch")
        )
        self.variables = jax.device_put(variables, replicated)
        self._fns: dict[str, Callable] = {}

    @property
    def image_size(self) -> int:
        return self.transform.size

    def _fn(self, what: str):
        if what not in self._fns:
            import jax
            import jax.numpy as jnp

            mean = jnp.asarray(self.mean, jnp.float32) * 255.0
            inv_std = 1.0 / (jnp.asarray(self.std, jnp.float32) * 255.0)
            dtype = self.model.dtype
            model = self.model

            def forward(variables, images):
                x = ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)
                if what == "features":
                    return model.apply(variables, x, train=False, method=model.features)
                logits = model.apply(variables, x, train=False)
                return logits

            self._fns[what] = jax.jit(forward, out_shardings=None)
        return self._fns[what]

    def _run(self, what: str, images: np.ndarray) -> np.ndarray:
        import jax

        images = np.asarray(images, np.uint8)
        n = len(images)
        if n == 0:
            width = self.feature_dim if what == "features" else self.num_classes
            return np.zeros((0, width), np.float32)
        # Pad to a multiple of the device count so the batch splits evenly (padding rows are dropped).
        d = len(self.devices)
        padded = math.ceil(n / d) * d
        if padded != n:
            images = np.concatenate([images, np.zeros((padded - n, *images.shape[1:]), np.uint8)])
        x = jax.device_put(images, self.batch_sharding)
        return np.array(jax.device_get(self._fn(what)(self.variables, x)), np.float32)[
            :n
        ]  # a writable copy

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> pooled trunk features float32 [B, feature_dim]."""
        return self._run("features", images)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> head logits float32 [B, num_classes] (needs ``head=True``)."""
        if "fc" not in self.variables["params"]:
            raise UserError(f"{self.path} was loaded without its head; load it with head=True.")
        return self._run("logits", images)

    def preprocess(self, image) -> np.ndarray:
        """One image (JPEG bytes or an RGB uint8 array) -> the evaluation crop, uint8 [S, S, 3]."""
        from tagjax import augment

        out = np.empty((self.image_size, self.image_size, 3), np.uint8)
        augment.eval_image(image, out, self.transform)
        return out


# ----------------------------------------------------------------------------------------------------
# Batches of images from any random-access source, with bad images skipped and counted.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageBatch:
    indices: np.ndarray  # int64 [B]: positions in the source
    images: np.ndarray  # uint8 [B, S, S, 3]; zeros where not valid
    valid: np.ndarray  # bool [B]: False where the image could not be read
    extras: list  # per row, what ``load`` returned besides the image (labels, ids, ...)
    errors: list  # per row: "" or why the image was skipped


def image_batches(
    load: Callable[[int], tuple[Any, Any]],
    indices: Sequence[int] | range,
    *,
    preprocess: Callable[[Any, np.ndarray], None],
    size: int,
    batch_size: int,
    num_threads: int = DEFAULT_THREADS,
) -> Iterator[ImageBatch]:
    """Batches of preprocessed images for ``indices`` in order (grain, threads decode in parallel).

    ``load(i) -> (image, extra)``; ``preprocess(image, out)`` writes the crop into ``out``. Exceptions
    from either (an unreadable file, a corrupt record) mark the row invalid instead of ending the pass.
    """
    import grain

    indices = list(indices)

    def one(i: int):
        out = np.zeros((size, size, 3), np.uint8)
        try:
            image, extra = load(int(i))
            preprocess(image, out)
            return int(i), out, True, extra, ""
        except (
            Exception
        ) as e:  # a bad image must not end a pass over millions; counted by the caller
            return int(i), out, False, None, f"{type(e).__name__}: {e}"

    def collate(rows):
        return ImageBatch(
            indices=np.asarray([r[0] for r in rows], np.int64),
            images=np.stack([r[1] for r in rows]),
            valid=np.asarray([r[2] for r in rows], bool),
            extras=[r[3] for r in rows],
            errors=[r[4] for r in rows],
        )

    if not indices:
        return
    ds = grain.MapDataset.source(indices).map(one).batch(batch_size, batch_fn=collate)
    options = grain.ReadOptions(
        num_threads=max(1, num_threads), prefetch_buffer_size=2 * batch_size
    )
    yield from ds.to_iter_dataset(options)


class BadImageCounter:
    """Counts skipped images and fails loudly past ``max_fraction`` (after ``min_reads`` reads): the
    rule of tagjax.bad_records, with the first errors kept for the message."""

    def __init__(self, max_fraction: float, what: str, min_reads: int = 1000):
        self.max_fraction, self.what, self.min_reads = float(max_fraction), what, int(min_reads)
        self.read = 0
        self.bad = 0
        self.examples: list[str] = []

    def add(self, batch: ImageBatch, final: bool = False) -> None:
        self.read += len(batch.valid)
        self.bad += int((~batch.valid).sum())
        for i, err in zip(batch.indices, batch.errors):
            if err and len(self.examples) < 5:
                self.examples.append(f"#{i}: {err}")
        self.check(final)

    def check(self, final: bool = False) -> None:
        if too_many_bad(self.bad, self.read, self.max_fraction, self.min_reads, final):
            raise UserError(
                f"{self.bad} of {self.read} images of {self.what} could not be read (more than "
                f"{self.max_fraction:.2%}; e.g. {self.examples[0]}); repair the data or raise the threshold."
            )


# ----------------------------------------------------------------------------------------------------
# Vocabulary of a checkpoint.
# ----------------------------------------------------------------------------------------------------


class ClassNames:
    """The label side of a fine-tuned checkpoint (its ``class_names`` metadata) with the vocabulary's
    interface, so ``tagjax predict`` names downstream classes the way it names hashtags."""

    def __init__(self, names: Sequence[str]):
        self.names = [str(n) for n in names]

    @property
    def num_labels(self) -> int:
        return len(self.names)

    def name_of(self, i: int) -> str:
        return self.names[i]

    def synsets_of(self, i: int) -> list[str]:
        return []

    def aliases_of(self, i: int) -> dict[str, int]:
        return {}


def find_vocabulary(
    meta: dict, vocab_path: str | None = None, checkpoint_path: str | Path | None = None
):
    """The vocabulary a checkpoint's head predicts: ``vocab_path``, else ``vocab.json`` beside the
    checkpoint's workdir, else the training dataset's (``config.data.dataset``); checked against the
    fingerprint stored in the checkpoint. A fine-tuned checkpoint (``class_names`` in its metadata, no
    vocabulary) gets its class names instead."""
    from tagjax import vocab as vocab_lib

    candidates = []
    if vocab_path:
        candidates.append(Path(vocab_path).expanduser())
    else:
        if checkpoint_path is not None:
            step_dir = Path(checkpoint_path)
            for parent in (step_dir, step_dir.parent, step_dir.parent.parent):
                candidates.append(parent / "vocab.json")
        if meta.get("vocab_path"):
            candidates.append(Path(meta["vocab_path"]).expanduser())
        dataset = ((meta.get("config") or {}).get("data") or {}).get("dataset")
        if dataset:
            candidates.append(Path(dataset).expanduser() / "vocab.json")
    path = next((p for p in candidates if p.is_file()), None)
    if path is None and not vocab_path and meta.get("class_names"):
        return ClassNames(
            meta["class_names"]
        )  # a fine-tuned checkpoint predicts its downstream classes
    if path is None:
        raise UserError(
            "cannot find the vocabulary of this checkpoint (looked beside it and in its training dataset); "
            "pass --vocab PATH/vocab.json."
        )
    vocab = vocab_lib.Vocabulary.load(path)
    expected = meta.get("vocab_fingerprint")
    if expected and vocab.fingerprint() != expected:
        raise UserError(
            f"{path} is not the vocabulary this checkpoint was trained on (fingerprint {vocab.fingerprint()} "
            f"vs {expected}); pass the right one with --vocab."
        )
    return vocab


# ----------------------------------------------------------------------------------------------------
# tagjax predict
# ----------------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def predict_hashtags(
    inference: Inference, vocab, images: Sequence, top_k: int = 5, num_aliases: int = 5
) -> list[list[dict]]:
    """Top-``k`` canonical hashtags per image: ``{"hashtag", "probability", "synsets", "aliases", "id"}``.

    Probabilities follow the model's loss (softmax over the vocabulary for the paper's loss, so they
    sum to 1 over all hashtags; per-label sigmoid for the baseline).
    """
    if vocab.num_labels != inference.num_classes:
        raise UserError(
            f"the vocabulary has {vocab.num_labels} hashtags but the checkpoint's head predicts "
            f"{inference.num_classes}; pass the vocabulary it was trained with (--vocab)."
        )
    size = inference.image_size
    crops = (
        np.stack([inference.preprocess(im) for im in images])
        if images
        else np.zeros((0, size, size, 3), np.uint8)
    )
    return top_hashtags(inference, vocab, crops, top_k, num_aliases)


def top_hashtags(
    inference: Inference, vocab, crops: np.ndarray, top_k: int = 5, num_aliases: int = 5
) -> list[list[dict]]:
    """:func:`predict_hashtags` for images already preprocessed (uint8 [B, S, S, 3] evaluation crops)."""
    if vocab.num_labels != inference.num_classes:
        raise UserError(
            f"the vocabulary has {vocab.num_labels} hashtags but the checkpoint's head predicts "
            f"{inference.num_classes}; pass the vocabulary it was trained with (--vocab)."
        )
    logits = inference.logits(crops)
    loss = str(inference.config.get("loss", "softmax"))
    probs = (
        1.0 / (1.0 + np.exp(-logits)) if loss == "sigmoid" else softmax(logits.astype(np.float64))
    )
    out = []
    k = min(top_k, vocab.num_labels)
    for row in probs:
        top = np.lexsort((np.arange(len(row)), -row))[:k]  # ties -> lower id, as in tagjax.evaluate
        entries = []
        for i in top:
            aliases = sorted(vocab.aliases_of(int(i)).items(), key=lambda kv: (-kv[1], kv[0]))
            entries.append(
                {
                    "id": int(i),
                    "hashtag": vocab.name_of(int(i)),
                    "probability": float(row[i]),
                    "synsets": list(vocab.synsets_of(int(i))),
                    "aliases": [a for a, _ in aliases[:num_aliases]],
                }
            )
        out.append(entries)
    return out


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, GIF, WebP, SVG, ...)"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a training workdir, its checkpoints/ folder, or one "
        "checkpoint directory (trained or imported)",
    )
    parser.add_argument(
        "--vocab",
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


def run_predict(args) -> int:
    if args.top_k < 1:
        raise UserError("--top-k must be at least 1.")
    inference = Inference(args.checkpoint, head=True, image_size=args.image_size)
    vocab = find_vocabulary(inference.meta, args.vocab, inference.path)
    from tagjax import augment

    loaded, failed = [], {}
    for path in args.images:
        try:
            loaded.append((path, inference.preprocess(_read_user_image(path))))
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


def _read_user_image(path: str):
    from tagjax import augment, downstream

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path} is not a file")
    try:
        return downstream.read_image_file(p)
    except downstream.BadImage as e:
        raise augment.BadImage(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# tagjax embed
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EmbedInput:
    """Something to embed: ``len`` items, ``load(i) -> (image, index entry dict)``."""

    description: str
    length: int
    load: Callable[[int], tuple[Any, dict]]


def records_input(dataset_dir: str | Path, split: str) -> EmbedInput:
    """A split of a built tagjax dataset; index entries carry the post id and its label ids."""
    import grain

    from tagjax import records

    root = Path(dataset_dir).expanduser()
    manifest = records.load_manifest(root)
    if split not in manifest.splits:
        raise UserError(
            f"{root} has no split {split!r} (it has {', '.join(sorted(manifest.splits))})."
        )
    source = grain.sources.ArrayRecordDataSource(
        [str(p) for p in manifest.shard_paths(root, split)]
    )

    def load(i: int):
        rec = records.decode(source[i])
        return rec.image, {"id": rec.post_id, "labels": list(rec.labels)}

    return EmbedInput(f"{root} ({split})", len(source), load)


def folder_input(folder: str | Path) -> EmbedInput:
    """Every image file under ``folder`` (recursively, sorted); index entries carry the relative path."""
    from tagjax import downstream

    root = Path(folder).expanduser()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in downstream.IMAGE_EXTENSIONS
    )
    if not files:
        raise UserError(f"{root} holds no images ({', '.join(downstream.IMAGE_EXTENSIONS)}).")

    def load(i: int):
        return downstream.read_image_file(files[i]), {"id": str(files[i].relative_to(root))}

    return EmbedInput(str(root), len(files), load)


def downstream_input(name: str, split: str, data_dir: str | None) -> EmbedInput:
    """A downstream dataset split (tagjax.downstream names); index entries carry the class label."""
    from tagjax import downstream

    ds = downstream.open_split(name, split, data_dir)

    def load(i: int):
        ex = ds.source[i]
        entry = {"id": f"{name}:{split}:{i}", "label": int(ex["label"])}
        if ex.get("group"):
            entry["group"] = ex["group"]
        return ex["image"], entry

    return EmbedInput(f"{name} ({split})", len(ds.source), load)


def resolve_input(spec: str, split: str | None, data_dir: str | None) -> EmbedInput:
    """A built dataset directory (has dataset.json), an image folder, or a downstream dataset name."""
    from tagjax import records

    path = Path(spec).expanduser()
    if path.is_dir() and (path / records.MANIFEST).is_file():
        return records_input(path, split or "train")
    if path.is_dir():
        return folder_input(path)
    return downstream_input(spec, split or "test", data_dir)


def embed(
    inference: Inference,
    source: EmbedInput,
    output: str | Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    l2_normalize: bool = False,
    dtype: str = "float32",
    max_bad_fraction: float = 0.001,
    num_threads: int = DEFAULT_THREADS,
    progress: bool = True,
) -> dict:
    """Writes ``<output>.npy`` [N, D] and ``<output>.index.jsonl`` (row -> id, labels) for ``source``.

    Resumable: rows are written into a memory-mapped ``.npy`` and the number done is recorded in
    ``<output>.partial.json`` after each batch, so a rerun continues where an interrupted one stopped.
    Rows of unreadable images are zeros and marked ``"valid": false`` in the index.
    """
    from tqdm import tqdm

    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    npy, index_path, partial = (
        Path(f"{output}{ext}") for ext in (".npy", ".index.jsonl", ".partial.json")
    )
    n, d = source.length, inference.feature_dim
    ident = {
        "checkpoint": inference.path,
        "input": source.description,
        "rows": n,
        "dim": d,
        "image_size": inference.image_size,
        "l2_normalize": l2_normalize,
        "dtype": dtype,
    }
    start = 0
    if partial.is_file() and npy.is_file():
        state = json.loads(partial.read_text())
        if state.get("identity") == ident:
            start = int(state["done"])
            log.info("resuming embedding at row %d of %d", start, n)
    if start == 0 or not npy.is_file():
        start = 0
        array = np.lib.format.open_memmap(npy, mode="w+", dtype=np.dtype(dtype), shape=(n, d))
        index_path.write_text("")
    else:
        array = np.load(npy, mmap_mode="r+")
        # Index lines of a batch written after the last recorded one are dropped and written again.
        kept = [
            line
            for line in index_path.read_text().splitlines()
            if line and json.loads(line)["row"] < start
        ]
        index_path.write_text("".join(line + "\n" for line in kept))
    counter = BadImageCounter(max_bad_fraction, source.description)
    t0 = time.perf_counter()
    bar = tqdm(total=n, initial=start, unit="img", desc="embed", disable=not progress)
    with index_path.open("a") as index_file:
        for batch in image_batches(
            lambda i: source.load(i),
            range(start, n),
            preprocess=_preprocess_into(inference),
            size=inference.image_size,
            batch_size=batch_size,
            num_threads=num_threads,
        ):
            feats = inference.features(batch.images)
            if l2_normalize:
                feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            feats[~batch.valid] = 0.0
            array[batch.indices[0] : batch.indices[-1] + 1] = feats.astype(array.dtype)
            for i, ok, extra, err in zip(batch.indices, batch.valid, batch.extras, batch.errors):
                entry = {"row": int(i), **(extra or {}), "valid": bool(ok)}
                if not ok:
                    entry["error"] = err
                index_file.write(json.dumps(entry) + "\n")
            array.flush()
            index_file.flush()
            partial.write_text(json.dumps({"identity": ident, "done": int(batch.indices[-1]) + 1}))
            counter.add(batch, final=int(batch.indices[-1]) + 1 == n)
            bar.update(len(batch.indices))
    bar.close()
    del array
    partial.unlink(missing_ok=True)
    summary = {
        "rows": n,
        "dim": d,
        "bad_images": counter.bad,
        "seconds": round(time.perf_counter() - t0, 2),
        "embeddings": str(npy),
        "index": str(index_path),
    }
    return summary


def _preprocess_into(inference: Inference):
    from tagjax import augment

    def preprocess(image, out):
        augment.eval_image(image, out, inference.transform)

    return preprocess


def read_index(path: str | Path) -> list[dict]:
    """The rows of an ``.index.jsonl`` written by :func:`embed`, in row order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["row"])
    return rows


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, help="a training workdir, checkpoints/ folder or checkpoint"
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
        "--data-dir", default=None, help="TFDS data directory for downstream datasets"
    )
    parser.add_argument(
        "--output", required=True, help="output prefix: writes PREFIX.npy and PREFIX.index.jsonl"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per forward pass"
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
        "--threads", type=int, default=DEFAULT_THREADS, help="image decoding threads"
    )


def run_embed(args) -> int:
    if args.batch_size < 1:
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
        batch_size=args.batch_size,
        l2_normalize=args.l2_normalize,
        dtype=args.dtype,
        max_bad_fraction=max_bad,
        num_threads=args.threads,
    )
    print(
        f"embedded {summary['rows']:,} images ({summary['dim']}-d, {summary['bad_images']} unreadable) in "
        f"{summary['seconds']:.1f} s -> {summary['embeddings']}, {summary['index']}"
    )
    return 0

"""A checkpoint ready for forward passes, and the image batches fed to it.

:class:`Inference` runs a checkpoint (trained, or imported with ``tagjax import-weights``): the model the
checkpoint's own config describes, its variables replicated on every local device, the batch split across
them, and the same evaluation preprocessing as training's held-out evaluation
(``tagjax.augment.eval_image``: shorter side to ``data.eval_resize``, center crop ``data.eval_image_size``,
ImageNet mean/std on the device). Prediction (tagjax.predict), embedding (:func:`embed`), evaluation
(tagjax.evaluate), decontamination (tagjax.decontaminate) and transfer (tagjax.transfer) all use it, so
every number tagjax reports comes from one forward path.

:func:`image_batches` reads images from any random-access source with threads, skipping and counting
unreadable ones (:class:`BadImageCounter` fails loudly past a threshold).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tagjax import augment, checkpoint, downstream, models, records
from tagjax.bad_records import too_many_bad
from tagjax.errors import UserError
from tagjax.progress import progress_bar

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = (
    64  # images per forward pass across all local devices (rounded up to a multiple)
)


DEFAULT_THREADS = 4  # image decoding threads (OpenCV and libjpeg-turbo release the GIL)


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

        out = np.empty((self.image_size, self.image_size, 3), np.uint8)
        self.preprocess_into(image, out)
        return out

    def preprocess_into(self, image, out: np.ndarray) -> None:
        """:meth:`preprocess` written into ``out`` (the ``preprocess`` of :func:`image_batches`)."""
        augment.eval_image(image, out, self.transform)


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

    def __init__(
        self,
        max_fraction: float,
        what: str,
        min_reads: int = 1000,
        fix: str = "repair the data or raise the threshold",
    ):
        self.max_fraction, self.what, self.min_reads = float(max_fraction), what, int(min_reads)
        self.fix = fix
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
                f"{self.max_fraction:.2%}; e.g. {self.examples[0]}); {self.fix}."
            )


@dataclasses.dataclass
class EmbedInput:
    """Something to embed: ``len`` items, ``load(i) -> (image, index entry dict)``."""

    description: str
    length: int
    load: Callable[[int], tuple[Any, dict]]
    # The index entry of item i without reading its image (None: unknown until loaded); a row whose
    # image cannot be read still names its file.
    entry: Callable[[int], dict] | None = None


def records_input(dataset_dir: str | Path, split: str) -> EmbedInput:
    """A split of a built tagjax dataset; index entries carry the post id and its label ids."""

    root = Path(dataset_dir).expanduser()
    manifest = records.load_manifest(root)
    if split not in manifest.splits:
        raise UserError(
            f"{root} has no split {split!r} (it has {', '.join(sorted(manifest.splits))})."
        )
    # Read in order, so one shard is open at a time (plus the next, for the threads reading across a
    # boundary): a split of any size costs a few shards' chunk indexes (records.BoundedShardReader).
    source = records.BoundedShardReader(manifest.shard_paths(root, split), max_open=2)

    def load(i: int):
        rec = records.decode(source[i])
        return rec.image, {"id": rec.post_id, "labels": list(rec.labels)}

    return EmbedInput(f"{root} ({split})", len(source), load)


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in sorted order (UserError when none)."""

    root = Path(folder).expanduser()
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in downstream.IMAGE_EXTENSIONS
    )
    if not files:
        raise UserError(f"{root} holds no images ({', '.join(downstream.IMAGE_EXTENSIONS)}).")
    return files


def folder_input(folder: str | Path) -> EmbedInput:
    """Every image file under ``folder`` (recursively, sorted); index entries carry the relative path."""

    root = Path(folder).expanduser()
    files = image_files(root)

    def entry(i: int) -> dict:
        return {"id": str(files[i].relative_to(root))}

    def load(i: int):
        return downstream.read_image_file(files[i]), entry(i)

    return EmbedInput(str(root), len(files), load, entry)


def downstream_input(name: str, split: str, data_dir: str | None) -> EmbedInput:
    """A downstream dataset split (tagjax.downstream names); index entries carry the class label."""

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
    max_bad_fraction: float = 0.01,
    num_threads: int = DEFAULT_THREADS,
    progress: bool | None = None,
    threshold_name: str = "max_bad_fraction",
) -> dict:
    """Writes ``<output>.npy`` [N, D] and ``<output>.index.jsonl`` (row -> id, labels) for ``source``.

    Resumable: rows are written into a memory-mapped ``.npy`` and the number done is recorded in
    ``<output>.partial.json`` after each batch, so a rerun continues where an interrupted one stopped.
    Rows of unreadable images are zeros and marked ``"valid": false`` in the index. A long run stops
    (UserError naming ``threshold_name``) once more than ``max_bad_fraction`` of at least 1,000 images
    could not be read, which catches a wrong input early; a shorter input is embedded whole, however
    many are bad, unless none is readable, and the summary counts them (``bad_images``).
    """

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
    counter = BadImageCounter(
        max_bad_fraction, source.description, fix=f"repair the data or raise {threshold_name}"
    )
    t0 = time.perf_counter()
    bar = progress_bar(total=n, initial=start, unit="img", desc="embed", enabled=progress)
    with index_path.open("a") as index_file:
        for batch in image_batches(
            lambda i: source.load(i),
            range(start, n),
            preprocess=inference.preprocess_into,
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
                if extra is None and source.entry is not None:
                    extra = source.entry(int(i))
                entry = {"row": int(i), **(extra or {}), "valid": bool(ok)}
                if not ok:
                    entry["error"] = err
                index_file.write(json.dumps(entry) + "\n")
            array.flush()
            index_file.flush()
            partial.write_text(json.dumps({"identity": ident, "done": int(batch.indices[-1]) + 1}))
            counter.add(batch)
            bar.update(len(batch.indices))
    bar.close()
    if n and counter.read == n - start and counter.bad == counter.read:
        raise UserError(
            f"none of the {n:,} images of {source.description} could be read "
            f"(e.g. {counter.examples[0]}); is it the right input?"
        )
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


def read_index(path: str | Path) -> list[dict]:
    """The rows of an ``.index.jsonl`` written by :func:`embed`, in row order."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["row"])
    return rows

"""Top hashtags for images: the vocabulary a checkpoint predicts (:func:`find_vocabulary`) and its top-k
canonical hashtags with probabilities, synsets and common spellings (:func:`predict_hashtags`). The forward
pass is tagjax.inference's; ``tagjax predict`` (tagjax.commands.predict) prints the result::

    tagjax predict --checkpoint WORKDIR photo.jpg clipart.svg --top-k 5
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from tagjax import augment, downstream
from tagjax import vocab as vocab_lib
from tagjax.errors import UserError
from tagjax.inference import DEFAULT_BATCH_SIZE, DEFAULT_THREADS, Inference, image_batches

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
# Top hashtags.
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


def predict_files(
    inference: Inference,
    vocab,
    paths: Sequence[str],
    *,
    top_k: int = 5,
    num_aliases: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_threads: int = DEFAULT_THREADS,
) -> Iterator[tuple[str, list[dict] | None, str]]:
    """:func:`top_hashtags` of image files, in the order of ``paths``: ``(path, hashtags, "")``, or
    ``(path, None, why)`` for a file that cannot be read.

    The files are read as ``tagjax embed`` reads them (:func:`tagjax.inference.image_batches`), so
    memory holds one batch however many files there are, and every forward pass has ``batch_size``
    images (the last batch padded with zeros; fewer files make one batch of them all), so the model
    compiles once.
    """
    batch_size = min(batch_size, len(paths))
    for batch in image_batches(
        lambda i: (read_user_image(paths[i]), None),
        range(len(paths)),
        preprocess=inference.preprocess_into,
        size=inference.image_size,
        batch_size=batch_size,
        num_threads=num_threads,
    ):
        crops = batch.images
        if len(crops) < batch_size:
            pad = np.zeros((batch_size - len(crops), *crops.shape[1:]), np.uint8)
            crops = np.concatenate([crops, pad])
        hashtags = top_hashtags(inference, vocab, crops, top_k, num_aliases)
        for i, ok, error, tags in zip(batch.indices, batch.valid, batch.errors, hashtags):
            yield paths[i], (tags if ok else None), error


def read_user_image(path: str):

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path} is not a file")
    try:
        return downstream.read_image_file(p)
    except downstream.BadImage as e:
        raise augment.BadImage(str(e)) from None

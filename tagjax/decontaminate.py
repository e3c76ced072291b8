"""Decontamination in feature space (the paper's method): training images too close to an evaluation image.

:func:`find_near_duplicates` compares trunk embeddings (tagjax.inference.embed) of evaluation images with
those of the pretraining images and returns the post ids of training images whose cosine similarity to an
evaluation image reaches a threshold; :func:`write_exclude_list` writes them as a list ``tagjax build
--optout-posts`` drops (read back with tagjax.posts.read_id_list). ``tagjax decontaminate``
(tagjax.commands.decontaminate) runs both ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tagjax import posts


@dataclasses.dataclass
class NearDuplicates:
    """Training images whose embedding lies within ``threshold`` cosine similarity of an evaluation image."""

    train_ids: list[str]  # post ids to exclude, most similar first
    pairs: list[dict]  # {"train_id", "eval_index", "eval_name", "similarity"} for inspection
    threshold: float
    num_train: int
    num_eval: int
    nearest: (
        np.ndarray
    )  # [num_eval]: each evaluation image's highest similarity (to choose a threshold)


def nearest_neighbours(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    *,
    chunk: int = 4096,
    center: np.ndarray | None = None,
):
    """Cosine top-``k`` neighbours of each query among ``keys`` -> (similarities [Q, k], indices [Q, k]).

    ``center`` (e.g. the mean key) is subtracted from both sides first, then rows are L2-normalized; keys
    are scanned ``chunk`` rows at a time (a memory-mapped .npy works), so memory stays at Q x chunk
    similarities whatever the number of training images.
    """

    shift = None if center is None else np.asarray(center, np.float32)

    def normalize(x):
        x = np.asarray(x, np.float32)
        if shift is not None:
            x = x - shift
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    q = jnp.asarray(normalize(queries))
    k = min(k, len(keys))
    best_s = jnp.full((len(queries), k), -jnp.inf)
    best_i = jnp.zeros((len(queries), k), jnp.int32)

    @jax.jit
    def merge(best_s, best_i, block, offset):
        sims = q @ block.T
        ids = offset + jnp.arange(block.shape[0], dtype=jnp.int32)
        all_s = jnp.concatenate([best_s, sims], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, sims.shape)], axis=1)
        s, pos = jax.lax.top_k(all_s, k)
        return s, jnp.take_along_axis(all_i, pos, axis=1)

    for start in range(0, len(keys), chunk):
        block = normalize(keys[start : start + chunk])
        if (
            len(block) < chunk and len(keys) > chunk
        ):  # keep one compiled shape: pad with zero vectors
            block = np.pad(block, ((0, chunk - len(block)), (0, 0)))
        best_s, best_i = merge(best_s, best_i, jnp.asarray(block), jnp.int32(start))
    s, i = np.asarray(best_s), np.asarray(best_i)
    i = np.where(i < len(keys), i, -1)
    return s, i


def mean_embedding(embeddings: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Mean row of a (possibly memory-mapped) embedding matrix, read ``chunk`` rows at a time."""
    total = np.zeros(embeddings.shape[1], np.float64)
    for start in range(0, len(embeddings), chunk):
        total += np.asarray(embeddings[start : start + chunk], np.float64).sum(axis=0)
    return (total / max(len(embeddings), 1)).astype(np.float32)


def find_near_duplicates(
    eval_embeddings: np.ndarray,
    train_embeddings: np.ndarray,
    train_ids: Sequence[str],
    *,
    threshold: float,
    k: int = 5,
    eval_names: Sequence[str] | None = None,
    center: bool = True,
) -> NearDuplicates:
    """Training images among the ``k`` nearest neighbours of some evaluation image with cosine similarity
    >= ``threshold``. The paper removed such images (after inspecting them) before pretraining.

    ``center``: measure similarity between features minus the mean training feature. Pooled ReLU features
    are all non-negative, so raw cosine similarities of unrelated images crowd near 1; centring spreads them
    and makes one threshold meaningful across models.
    """
    if len(train_ids) != len(train_embeddings):
        raise ValueError(f"{len(train_ids)} ids for {len(train_embeddings)} training embeddings")
    shift = mean_embedding(train_embeddings) if center else None
    sims, idx = nearest_neighbours(eval_embeddings, train_embeddings, k, center=shift)
    best: dict[int, tuple[float, int]] = {}
    for q in range(sims.shape[0]):
        for s, t in zip(sims[q], idx[q]):
            if t >= 0 and s >= threshold and (t not in best or s > best[t][0]):
                best[int(t)] = (float(s), q)
    order = sorted(best, key=lambda t: -best[t][0])
    pairs = [
        {
            "train_id": str(train_ids[t]),
            "eval_index": best[t][1],
            "eval_name": str(eval_names[best[t][1]]) if eval_names is not None else str(best[t][1]),
            "similarity": round(best[t][0], 6),
        }
        for t in order
    ]
    return NearDuplicates(
        [str(train_ids[t]) for t in order],
        pairs,
        threshold,
        len(train_embeddings),
        len(eval_embeddings),
        sims[:, 0].copy(),
    )


def write_exclude_list(result: NearDuplicates, path: str | Path) -> Path:
    """Writes the ids ``tagjax build --optout-posts`` reads (an id list: one post id per line after a
    ``# `` comment; an id the plain line cannot carry exactly, such as one with a line break, spaces
    at either end or that looks like a comment, is JSON-quoted, see tagjax.posts.id_list_line) and, beside
    it, ``<path>.pairs.jsonl`` with every (train, eval, similarity) pair for inspection."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# tagjax decontamination: {len(result.train_ids)} of {result.num_train} training images within "
        f"cosine similarity {result.threshold} of one of {result.num_eval} evaluation images\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    ids = "".join(posts.id_list_line(i) for i in result.train_ids)
    tmp.write_text(header + ids, encoding="utf-8")
    os.replace(tmp, path)
    pairs = path.with_name(path.name + ".pairs.jsonl")
    pairs.write_text("".join(json.dumps(p) + "\n" for p in result.pairs))
    return path

"""Hashtag losses computed from padded label ids, never from a dense [B, num_classes] target.

An image carries a *set* of k canonical hashtags, given as ``labels`` int32 [B, max_labels] padded with -1
(tagjax.input_pipeline). A dense multi-hot target would cost B x num_classes floats per step (8,064 x 17k =
137M) just to be multiplied by the logits; gathering the k logits instead costs B x max_labels.

* ``softmax_cross_entropy``: the paper's loss. The target distribution puts 1/k on each of the k labels, so
  ``loss_i = logsumexp(z_i) - (1/k) * sum_{j in labels_i} z_ij``.
* ``sigmoid_cross_entropy``: the per-hashtag binary logistic baseline the paper found worse:
  ``loss_i = sum_c softplus(z_ic) - sum_{j in labels_i} z_ij`` (binary cross-entropy with target 1 on the
  labels, 0 elsewhere, summed over classes).

Labels are a set: a repeated id counts once (both losses mask repeats), so the losses equal their dense
definitions over the multi-hot target whatever the padding and order. Images without any label contribute
zero. Both return per-image losses [B]; :func:`batch_loss` turns them into the training objective: the sum
over images divided by the batch size, a constant, so the mean over equal micro-batches equals the mean over
the whole batch (gradient accumulation is exact).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tagjax.errors import UserError

LOSSES = ("softmax", "sigmoid")


def label_mask(labels: jax.Array) -> jax.Array:
    """bool [B, L]: entries that are a real label (>= 0) and not a repeat of an earlier entry in the row."""
    valid = labels >= 0
    # [B, L, L]: entry j repeats an earlier entry i < j. max_labels is small (4-16), so this is cheap.
    same = labels[:, :, None] == labels[:, None, :]
    earlier = jnp.tril(jnp.ones(same.shape[-2:], dtype=bool), k=-1)  # [j, i] with i < j
    repeat = jnp.any(same & earlier & valid[:, None, :], axis=-1)
    return valid & ~repeat


def _label_logits(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(float32 logits of each label entry [B, L], its mask [B, L]); padding gathers column 0 and is masked."""
    mask = label_mask(labels)
    picked = jnp.take_along_axis(logits, jnp.where(mask, labels, 0), axis=-1)
    return picked.astype(jnp.float32), mask


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-image cross-entropy against the distribution with 1/k on each of the image's k labels. [B] float32."""
    logits = logits.astype(jnp.float32)
    picked, mask = _label_logits(logits, labels)
    k = jnp.sum(mask, axis=-1)
    target_term = jnp.sum(jnp.where(mask, picked, 0.0), axis=-1) / jnp.maximum(k, 1)
    loss = jax.nn.logsumexp(logits, axis=-1) - target_term
    return jnp.where(k > 0, loss, 0.0)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-image sum over classes of binary cross-entropy against the multi-hot target. [B] float32."""
    logits = logits.astype(jnp.float32)
    picked, mask = _label_logits(logits, labels)
    # BCE(z, y) = softplus(z) - y * z: the softplus part covers every class, the y part only the labels.
    loss = jnp.sum(jax.nn.softplus(logits), axis=-1) - jnp.sum(
        jnp.where(mask, picked, 0.0), axis=-1
    )
    return jnp.where(jnp.any(mask, axis=-1), loss, 0.0)


def per_image_loss(name: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The loss ``config.loss`` names, per image [B]."""
    if name == "softmax":
        return softmax_cross_entropy(logits, labels)
    if name == "sigmoid":
        return sigmoid_cross_entropy(logits, labels)
    raise UserError(f"config.loss={name!r}: choose one of {', '.join(LOSSES)}.")


def batch_loss(name: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Scalar training objective: per-image losses summed and divided by the batch size."""
    return jnp.sum(per_image_loss(name, logits, labels)) / labels.shape[0]


def precision_at_k(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per image [B]: the fraction of the k highest-scoring classes that are among the image's labels."""
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)  # [B, k]
    mask = label_mask(labels)
    hit = jnp.any((top[:, :, None] == labels[:, None, :]) & mask[:, None, :], axis=-1)  # [B, k]
    return jnp.mean(hit.astype(jnp.float32), axis=-1)

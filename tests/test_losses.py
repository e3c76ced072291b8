"""tagjax.losses: the sparse (padded-id) losses equal their dense definitions over the multi-hot target."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagjax import losses
from tagjax.errors import UserError


def _random_case(seed, batch=6, num_classes=11, max_labels=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (batch, num_classes)).astype(np.float32)
    labels = np.full((batch, max_labels), -1, np.int32)
    for i in range(batch):
        k = rng.integers(1, max_labels + 1)
        labels[i, :k] = rng.integers(
            0, num_classes, k
        )  # repeats allowed: a label set counts each once
        rng.shuffle(labels[i])  # padding anywhere, not only at the end
    return logits, labels


def _multi_hot(labels, num_classes):
    y = np.zeros((labels.shape[0], num_classes), np.float64)
    for i, row in enumerate(labels):
        for j in row:
            if j >= 0:
                y[i, j] = 1.0
    return y


def _dense_softmax(logits, labels):
    y = _multi_hot(labels, logits.shape[1])
    target = y / y.sum(axis=1, keepdims=True)
    z = logits.astype(np.float64)
    log_p = (
        z
        - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        - z.max(1, keepdims=True)
    )
    return -(target * log_p).sum(axis=1)


def _dense_sigmoid(logits, labels):
    y = _multi_hot(labels, logits.shape[1])
    z = logits.astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softmax_matches_dense_one_over_k_target(seed):
    logits, labels = _random_case(seed)
    got = np.asarray(losses.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, _dense_softmax(logits, labels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigmoid_matches_dense_binary_cross_entropy(seed):
    logits, labels = _random_case(seed)
    got = np.asarray(losses.sigmoid_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, _dense_sigmoid(logits, labels), rtol=1e-5, atol=1e-4)


def test_gradient_matches_dense_softmax_gradient():
    """d loss / d logits = softmax(z) - target: what the optimizer actually sees."""
    logits, labels = _random_case(3)
    grad = jax.grad(lambda z: jnp.sum(losses.softmax_cross_entropy(z, jnp.asarray(labels))))(
        jnp.asarray(logits)
    )
    y = _multi_hot(labels, logits.shape[1])
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(grad), p - y / y.sum(1, keepdims=True), atol=1e-6)


def test_label_order_padding_and_repeats_do_not_matter():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9)).astype(np.float32))
    a = jnp.asarray([[2, 5, 7, -1, -1, -1]], jnp.int32)
    b = jnp.asarray([[-1, 7, 5, -1, 2, 5]], jnp.int32)
    for fn in (losses.softmax_cross_entropy, losses.sigmoid_cross_entropy):
        np.testing.assert_allclose(fn(logits, a), fn(logits, b), rtol=1e-6)


def test_image_without_labels_contributes_zero_and_batch_loss_divides_by_batch():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32))
    labels = jnp.asarray([[1, -1], [-1, -1], [0, 3], [5, -1]], jnp.int32)
    per_image = losses.softmax_cross_entropy(logits, labels)
    assert float(per_image[1]) == 0.0
    np.testing.assert_allclose(
        losses.batch_loss("softmax", logits, labels), per_image.sum() / 4, rtol=1e-6
    )


def test_single_label_softmax_is_ordinary_cross_entropy():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32))
    y = jnp.asarray([0, 3, 6, 2, 2], jnp.int32)
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(logits, y[:, None]), expected, rtol=1e-5
    )


def test_precision_at_k():
    logits = jnp.asarray([[0.0, 5.0, 4.0, 3.0], [9.0, 0.0, 1.0, 2.0]])
    labels = jnp.asarray([[2, 1, -1], [1, -1, -1]], jnp.int32)
    np.testing.assert_allclose(losses.precision_at_k(logits, labels, 1), [1.0, 0.0])
    np.testing.assert_allclose(losses.precision_at_k(logits, labels, 2), [1.0, 0.0])
    np.testing.assert_allclose(losses.precision_at_k(logits, labels, 4), [0.5, 0.25])


def test_unknown_loss_is_a_user_error():
    with pytest.raises(UserError, match=r"config\.loss"):
        losses.batch_loss("hinge", jnp.zeros((1, 3)), jnp.zeros((1, 1), jnp.int32))

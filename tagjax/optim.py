"""The paper's optimizer and learning-rate schedule, with every length counted in images seen.

SGD with momentum (0.9; Nesterov optional) and L2 weight decay 1e-4 that skips batch-norm parameters and
biases. The rate follows the linear scaling rule: ``peak = base_lr * batch_size / lr_reference_batch``
(0.1 per 256 images), reached by a linear warm-up from ``warmup_start_lr`` (the paper: from 0.1, the rate
of a 256-image batch [R]), then either halved ``num_halvings`` times at equally spaced points of the rest
of the schedule (the paper: 20 halvings, 13 for its ImageNet-only runs [R]) or decayed along a half cosine.

How long to train is :func:`paper_schedule_images`: the paper's heuristic, a linear interpolation in
images processed between 120 epochs of 1.2M images and 2 epochs of 3.5B images [R].

Why the learning rate is applied outside the optax chain: the trainer's NaN guard may *skip* an update,
which leaves the optimizer state (and any step counter inside it) unchanged while the train state's step
(and so the images seen) advances. Computing ``lr = schedule(state.step)`` in the train step keeps the
rate a function of images seen whatever was skipped. :func:`make_optimizer` offers the usual all-in-one
optax transformation for code that does not need that (fine-tuning, notebooks).

The update is PyTorch's SGD (the recipe's reference implementation): ``g += wd * p`` (decayed leaves only),
``v = momentum * v + g``, ``p -= lr * v`` (Nesterov: ``p -= lr * (g + momentum * v)``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tagjax.errors import UserError

SCHEDULES = ("step_halving", "cosine")


def paper_schedule_images(
    dataset_images: int, short: tuple[int, float], long: tuple[int, float]
) -> int:
    """Images to process for a dataset of ``dataset_images``: the paper's length heuristic [R].

    ``short`` and ``long`` are the two extremes as (dataset images, passes over it); the paper's are
    (1.2M, 120) and (3.5B, 2) (configs/_paper.py). They fix the run length in images processed
    (``size x passes``): 144M at 1.2M images, 7B at 3.5B. Between them the length is a straight line in
    the dataset size; beyond them it is extended along the same line. With the paper's extremes, IG-940M (940M images) gets
    1,983,605,808 images (~2.1 passes), IG-3.5B 7,000,000,000 (2 passes) and 1.2M images 144,000,000
    (120 passes). The result is rounded to whole
    images; the trainer counts steps as ``total_images // batch_size``.
    """
    n = int(dataset_images)
    if n <= 0:
        raise UserError(f"dataset_images={n}: the dataset must hold at least one image.")
    (n0, e0), (n1, e1) = short, long
    y0, y1 = n0 * e0, n1 * e1
    return round(y0 + (n - n0) * (y1 - y0) / (n1 - n0))


def peak_learning_rate(optim_config, batch_size: int) -> float:
    """The rate after warm-up: ``base_lr`` per ``lr_reference_batch`` images, scaled linearly."""
    return float(optim_config.base_lr) * batch_size / float(optim_config.lr_reference_batch)


def decay_mask(params):
    """True for leaves that take weight decay: conv and dense kernels (ndim > 1).

    Batch-norm scales/offsets and biases are the 1-D leaves of the torchvision-layout tree, so the rank
    alone tells them apart and the rule needs no name list that could miss a renamed module.
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


class Schedule:
    """``lr(step)`` for a given global batch size; also the host-side boundaries (for logs and tests).

    Lengths come from the config in images and are turned into optimizer steps here. ``step`` counts
    optimizer updates, so images seen = ``step * batch_size``. A boundary at ``x`` images takes effect at the
    first step whose images seen reach it: ``ceil(x / batch_size)``. Boundaries are integers computed on the
    host in float64, so the rate changes at exactly those steps (no float32 rounding at 10^9 images).
    """

    def __init__(self, optim_config, batch_size: int, total_images: int):
        if batch_size <= 0:
            raise UserError(
                f"config.train.batch_size={batch_size}: use a positive number of images."
            )
        self.kind = str(optim_config.schedule)
        if self.kind not in SCHEDULES:
            raise UserError(
                f"config.optim.schedule={self.kind!r}: choose one of {', '.join(SCHEDULES)}."
            )
        warmup_images = int(optim_config.warmup_images)
        if warmup_images < 0 or warmup_images > total_images:
            raise UserError(
                f"config.optim.warmup_images={warmup_images} must lie between 0 and "
                f"config.train.total_images={total_images}."
            )
        self.batch_size = int(batch_size)
        self.peak = peak_learning_rate(optim_config, batch_size)
        # The rate at step 0 of the warm-up, in absolute terms (the paper: 0.1, the rate for 256 images);
        # never above the peak, so a batch below lr_reference_batch simply starts at its peak.
        start = float(optim_config.get("warmup_start_lr", 0.0))
        if start < 0:
            raise UserError(f"config.optim.warmup_start_lr={start}: use a rate of 0 or more.")
        self.warmup_start = min(start, self.peak)
        self.warmup_steps = math.ceil(warmup_images / batch_size)
        self.total_steps = max(int(total_images) // batch_size, 1)
        self.num_halvings = int(optim_config.num_halvings)
        if self.num_halvings < 0:
            raise UserError(f"config.optim.num_halvings={self.num_halvings}: use 0 or more.")
        # num_halvings equally spaced points split the post-warm-up images into num_halvings + 1 parts.
        span = int(total_images) - warmup_images
        self.halving_steps = tuple(
            math.ceil((warmup_images + i * span / (self.num_halvings + 1)) / batch_size)
            for i in range(1, self.num_halvings + 1)
        )

    def __call__(self, step) -> jax.Array:
        """float32 learning rate for ``step`` (an int or an int array; jit-friendly)."""
        step = jnp.asarray(step)
        s = step.astype(jnp.float32)
        warm = jnp.float32(max(self.warmup_steps, 1))
        warm_lr = self.warmup_start + (self.peak - self.warmup_start) * s / warm
        if self.kind == "step_halving":
            if self.halving_steps:
                n = jnp.sum(step[..., None] >= jnp.asarray(self.halving_steps, step.dtype), axis=-1)
            else:
                n = jnp.zeros_like(step)
            main = self.peak * jnp.power(jnp.float32(0.5), n.astype(jnp.float32))
        else:
            length = jnp.float32(max(self.total_steps - self.warmup_steps, 1))
            t = jnp.clip((s - self.warmup_steps) / length, 0.0, 1.0)
            main = 0.5 * self.peak * (1.0 + jnp.cos(jnp.pi * t))
        return jnp.where(step < self.warmup_steps, warm_lr, main).astype(jnp.float32)

    def values_at(self, steps) -> np.ndarray:
        """Host numpy values, e.g. to print or plot the schedule before a run."""
        return np.asarray(self(np.asarray(steps, np.int32)))


def make_schedule(optim_config, batch_size: int, total_images: int) -> Schedule:
    return Schedule(optim_config, batch_size, total_images)


def make_gradient_transform(optim_config) -> optax.GradientTransformation:
    """Everything of SGD but the learning rate: clipping (optional), masked weight decay, momentum."""
    momentum = float(optim_config.momentum)
    weight_decay = float(optim_config.weight_decay)
    clip = float(optim_config.get("grad_clip_norm", 0.0))
    if not 0.0 <= momentum < 1.0:
        raise UserError(f"config.optim.momentum={momentum}: use a value in [0, 1).")
    if weight_decay < 0:
        raise UserError(f"config.optim.weight_decay={weight_decay}: use 0 or more.")
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    if momentum > 0:
        parts.append(optax.trace(decay=momentum, nesterov=bool(optim_config.nesterov)))
    return optax.chain(*parts) if parts else optax.identity()


def apply_updates(params, updates, lr):
    """``params - lr * updates`` leaf by leaf, in each parameter's dtype."""
    return jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)


def make_optimizer(
    optim_config, batch_size: int, total_images: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """One optax transformation (rate from its own step count) plus the schedule, for simple loops."""
    schedule = make_schedule(optim_config, batch_size, total_images)
    tx = optax.chain(
        make_gradient_transform(optim_config),
        optax.scale_by_schedule(lambda count: -schedule(count)),
    )
    return tx, schedule

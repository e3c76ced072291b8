"""Pretraining on hashtags: the pure train/eval steps and the loop around them (``tagjax train``).

Pieces, each usable on its own from a notebook::

    mesh = sharding.create_mesh(config.mesh)
    model = models.create(config.model, num_classes)
    state = create_train_state(config, model, mesh, num_classes)          # born sharded
    step_fn = jit_train_step(config, model, mesh, state)                   # one jitted, donating step
    state, metrics = step_fn(state, sharding.global_batch(batch, mesh))

and :func:`train_and_evaluate` (config, workdir), which adds the data (tagjax.input_pipeline), the
held-out hashtag evaluation and checkpoints (tagjax.checkpoint) and runs them through tagjax.loop, the loop
fine-tuning shares (NaN guard, ``metrics.jsonl`` + TensorBoard, progress, MFU, profiling). The command
``tagjax train`` is tagjax.commands.train.

**The state** (:class:`TrainState`) is a plain pytree: ``step`` (int32, optimizer updates done), ``params``,
``batch_stats``, ``opt_state`` (momentum; see tagjax.optim for why the learning rate lives outside it) and
``rng``. Images seen are ``step * config.train.batch_size``, computed on the host as a Python int (JAX runs
without 64-bit integers, and IG-3.5B passes 2^31 images).

**One step** takes the *global* batch of ``config.train.batch_size`` images (uint8, normalized on the
device). With ``grad_accum_steps = A`` it is split into A micro-batches that are run one after the other
(``lax.scan``) and their gradients averaged. The split is by whole batch-norm groups, taken in a strided
order (micro-batch j = groups j, j+A, j+2A, ...) so that every device keeps working on images it already
holds, and each micro-batch's batch-norm running statistics are computed from the same starting point
and averaged. Together these make A micro-batches give exactly the update of one step on the whole batch
whenever batch-norm statistics are per group (``config.model.bn_group_size > 0``). With global statistics
(``bn_group_size = 0``) and A > 1, the statistics are those of each micro-batch.

**Batch norm and devices.** Group statistics are taken over fixed positions of the global batch, whatever
the number of devices, so a run's numbers do not change with the device count; the per-device batch
should be a multiple of the group size so that no group spans two devices (a warning says when not).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tagjax import checkpoint, input_pipeline, loop, losses, models, optim, sharding
from tagjax import config as config_lib
from tagjax import metrics as metrics_lib
from tagjax.errors import UserError
from tagjax.metrics_writer import MetricWriter, as_path, read_metrics

log = logging.getLogger(__name__)

TRAIN_BATCH_KEYS = ("image", "labels")
EVAL_BATCH_KEYS = ("image", "labels", "mask")

# ----------------------------------------------------------------------------------------------------
# Train state
# ----------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree (checkpointed as is by tagjax.checkpoint)."""

    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any
    batch_stats: Any
    opt_state: Any
    # Typed PRNG key, carried and checkpointed with the run. The ResNeXt family draws no randomness in
    # its step (augmentation happens in the input pipeline), so the step passes it through unchanged; a
    # stochastic layer would take fold_in(rng, step), which stays reproducible across restarts.
    rng: jax.Array

    def images_seen(self, batch_size: int) -> int:
        """Host int: ``step * batch_size`` (a device->host transfer of one scalar)."""
        return int(jax.device_get(self.step)) * int(batch_size)


def state_init_fn(model, tx, image_shape: tuple[int, int, int]):
    """``rng -> TrainState``: the model's initial variables and ``tx``'s state for them, at step 0.

    One function for every state tagjax trains (pretraining, fine-tuning), so ``jax.eval_shape`` of it is
    also the checkpoint restore target.
    """

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        variables = model.init(params_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return init


def image_shape(config) -> tuple[int, int, int]:
    """The training crop, [H, W, C]: what the state is initialized for."""
    size = int(config.data.image_size)
    return (size, size, 3)


def state_shardings(config, mesh: Mesh, abstract_state: TrainState) -> TrainState:
    """A NamedSharding for every leaf: step and rng replicated, the rest by the FSDP rule."""
    min_size = int(config.mesh.get("fsdp_min_size", 2**18))
    shardings = sharding.tree_shardings(abstract_state, mesh, min_size)
    return shardings.replace(step=sharding.replicated(mesh), rng=sharding.replicated(mesh))


def abstract_train_state(config, model, mesh: Mesh, num_classes: int | None = None) -> TrainState:
    """The state as ``jax.ShapeDtypeStruct``s carrying this mesh's shardings (the checkpoint restore target).

    ``num_classes`` is accepted for symmetry with :func:`create_train_state`; the model already has it.
    """
    del num_classes
    tx = optim.make_gradient_transform(config.optim)
    init = state_init_fn(model, tx, image_shape(config))
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = state_shardings(config, mesh, abstract)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )


def create_train_state(config, model, mesh: Mesh, num_classes: int | None = None) -> TrainState:
    """A fresh state, born sharded: ``eval_shape`` gives the shapes, a jitted init writes each device's shard.

    No full copy of the parameters ever exists on one device, which is what lets FSDP hold models larger
    than one device's memory. Values depend on ``config.seed`` only, not on the mesh.
    """
    del num_classes
    tx = optim.make_gradient_transform(config.optim)
    init = state_init_fn(model, tx, image_shape(config))
    rng = jax.random.key(int(config.seed))
    abstract = jax.eval_shape(init, rng)
    shardings = state_shardings(config, mesh, abstract)
    return jax.jit(init, out_shardings=shardings)(rng)


# ----------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------


def normalize_images(images: jax.Array, data_config, dtype) -> jax.Array:
    """uint8 [B, H, W, 3] -> (x/255 - mean) / std in ``dtype``: on the device, so the host ships bytes."""
    mean = jnp.asarray(data_config.mean, jnp.float32) * 255.0
    inv_std = 1.0 / (jnp.asarray(data_config.std, jnp.float32) * 255.0)
    return ((images.astype(jnp.float32) - mean) * inv_std).astype(dtype)


def _compute_dtype(config):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(
        str(config.model.dtype), jnp.float32
    )


def microbatch_group(config) -> int:
    """The unit in which a batch is split into micro-batches: one batch-norm group (1 for global BN)."""
    return max(int(config.model.bn_group_size), 1)


def split_microbatches(x: jax.Array, num_micro: int, group: int) -> jax.Array:
    """[B, ...] -> [A, B/A, ...] by whole groups of ``group`` consecutive images, strided.

    Micro-batch j holds groups j, j+A, j+2A, ... Reshaping [B] as [B/(A*g), A, g] keeps each device's
    contiguous shard of the batch in place (when the per-device batch is a multiple of A*g), so the split
    moves no data between devices, and every batch-norm group stays whole.
    """
    b = x.shape[0]
    x = x.reshape((b // (num_micro * group), num_micro, group, *x.shape[1:]))
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape((num_micro, b // num_micro, *x.shape[3:]))


def validate_batch_layout(config, mesh: Mesh) -> None:
    """Refuses batch sizes the step cannot split; warns when batch-norm groups straddle devices."""
    batch = int(config.train.batch_size)
    accum = int(config.train.grad_accum_steps)
    group = microbatch_group(config)
    n_dev = mesh.devices.size
    if accum < 1:
        raise UserError(
            f"config.train.grad_accum_steps={accum}: use 1 or more micro-batches per step."
        )
    if batch % n_dev:
        raise UserError(
            f"config.train.batch_size={batch} is not divisible by the {n_dev} devices: use a multiple of {n_dev}."
        )
    if batch % (accum * group):
        raise UserError(
            f"config.train.batch_size={batch} does not split into {accum} micro-batches of whole batch-norm "
            f"groups of {group}: make it a multiple of grad_accum_steps x bn_group_size = {accum * group}."
        )
    if (batch // (accum * group)) % n_dev:
        log.warning(
            "batch %d / (grad_accum_steps %d x bn_group_size %d) is not a multiple of the %d devices: "
            "micro-batches or batch-norm groups span devices, which costs cross-device traffic every step.",
            batch,
            accum,
            group,
            n_dev,
        )


def make_train_step(
    config,
    model,
    tx: optax.GradientTransformation,
    schedule: optim.Schedule,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """The pure step ``(state, batch) -> (state, metrics)``; jit it with :func:`jit_train_step`.

    ``batch``: {"image": uint8 [B, H, W, 3], "labels": int32 [B, max_labels] padded with -1}, the global
    batch. ``metrics`` are float32 scalars: loss, precision@1 (on the training batch), grad_norm (before
    clipping), param_norm, lr (the rate this update used) and nonfinite (1.0 when loss or gradients were
    NaN/Inf; the update was then not applied).
    """
    accum = int(config.train.grad_accum_steps)
    group = microbatch_group(config)
    loss_name = str(config.loss)
    dtype = _compute_dtype(config)
    losses.per_image_loss(
        loss_name, jnp.zeros((1, 2)), jnp.zeros((1, 1), jnp.int32)
    )  # validates the name
    micro_sharding = None if mesh is None else NamedSharding(mesh, P(None, sharding.BATCH_AXES))

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            normalize_images(images, config.data, dtype),
            train=True,
            mutable=["batch_stats"],
        )
        loss = losses.batch_loss(loss_name, logits, labels)
        p1 = jnp.mean(losses.precision_at_k(logits, labels, 1))
        return loss, (updates["batch_stats"], p1)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(state: TrainState, batch):
        if accum == 1:
            (loss, (stats, p1)), grads = grad_fn(
                state.params, state.batch_stats, batch["image"], batch["labels"]
            )
            return loss, p1, stats, grads
        images = split_microbatches(batch["image"], accum, group)
        labels = split_microbatches(batch["labels"], accum, group)
        if micro_sharding is not None:
            images = jax.lax.with_sharding_constraint(images, micro_sharding)
            labels = jax.lax.with_sharding_constraint(labels, micro_sharding)

        def body(carry, micro):
            (loss, (stats, p1)), grads = grad_fn(state.params, state.batch_stats, *micro)
            # Every micro-batch starts from the same running statistics; their updates are averaged below.
            return jax.tree.map(jnp.add, carry, (loss, p1, stats, grads)), None

        zeros = jax.tree.map(
            jnp.zeros_like, (jnp.float32(0), jnp.float32(0), state.batch_stats, state.params)
        )
        total, _ = jax.lax.scan(body, zeros, (images, labels))
        return jax.tree.map(lambda t: t / accum, total)

    def train_step(state: TrainState, batch):
        loss, p1, new_stats, grads = gradients(state, batch)
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule(state.step)
        new_params = optim.apply_updates(state.params, updates, lr)
        new_state, nonfinite = apply_if_finite(
            state, loss, grad_norm, new_params, new_stats, new_opt_state
        )
        metrics = {
            "loss": loss,
            "precision@1": p1,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_state.params),
            "lr": lr,
            "nonfinite": nonfinite,
        }
        return new_state, jax.tree.map(lambda m: m.astype(jnp.float32), metrics)

    return train_step


def apply_if_finite(
    state: TrainState, loss, grad_norm, params, batch_stats, opt_state
) -> tuple[TrainState, jax.Array]:
    """The state after one update, ``(new state, nonfinite)``: the update (``params``, ``batch_stats``,
    ``opt_state``) is applied only when ``loss``, ``grad_norm`` and the updated arrays are all finite;
    ``step`` advances either way, and a skipped update leaves every other field as it was.

    The device half of the NaN/Inf rule of every tagjax step (pretraining and fine-tuning): whatever the
    ``nan_policy``, a NaN never enters the state, so the host (``loop.NonfiniteGuard``) can decide a step
    later, without a sync, whether to stop or skip. ``nonfinite`` is 1.0 for a dropped update, else 0.0.
    """
    # The new state itself is checked too: a NaN/Inf learning rate, an overflow in the update or in
    # the batch-norm statistics leave loss and gradients finite. A global norm is finite exactly when
    # every element is (barring overflow of the squares, itself a sign of divergence); these are small
    # reductions next to the step.
    finite = (
        jnp.isfinite(loss)
        & jnp.isfinite(grad_norm)
        & jnp.isfinite(optax.tree.norm(params))
        & jnp.isfinite(optax.tree.norm(batch_stats))
        & jnp.isfinite(optax.tree.norm(_float_leaves(opt_state)))
    )

    def keep(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
    )
    return new_state, 1.0 - finite.astype(jnp.float32)


def _float_leaves(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]


def jit_train_step(
    config, model, mesh: Mesh, state: TrainState, *, schedule: optim.Schedule | None = None
):
    """``make_train_step`` jitted with the state's shardings in and out, the batch split over the mesh,
    metrics replicated, and the input state donated (its buffers are reused for the new state)."""
    tx = optim.make_gradient_transform(config.optim)
    if schedule is None:
        schedule = optim.make_schedule(
            config.optim, int(config.train.batch_size), int(config.train.total_images)
        )
    step = make_train_step(config, model, tx, schedule, mesh)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(config, model) -> Callable[[TrainState, Mapping[str, jax.Array]], dict]:
    """``(state, batch) -> {"loss_sum", "count", "scores"}`` on held-out batches.

    ``loss_sum`` and ``count`` are sums over real images (``mask`` True and at least one label), so batches
    and the padded last batch add up exactly. ``scores`` [B, num_classes] are the model's probabilities
    (softmax, or sigmoid for the sigmoid loss) for tagjax.evaluate's hashtag metrics (mAP, precision and
    recall@k, head/torso/tail), which rank images per label and so need probabilities, not logits.
    """
    loss_name = str(config.loss)
    dtype = _compute_dtype(config)

    def eval_step(state: TrainState, batch):
        logits = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            normalize_images(batch["image"], config.data, dtype),
            train=False,
        )
        labels = batch["labels"]
        mask = batch["mask"].astype(jnp.float32) * jnp.any(labels >= 0, axis=-1)
        logits = logits.astype(jnp.float32)
        scores = (
            jax.nn.sigmoid(logits) if loss_name == "sigmoid" else jax.nn.softmax(logits, axis=-1)
        )
        return {
            "loss_sum": jnp.sum(losses.per_image_loss(loss_name, logits, labels) * mask),
            "count": jnp.sum(mask),
            "scores": scores,
        }

    return eval_step


def jit_eval_step(config, model, mesh: Mesh, state: TrainState):
    """``make_eval_step`` jitted: state as sharded, batch split over the mesh, scores left split by batch."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    rep = sharding.replicated(mesh)
    return jax.jit(
        make_eval_step(config, model),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
        out_shardings={"loss_sum": rep, "count": rep, "scores": sharding.batch_sharding(mesh)},
    )


def _to_host(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array as one numpy array on every process."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def evaluate(
    eval_step,
    state: TrainState,
    batches: Iterator[Mapping],
    mesh: Mesh,
    num_classes: int,
    *,
    max_images: int = 0,
    label_counts: np.ndarray | None = None,
    accumulator=None,
) -> dict:
    """Held-out metrics over ``batches`` (per-host eval batches with "mask"): the mean loss and the flat
    scalars of ``tagjax.evaluate.hashtag_metrics`` (mAP, precision@k, recall@k, per frequency bucket).

    Stops after ``max_images`` real images (0 = the whole iterator). ``label_counts`` (training images per
    label) defines the head/torso/tail buckets. ``accumulator`` (default: the exact one) collects the
    scores; ``tagjax.metrics.accumulator_from_config`` picks exact or streamed by size.
    """

    acc = accumulator or metrics_lib.MetricsAccumulator(num_classes, max_images=max_images)
    loss_sum = count = 0.0
    for local in batches:
        batch = sharding.global_batch({k: local[k] for k in EVAL_BATCH_KEYS}, mesh)
        out = eval_step(state, batch)
        acc.update(_to_host(out["scores"]), _to_host(batch["labels"]), _to_host(batch["mask"]))
        loss_sum += float(out["loss_sum"])
        count += float(out["count"])
        if acc.full:
            break
    if acc.count == 0:
        return {"num_images": 0}
    metrics = metrics_lib.scalar_summary(acc.result(label_counts=label_counts))
    metrics["loss"] = loss_sum / max(count, 1.0)
    return metrics


# ----------------------------------------------------------------------------------------------------
# The pretraining run (its loop is tagjax.loop's)
# ----------------------------------------------------------------------------------------------------


def setup_runtime(config) -> None:
    """Process-level setup that must precede the first computation: multi-process start and the
    persistent compilation cache (a restart or a second run of the same config skips most compiling)."""
    sharding.maybe_initialize_distributed()
    cache_dir = str(config.train.get("compilation_cache_dir", "") or "")
    if cache_dir:
        path = as_path(cache_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise UserError(
                f"config.train.compilation_cache_dir={cache_dir} cannot be written "
                f"({e.strerror or type(e).__name__}); pass a writable directory, or '' for no cache."
            ) from None
        if not jax.config.jax_compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", str(path))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


@dataclasses.dataclass
class DataSource:
    """What the loop needs from the data side (tagjax.input_pipeline)."""

    num_classes: int
    train_iterator: Any  # yields per-host train batches; get_state()/set_state() for checkpoints
    make_eval_iterator: (
        Callable[[], Iterator[Mapping]] | None
    )  # a fresh pass over the held-out split
    metadata: dict  # stored in checkpoints (vocabulary fingerprint, dataset identity)
    label_counts: np.ndarray | None = None  # training images per label (head/torso/tail buckets)


def open_data(config) -> DataSource:
    """The training iterator and held-out batches from ``config.data`` (a built dataset or synthetic)."""

    source = input_pipeline.open_source(config)
    make_eval = functools.partial(input_pipeline.make_eval_iterator, config, source)
    if config.data.synthetic:
        task = input_pipeline.synthetic_task(config, "train")
        counts = task.label_index.counts(source.num_classes)
    else:
        counts = metrics_lib.label_counts_of(
            source.dataset_dir, source.num_classes, config.data.train_split
        )
        # The held-out split is checked now, not at the first evaluation hours in: a missing split or
        # shard stops the run here (without opening any: no O(records) work at start); an empty split
        # (a small build) means no hashtag evaluation.
        manifest, _ = input_pipeline.split_shards(source.dataset_dir, config.data.eval_split)
        if manifest.num_records(config.data.eval_split) == 0:
            log.warning(
                "the %r split of %s is empty: this run has no hashtag evaluation (more posts or a "
                "larger --heldout-fraction at build time give it one)",
                config.data.eval_split,
                source.dataset_dir,
            )
            make_eval = None
    return DataSource(
        num_classes=source.num_classes,
        train_iterator=input_pipeline.make_train_iterator(config, source),
        make_eval_iterator=make_eval,
        metadata=dict(source.metadata),
        label_counts=counts,
    )


def train_and_evaluate(config, workdir: str | os.PathLike, *, progress: bool | None = None) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its newest checkpoint) and returns the final metrics.

    Writes ``workdir/config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/`` and, with
    ``config.train.profile_steps``, ``profile/``. The loop itself is tagjax.loop's, shared with fine-tuning;
    what is pretraining's own is the data (hashtag-resampled shards), the step and the hashtag evaluation.
    """
    run_start = time.perf_counter()
    loop.validate_config(config)
    # Refuse what no run can use (a run shorter than one batch, an unknown NaN policy, a warm-up longer
    # than the run) before anything is written to the workdir or any data is opened.
    num_steps = loop.Cadence.from_config(config.train).num_steps
    loop.NonfiniteGuard.from_config(config.train)
    batch_size = int(config.train.batch_size)
    schedule = optim.make_schedule(config.optim, batch_size, int(config.train.total_images))
    workdir = as_path(workdir)  # absolute; or gs://... (etils.epath) on Cloud TPU
    setup_runtime(config)
    is_main = jax.process_index() == 0
    if is_main:
        loop.prepare_workdir(workdir)
        (workdir / "config.json").write_text(config_lib.to_json(config) + "\n")
    mesh = sharding.create_mesh(config.mesh)
    validate_batch_layout(config, mesh)

    data = open_data(config)
    model = models.create(config.model, data.num_classes)
    manager = _checkpoint_manager(config, workdir, data)
    state, start_step = loop.restore_or_init(
        manager,
        abstract_train_state(config, model, mesh),
        lambda: create_train_state(config, model, mesh),
        data.train_iterator,
    )
    log.info(
        "model %s, %d classes, %s parameters; mesh data=%d x fsdp=%d on %d %s device(s); %s",
        config.model.name,
        data.num_classes,
        f"{sum(x.size for x in jax.tree.leaves(state.params)):,}",
        mesh.shape["data"],
        mesh.shape["fsdp"],
        mesh.devices.size,
        jax.devices()[0].device_kind,
        f"resuming at step {start_step:,}" if start_step else "starting fresh",
    )
    # Rows an interrupted run logged after the step resumed from (all of them on a fresh start) go.
    writer = MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    if start_step == 0:
        writer.write_text("config", "```\n" + config_lib.to_json(config) + "\n```")
    try:
        spec = loop.Loop(
            config,
            step_fn=jit_train_step(config, model, mesh, state, schedule=schedule),
            batches=data.train_iterator,
            batch_keys=TRAIN_BATCH_KEYS,
            mesh=mesh,
            num_classes=data.num_classes,
            manager=manager,
            writer=writer,
            workdir=workdir,
            data_iterator=data.train_iterator,
            evaluate=_hashtag_evaluation(config, model, mesh, state, data),
            progress=progress,
        )
        result = loop.run(spec, state)
        last_eval = result.eval
        if result.step == num_steps > start_step and spec.evaluate is not None:
            last_eval = loop.evaluate_and_log(spec, result.state, result.step)
    finally:
        loop.close_iterator(data.train_iterator)
        manager.close()
        writer.close()
    if jax.process_count() > 1:
        # Every process leaves the run together: none reaches jax.distributed's exit barrier minutes
        # before another (process 0 alone writes the logs and finalizes checkpoints).
        multihost_utils.sync_global_devices("tagjax_train_end")

    # A rerun of a finished run trains nothing: its final metrics are the ones it logged.
    train_metrics = result.train or _last_logged(workdir, "train", result.step)
    eval_metrics = last_eval or _last_logged(workdir, "eval", result.step)
    summary = {
        "step": result.step,
        "images_seen": result.step * batch_size,
        "preempted": result.preempted,
        "skipped_steps": result.skipped_steps,
        "wall_seconds": time.perf_counter() - run_start,
        **{f"train_{k}": v for k, v in train_metrics.items()},
        **{f"eval_{k}": v for k, v in eval_metrics.items()},
    }
    shown = ("train_loss", "eval_loss", "eval_mAP", "eval_precision@1", "skipped_steps")
    if result.preempted:
        loop.say(
            f"stopped by a preemption at step {result.step:,} of {num_steps:,}; rerun the same "
            f"command to resume from its checkpoint in {workdir}"
        )
        return summary
    loop.say(
        f"done: {result.step:,} steps, {result.step * batch_size:,} images in "
        f"{loop.format_duration(summary['wall_seconds'])}; "
        + ", ".join(f"{k} {loop.format_value(summary[k])}" for k in shown if k in summary)
        + f"; logs in {workdir}"
    )
    return summary


def _last_logged(workdir, split: str, step: int) -> dict:
    """The metrics of the last ``split`` row logged at or before ``step`` ({} if none)."""
    rows = [r for r in read_metrics(workdir, split) if r.get("step", 0) <= step]
    bookkeeping = ("split", "step", "images_seen", "time")
    return {k: v for k, v in rows[-1].items() if k not in bookkeeping} if rows else {}


def _hashtag_evaluation(config, model, mesh: Mesh, state: TrainState, data: DataSource):
    """``state -> metrics`` on the held-out split (None without one): tagjax.loop's evaluation."""
    if data.make_eval_iterator is None:
        return None
    eval_step = jit_eval_step(config, model, mesh, state)

    def evaluate_state(state: TrainState) -> dict:
        batches = data.make_eval_iterator()
        max_images = int(config.train.eval_max_images)
        return evaluate(
            eval_step,
            state,
            batches,
            mesh,
            data.num_classes,
            max_images=max_images,
            label_counts=data.label_counts,
            accumulator=metrics_lib.accumulator_from_config(
                config, data.num_classes, int(getattr(batches, "num_images", 0)), max_images
            ),
        )

    return evaluate_state


def _checkpoint_manager(config, workdir, data: DataSource) -> checkpoint.CheckpointManager:
    """tagjax.checkpoint's manager, storing the data source's identity (vocabulary) with every save."""
    metadata = dict(data.metadata)
    metadata["num_classes"] = data.num_classes
    return checkpoint.CheckpointManager(workdir, config, metadata)

"""Transfer to downstream tasks: the linear probe (feature transfer) and full fine-tuning.

``tagjax transfer --mode linear`` is the paper's feature-transfer evaluation. The trunk is frozen; the
pooled features of every training and test image are computed once (:func:`extract_features`, cached in
``WORKDIR/features/`` in chunks, so an interrupted extraction resumes and a second probe with other settings
costs nothing), then a multinomial logistic regression is fitted in JAX (:func:`fit_logistic_regression`:
full-batch L-BFGS on standardized features). Its L2 strength is chosen from ``linear.l2_sweep`` by top-1 on
a held-out part of the training split (by class, whole variant groups at a time), the classifier is refitted
on the whole training split with that strength, and top-1/top-5 are reported on the test split.

``tagjax transfer --mode finetune`` restores the pretrained trunk exactly (``checkpoint.restore_backbone``),
adds a freshly initialized head for the downstream classes and trains everything with SGD
(configs/transfer_finetune.py: resolution, augmentation, learning rate and schedule in images seen)
in pretraining's loop (tagjax.loop: the same NaN guard, logs, checkpoints and resumption), with its own
step (:func:`make_finetune_step`). Batch ``k`` is a pure function of ``(seed, k)`` (shuffled
epochs, augmentation from hashed uniforms), so a resumed run trains on the batches an uninterrupted one would.

Both write ``WORKDIR/results.json`` and print a one-line summary. Unreadable images are skipped and
counted by the data config's rule (``config.data.max_bad_record_fraction``, tagjax.bad_records). The
command ``tagjax transfer`` is tagjax.commands.transfer.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import optax.tree_utils as otu

from tagjax import (
    augment,
    bad_records,
    checkpoint,
    downstream,
    loop,
    models,
    optim,
    sampling,
    sharding,
    train,
)
from tagjax.errors import UserError
from tagjax.inference import BadImageCounter, Inference, image_batches
from tagjax.metrics import to_json, topk_accuracy
from tagjax.metrics_writer import MetricWriter, as_path
from tagjax.progress import progress_bar

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
_STREAM_FINETUNE = 0x7F1E  # hash stream of fine-tuning augmentation (tagjax.sampling.uniforms)

# What a transfer run that stops on unreadable images tells the user to change.
_BAD_IMAGE_FIX = "repair the images or raise --config.data.max_bad_record_fraction"


def _downstream(config, split: str):

    t = config.transfer
    return downstream.open_split(
        str(t.dataset),
        split,
        str(t.data_dir) or None,
        folder_test_fraction=float(t.folder_test_fraction),
    )


def _write_json(path: Path, payload: dict) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(to_json(payload), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Feature extraction, cached on disk.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Features:
    """Pooled features of the readable examples of one split, in source order."""

    x: np.ndarray  # float32 [N, D]
    y: np.ndarray  # int32 [N]
    groups: np.ndarray  # str [N] ("" where the dataset has no variant groups)
    indices: np.ndarray  # int64 [N]: positions in the source
    bad: int  # unreadable examples skipped
    chunks_computed: int  # chunks computed by this call (0 = everything came from the cache)
    cache_dir: Path


def feature_cache_dir(root: Path, inference, ds) -> tuple[Path, dict]:
    """``root/<dataset>-<split>-<hash>``: the hash covers the checkpoint, the dataset and preprocessing, so a
    cache is never reused for another trunk, split or resolution."""
    identity = {
        "checkpoint": inference.path,
        "step": inference.meta.get("step"),
        "created_at": inference.meta.get("created_at"),
        "dataset": ds.identity(),
        "resize": inference.transform.resize,
        "image_size": inference.transform.size,
        "dtype": str(inference.config.model.dtype),
    }
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in ds.name)[-60:]
    return root / f"{safe}-{ds.split}-{digest}", identity


def extract_features(
    inference,
    ds,
    cache_root: str | Path,
    *,
    batch_size: int = 64,
    chunk: int = 2048,
    num_threads: int = 4,
    max_bad_fraction: float = 0.001,
    progress: bool | None = None,
) -> Features:
    """Pooled trunk features of every example of ``ds`` (a ``downstream.Downstream``), cached on disk.

    The split is cut into chunks of ``chunk`` examples; each chunk is written atomically
    (``chunk-00000.npz``) as soon as it is computed, and chunks already on disk are read instead of
    recomputed. Unreadable images are skipped and counted; past ``max_bad_fraction`` it fails loudly.
    """

    cache_dir, identity = feature_cache_dir(Path(cache_root), inference, ds)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / "meta.json"
    n = len(ds.source)
    meta = {
        "identity": identity,
        "num_examples": n,
        "chunk": int(chunk),
        "feature_dim": inference.feature_dim,
    }
    if meta_path.is_file() and json.loads(meta_path.read_text()) != json.loads(json.dumps(meta)):
        # Same identity hash but another chunking: start over rather than mix layouts.
        for old in cache_dir.glob("chunk-*.npz"):
            old.unlink()
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    num_chunks = math.ceil(n / chunk)
    counter = BadImageCounter(max_bad_fraction, f"{ds.name} ({ds.split})", fix=_BAD_IMAGE_FIX)

    def load(i: int):
        ex = ds.source[i]
        return ex["image"], (int(ex["label"]), str(ex.get("group", "")))

    def preprocess(image, out):

        augment.eval_image(image, out, inference.transform)

    parts, computed = [], 0
    bar = progress_bar(total=n, unit="img", desc=f"features {ds.name}:{ds.split}", enabled=progress)
    for c in range(num_chunks):
        path = cache_dir / f"chunk-{c:05d}.npz"
        lo, hi = c * chunk, min((c + 1) * chunk, n)
        if path.is_file():
            with np.load(path) as f:
                part = {k: f[k] for k in f.files}
            counter.read += hi - lo
            counter.bad += int((~part["valid"]).sum())
            parts.append(part)
            bar.update(hi - lo)
            continue
        x = np.zeros((hi - lo, inference.feature_dim), np.float32)
        y = np.full(hi - lo, -1, np.int32)
        valid = np.zeros(hi - lo, bool)
        groups = np.full(hi - lo, "", dtype=object)
        for batch in image_batches(
            load,
            range(lo, hi),
            preprocess=preprocess,
            size=inference.image_size,
            batch_size=batch_size,
            num_threads=num_threads,
        ):
            rows = batch.indices - lo
            x[rows] = inference.features(batch.images)
            valid[rows] = batch.valid
            for r, extra in zip(rows, batch.extras):
                if extra is not None:
                    y[r], groups[r] = extra
            counter.add(batch)
            bar.update(len(rows))
        part = {
            "x": x,
            "y": y,
            "valid": valid,
            "group": groups.astype(str),
            "index": np.arange(lo, hi),
        }
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **part)
        os.replace(tmp, path)
        parts.append(part)
        computed += 1
    bar.close()
    counter.check(final=True)
    if not parts:
        raise UserError(f"{ds.name} has no examples in its {ds.split} split.")
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keep = cat["valid"]
    return Features(
        cat["x"][keep],
        cat["y"][keep].astype(np.int32),
        cat["group"][keep],
        cat["index"][keep],
        int((~keep).sum()),
        computed,
        cache_dir,
    )


# ----------------------------------------------------------------------------------------------------
# Multinomial logistic regression (full-batch L-BFGS in JAX).
# ----------------------------------------------------------------------------------------------------


def holdout_split(y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int = 0):
    """(fit indices, validation indices): per class, whole variant groups (or single examples) ordered by a
    seeded hash, the first ``round(fraction * n)`` held out; a class with one unit stays entirely in fit."""
    y = np.asarray(y)
    units = np.asarray(groups if groups is not None else np.full(len(y), ""), dtype=str)
    units = np.where(units == "", np.char.add("#", np.arange(len(y)).astype(str)), units)
    val = np.zeros(len(y), bool)
    if fraction <= 0:
        return np.flatnonzero(~val), np.flatnonzero(val)
    for cls in np.unique(y):
        members = np.flatnonzero(y == cls)
        uniq = sorted(
            set(units[members]), key=lambda u: hashlib.sha1(f"{seed}:{u}".encode()).hexdigest()
        )
        n_val = min(len(uniq) - 1, round(fraction * len(uniq)))
        chosen = set(uniq[:n_val])
        val[members] = [u in chosen for u in units[members]]
    return np.flatnonzero(~val), np.flatnonzero(val)


@functools.partial(jax.jit, static_argnames=("max_iterations",))
def _lbfgs_fit(params0, x, y, l2, tolerance, *, max_iterations: int):

    def objective(params):
        logits = x @ params["w"] + params["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def cond(carry):
        _, state, it = carry
        grad = otu.tree_get(state, "grad")
        return (it == 0) | ((it < max_iterations) & (otu.tree_norm(grad) >= tolerance))

    def body(carry):
        params, state, it = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        return optax.apply_updates(params, updates), state, it + 1

    params, state, iterations = jax.lax.while_loop(
        cond, body, (params0, opt.init(params0), jnp.int32(0))
    )
    return params, iterations, objective(params), otu.tree_norm(otu.tree_get(state, "grad"))


@dataclasses.dataclass
class LogisticRegression:
    """A fitted linear classifier on standardized features: ``logits = ((x - mean) / std) @ w + b``."""

    w: np.ndarray  # [D, C]
    b: np.ndarray  # [C]
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    l2: float
    iterations: int
    loss: float

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std) @ self.w + self.b


def fit_logistic_regression(
    x,
    y,
    num_classes: int,
    l2: float,
    *,
    max_iterations: int = 300,
    tolerance: float = 1e-5,
    standardize: bool = True,
    init: LogisticRegression | None = None,
) -> LogisticRegression:
    """Minimizes mean cross-entropy + ``l2``/2 ||w||^2 over (w, b) with L-BFGS (the bias is not penalized).

    The problem is convex, so the result does not depend on the start; ``init`` (a previous fit with the
    same standardization) only makes a sweep faster.
    """

    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32)
    if len(x) == 0:
        raise UserError("no training examples to fit the linear classifier on.")
    if init is not None:
        mean, std = init.mean, init.std
    elif standardize:
        mean = x.mean(axis=0)
        std = np.maximum(x.std(axis=0), 1e-6)  # constant features (dead channels) stay at 0
    else:
        mean, std = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
    xs = (x - mean) / std
    if init is not None:
        params0 = {"w": jnp.asarray(init.w), "b": jnp.asarray(init.b)}
    else:
        params0 = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    params, iterations, loss, _ = _lbfgs_fit(
        params0,
        jnp.asarray(xs),
        jnp.asarray(y),
        jnp.float32(l2),
        jnp.float32(tolerance),
        max_iterations=int(max_iterations),
    )
    return LogisticRegression(
        np.asarray(params["w"]),
        np.asarray(params["b"]),
        mean.astype(np.float32),
        std.astype(np.float32),
        float(l2),
        int(iterations),
        float(loss),
    )


def linear_probe(
    train: Features | tuple,
    test: Features | tuple,
    num_classes: int,
    linear_config,
    *,
    seed: int = 0,
    log_fn=print,
) -> dict:
    """The sweep, the refit and the test numbers (fractions). ``train``/``test`` are :class:`Features` or
    ``(x, y)`` / ``(x, y, groups)`` tuples."""

    def unpack(f):
        if isinstance(f, Features):
            return f.x, f.y, f.groups
        return f[0], f[1], (f[2] if len(f) > 2 else None)

    x, y, groups = unpack(train)
    tx, ty, _ = unpack(test)
    sweep = sorted(
        (float(v) for v in linear_config.l2_sweep), reverse=True
    )  # strongest first: warm starts
    if not sweep:
        raise UserError("config.linear.l2_sweep is empty: give at least one L2 strength.")
    opts = dict(
        max_iterations=int(linear_config.max_iterations),
        tolerance=float(linear_config.tolerance),
        standardize=bool(linear_config.standardize),
    )
    fit_idx, val_idx = holdout_split(y, groups, float(linear_config.val_fraction), seed)
    rows, best = [], None
    if len(sweep) > 1 and len(val_idx) == 0:
        raise UserError(
            "no held-out examples to choose the L2 strength on (raise config.linear.val_fraction, or give a "
            "single value in config.linear.l2_sweep)."
        )
    if len(sweep) == 1:
        chosen = sweep[0]
    else:
        model = None
        for l2 in sweep:
            model = fit_logistic_regression(
                x[fit_idx], y[fit_idx], num_classes, l2, init=model, **opts
            )
            val = topk_accuracy(model.logits(x[val_idx]), y[val_idx], (1,))["top1"]
            fit = topk_accuracy(model.logits(x[fit_idx]), y[fit_idx], (1,))["top1"]
            rows.append(
                {
                    "l2": l2,
                    "val_top1": val,
                    "fit_top1": fit,
                    "iterations": model.iterations,
                    "loss": model.loss,
                }
            )
            log_fn(
                f"  l2={l2:<8g} held-out top-1 {val:6.1%}   fit top-1 {fit:6.1%}   "
                f"({model.iterations} L-BFGS iterations)"
            )
            if best is None or val > best[0]:  # ties keep the stronger regularization (seen first)
                best = (val, l2)
        chosen = best[1]
    if bool(linear_config.refit) or len(sweep) == 1:
        final = fit_logistic_regression(x, y, num_classes, chosen, **opts)
    else:
        final = fit_logistic_regression(x[fit_idx], y[fit_idx], num_classes, chosen, **opts)
    acc = topk_accuracy(final.logits(tx), ty, (1, 5))
    train_acc = topk_accuracy(final.logits(x), y, (1,))["top1"]
    return {
        "l2": chosen,
        "sweep": rows,
        "test_top1": acc["top1"],
        "test_top5": acc["top5"],
        "train_top1": train_acc,
        "num_train": len(y),
        "num_fit": len(fit_idx),
        "num_val": len(val_idx),
        "num_test": len(ty),
        "num_classes": int(num_classes),
        "feature_dim": int(x.shape[1]),
        "iterations": final.iterations,
        "classifier": final,
    }


def run_linear(
    config,
    checkpoint_path: str | Path,
    workdir: str | Path,
    *,
    progress: bool | None = None,
    log_fn=print,
) -> dict:
    """Feature extraction (cached) + the linear probe; writes ``WORKDIR/results.json``."""

    t = config.transfer
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inference = Inference(
        checkpoint_path,
        head=False,
        image_size=int(t.image_size) or None,
        resize=int(t.resize) or None,
        dtype=str(t.dtype) or None,
    )
    train_ds, test_ds = _downstream(config, "train"), _downstream(config, "test")
    if train_ds.class_names != test_ds.class_names:
        raise UserError(f"{t.dataset}: the train and test splits have different classes.")
    start = time.perf_counter()
    opts = dict(
        batch_size=int(t.batch_size),
        chunk=int(t.feature_chunk),
        num_threads=int(t.num_threads),
        max_bad_fraction=float(config.data.max_bad_record_fraction),
        progress=progress,
    )
    train = extract_features(inference, train_ds, workdir / "features", **opts)
    test = extract_features(inference, test_ds, workdir / "features", **opts)
    feature_s = time.perf_counter() - start
    log_fn(
        f"linear probe on {t.dataset}: {len(train.y):,} training / {len(test.y):,} test images, "
        f"{train_ds.num_classes} classes, {inference.feature_dim}-d features ({feature_s:.1f} s)"
    )
    result = linear_probe(
        train, test, train_ds.num_classes, config.linear, seed=int(config.seed), log_fn=log_fn
    )
    classifier = result.pop("classifier")
    np.savez(
        workdir / "classifier.npz",
        w=classifier.w,
        b=classifier.b,
        mean=classifier.mean,
        std=classifier.std,
    )
    result.update(
        {
            "mode": "linear",
            "dataset": str(t.dataset),
            "checkpoint": inference.path,
            "checkpoint_step": inference.meta.get("step"),
            "image_size": inference.image_size,
            "bad_images": train.bad + test.bad,
            "feature_seconds": round(feature_s, 2),
            "seconds": round(time.perf_counter() - start, 2),
            "class_names": train_ds.class_names,
        }
    )
    _write_json(workdir / RESULTS_FILE, result)
    log_fn(
        f"test top-1 {result['test_top1']:.2%}  top-5 {result['test_top5']:.2%}  (l2={result['l2']:g}, "
        f"{result['num_test']:,} test images) -> {workdir / RESULTS_FILE}"
    )
    return result


# ----------------------------------------------------------------------------------------------------
# Fine-tuning.
# ----------------------------------------------------------------------------------------------------


def compatible_bn_group(group: int, batch_size: int, num_devices: int) -> int:
    """A batch-norm group for fine-tuning with ``batch_size`` images per step on ``num_devices``.

    ``group`` itself when it divides the batch (the layer's requirement); otherwise the largest group
    below it that divides each device's share of the batch, so every group also lies whole on one device.
    A paper checkpoint keeps statistics over groups of 24; the default fine-tuning batch of 256 does not
    split into 24s (256 = 2^8), so on 1 or 8 devices it fine-tunes with groups of 16.
    """
    if group <= 0 or batch_size % group == 0:
        return group
    if num_devices <= 0 or batch_size % num_devices:
        raise UserError(
            f"config.train.batch_size={batch_size} does not split over {num_devices} devices: use a "
            f"multiple of {num_devices}."
        )
    per_device = batch_size // num_devices
    return max(g for g in range(1, min(group, per_device) + 1) if per_device % g == 0)


def finetune_model_config(config, pretrained_meta: dict, num_devices: int = 1, log_fn=print):
    """The pretrained checkpoint's model config with this run's dtype / batch-norm overrides.

    ``transfer.bn_group_size`` -1 keeps the checkpoint's group when it divides the fine-tuning batch and
    otherwise picks a compatible one (:func:`compatible_bn_group`), saying so through ``log_fn``. A group
    set explicitly must divide the batch.
    """

    model = ml_collections.ConfigDict((pretrained_meta.get("config") or {}).get("model") or {})
    if "name" not in model:
        raise UserError(
            "the pretrained checkpoint's metadata has no model config; it was not written by tagjax."
        )
    t = config.transfer
    if str(t.dtype):
        model.dtype = str(t.dtype)
    batch = int(config.train.batch_size)
    requested = int(t.bn_group_size)
    if requested >= 0:
        if requested > 0 and batch % requested:
            raise UserError(
                f"config.transfer.bn_group_size={requested} does not divide train.batch_size={batch}: "
                "use a divisor of the batch, 0 for statistics over the whole batch, or -1 to derive "
                "it from the checkpoint."
            )
        model.bn_group_size = requested
        return model
    saved = int(model.get("bn_group_size", 0))
    chosen = compatible_bn_group(saved, batch, num_devices)
    if chosen != saved:
        log_fn(
            f"batch norm: the checkpoint's groups of {saved} images do not divide the fine-tuning "
            f"batch of {batch} ({batch // num_devices} per device on {num_devices}); fine-tuning "
            f"with groups of {chosen} (--config.transfer.bn_group_size chooses another divisor)."
        )
        model.bn_group_size = chosen
    return model


def prepare_finetune_config(
    config,
    checkpoint_path: str | Path,
    num_classes: int,
    num_train: int,
    num_devices: int | None = None,
    log_fn=print,
):
    """``config`` with the pretrained model, its normalization, and the schedule length resolved.

    The result is what the fine-tuning checkpoints store, so they load like any tagjax checkpoint
    (``tagjax predict``/``evaluate``/``embed``/``transfer`` all read their model from it).
    ``num_devices`` (default: every device JAX sees) decides the batch-norm group
    (:func:`finetune_model_config`).
    """

    meta = checkpoint.read_metadata(checkpoint_path)
    config = config.copy_and_resolve_references()
    if num_devices is None:
        num_devices = jax.device_count()
    with config.unlocked():
        config.model = finetune_model_config(config, meta, num_devices, log_fn)
        pre_data = (meta.get("config") or {}).get("data") or {}
        for key in ("mean", "std"):
            if key in pre_data:
                config.data[key] = tuple(pre_data[key])
        if int(config.train.total_images) <= 0:
            config.train.total_images = int(config.transfer.epochs) * int(num_train)
        config.transfer.num_classes = int(num_classes)
    if config.train.total_images < config.train.batch_size:
        raise UserError(
            f"fine-tuning would take no step: train.total_images={config.train.total_images} is less than one "
            f"batch of {config.train.batch_size}; raise it (or transfer.epochs)."
        )
    return config


def init_finetune_state(config, checkpoint_path: str | Path, model, tx, mesh):
    """A fresh fine-tuning state: the new model's init with every trunk variable replaced by the checkpoint's
    (``checkpoint.restore_backbone``), the new head as initialized, optimizer state for the result."""

    init = train.state_init_fn(model, tx, train.image_shape(config))
    rng = jax.random.key(int(config.seed))
    replicated = sharding.replicated(mesh)
    state = jax.jit(init, out_shardings=replicated)(rng)
    variables, _ = checkpoint.restore_backbone(
        checkpoint_path, {"params": state.params, "batch_stats": state.batch_stats}
    )
    params = jax.device_put(variables["params"], replicated)
    batch_stats = jax.device_put(variables["batch_stats"], replicated)
    return state.replace(
        params=params,
        batch_stats=batch_stats,
        opt_state=jax.jit(tx.init, out_shardings=replicated)(params),
    )


class FinetuneBatches:
    """Batch ``k`` of fine-tuning (this host's rows): a pure function of ``(seed, k)``.

    Position ``p = k * B + row`` reads example ``perm_e[p mod n]`` of epoch ``e = p // n`` (a seeded
    permutation per epoch) and augments it with uniforms hashed from ``(seed, p)``.
    """

    def __init__(self, source, aug, batch_size: int, seed: int, host: int = 0, num_hosts: int = 1):
        self.source, self.aug = source, aug
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.n = len(source)
        self.local = self.batch_size // num_hosts
        self.offset = host * self.local
        self._perm: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            if len(self._perm) > 2:
                self._perm.pop(min(self._perm))
            self._perm[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm[epoch]

    def __call__(self, k: int) -> dict:

        positions = int(k) * self.batch_size + self.offset + np.arange(self.local, dtype=np.int64)
        u = sampling.uniforms(self.seed, _STREAM_FINETUNE, positions, augment.NUM_UNIFORMS)
        size = self.aug.size
        images = np.zeros((self.local, size, size, 3), np.uint8)
        labels = np.zeros(self.local, np.int32)
        mask = np.zeros(self.local, bool)
        for r, p in enumerate(positions):
            index = int(self._permutation(int(p // self.n))[p % self.n])
            try:
                ex = self.source[index]
                augment.train_image(ex["image"], images[r], u[r], self.aug)
                labels[r], mask[r] = int(ex["label"]), True
            except Exception:  # an unreadable image: masked out of the step, counted by the loop
                continue
        return {"image": images, "label": labels, "mask": mask}


def make_finetune_step(config, model, tx, schedule):
    """The pure fine-tuning step ``(state, batch) -> (state, metrics)``: softmax cross-entropy (with
    ``transfer.label_smoothing``) over the downstream classes, masked rows (unreadable images) left out.

    ``batch``: {"image": uint8 [B, S, S, 3], "label": int32 [B], "mask": bool [B]}. ``metrics``: loss,
    train_top1, grad_norm, lr and nonfinite, which tagjax.loop reads like pretraining's; a NaN/Inf update
    is kept out of the state by the same rule (``train.apply_if_finite``).
    """
    dtype = model.dtype
    smoothing = float(config.transfer.label_smoothing)
    num_classes = int(config.transfer.num_classes)

    def step(state, batch):
        x = train.normalize_images(batch["image"], config.data, dtype)
        mask = batch["mask"].astype(jnp.float32)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            target = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
            ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), target)
            loss = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
            correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask)
            return loss, (updates["batch_stats"], correct)

        (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new, nonfinite = train.apply_if_finite(
            state, loss, grad_norm, params, batch_stats, opt_state
        )
        metrics = {
            "loss": loss,
            "train_top1": correct / jnp.maximum(jnp.sum(mask), 1.0),
            "grad_norm": grad_norm,
            "lr": schedule(state.step),
            "nonfinite": nonfinite,
        }
        return new, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

    return step


def finetune_batches(batches: FinetuneBatches, start: int, stop: int, num_threads: int, counter):
    """Steps ``start..stop-1``'s batches, decoded ahead by grain threads; their unreadable images (masked
    rows) counted by ``counter``, the data config's bad-record rule."""
    ds = grain.MapDataset.range(start, stop).map(batches)
    read_options = grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=4)
    for batch in ds.to_iter_dataset(read_options):
        counter.add(len(batch["mask"]), int((~batch["mask"]).sum()))
        yield batch


def evaluate_classifier(
    model,
    variables,
    ds,
    config,
    *,
    batch_size: int,
    num_threads: int,
    max_bad_fraction: float,
    progress: bool = False,
) -> dict:
    """Top-1/top-5 of ``variables`` on a downstream split (resize + center crop, batch norm in eval mode)."""

    tf = augment.EvalTransform(int(config.data.eval_resize), int(config.data.eval_image_size))

    @jax.jit
    def forward(variables, images):
        return model.apply(
            variables, train.normalize_images(images, config.data, model.dtype), train=False
        )

    def load(i):
        ex = ds.source[i]
        return ex["image"], int(ex["label"])

    counter = BadImageCounter(max_bad_fraction, f"{ds.name} ({ds.split})", fix=_BAD_IMAGE_FIX)
    logits, labels = [], []
    bar = progress_bar(total=len(ds.source), unit="img", desc=f"test {ds.name}", enabled=progress)
    for batch in image_batches(
        load,
        range(len(ds.source)),
        preprocess=lambda im, out: augment.eval_image(im, out, tf),
        size=tf.size,
        batch_size=batch_size,
        num_threads=num_threads,
    ):
        out = np.asarray(forward(variables, batch.images))
        logits.append(out[batch.valid])
        labels.extend(e for e, ok in zip(batch.extras, batch.valid) if ok)
        counter.add(batch)
        bar.update(len(batch.indices))
    bar.close()
    counter.check(final=True)
    acc = topk_accuracy(np.concatenate(logits), np.asarray(labels), (1, 5))
    return {
        "top1": acc["top1"],
        "top5": acc["top5"],
        "images": len(labels),
        "bad_images": counter.bad,
    }


def run_finetune(
    config,
    checkpoint_path: str | Path,
    workdir: str | Path,
    *,
    progress: bool | None = None,
    log_fn=print,
    max_steps: int | None = None,
) -> dict:
    """Fine-tunes the checkpoint's trunk with a new head on ``config.transfer.dataset``; resumes from
    ``WORKDIR/checkpoints``. ``max_steps`` stops early (after a checkpoint), for tests of resumption.

    The loop is pretraining's (tagjax.loop) with :func:`make_finetune_step` and this config; the data
    position is the step (:class:`FinetuneBatches`), so checkpoints carry no iterator state.
    """
    workdir = as_path(workdir)
    train_ds, test_ds = _downstream(config, "train"), _downstream(config, "test")
    config = prepare_finetune_config(
        config, checkpoint_path, train_ds.num_classes, len(train_ds.source), log_fn=log_fn
    )
    t = config.transfer
    loop.validate_config(config)
    batch_size = int(config.train.batch_size)
    num_steps = loop.Cadence.from_config(config.train).num_steps
    model = models.create(config.model, train_ds.num_classes)
    tx, schedule = optim.make_optimizer(config.optim, batch_size, int(config.train.total_images))
    mesh = sharding.create_mesh(config.mesh)
    sharding.batch_size_per_process(batch_size, mesh)  # refuses sizes the devices cannot split
    replicated = sharding.replicated(mesh)
    metadata = {
        "pretrained": str(checkpoint.resolve(checkpoint_path)),
        "transfer_dataset": str(t.dataset),
        "class_names": train_ds.class_names,
        "num_classes": train_ds.num_classes,
    }
    manager = checkpoint.CheckpointManager(workdir, config, metadata)
    init = train.state_init_fn(model, tx, train.image_shape(config))
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(init, jax.random.key(int(config.seed))),
    )
    state, start = loop.restore_or_init(
        manager, abstract, lambda: init_finetune_state(config, checkpoint_path, model, tx, mesh)
    )
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, resume_step=start)
    try:
        if start:
            log_fn(f"resumed fine-tuning at step {start:,} of {num_steps:,}")
        else:
            log_fn(
                f"fine-tuning {config.model.name} from {metadata['pretrained']} on {t.dataset}: "
                f"{train_ds.num_classes} classes, {len(train_ds.source):,} training images, "
                f"{num_steps:,} steps of {batch_size}"
            )

        def test_accuracy(state, progress: bool = False) -> dict:
            return evaluate_classifier(
                model,
                {"params": state.params, "batch_stats": state.batch_stats},
                test_ds,
                config,
                batch_size=int(t.eval_batch_size),
                num_threads=int(t.num_threads),
                max_bad_fraction=float(config.data.max_bad_record_fraction),
                progress=progress,
            )

        bad_train = bad_records.BadRecordCounter.from_data_config(
            config.data, f"training images of {t.dataset}"
        )
        stop = num_steps if max_steps is None else min(num_steps, start + int(max_steps))
        batches = FinetuneBatches(
            train_ds.source,
            augment.TrainAugment.from_config(config.data),
            batch_size,
            int(config.seed),
            jax.process_index(),
            jax.process_count(),
        )
        spec = loop.Loop(
            config,
            step_fn=jax.jit(
                make_finetune_step(config, model, tx, schedule),
                in_shardings=(replicated, sharding.batch_sharding(mesh)),
                out_shardings=(replicated, replicated),
                donate_argnums=(0,),
            ),
            batches=finetune_batches(batches, start, stop, int(t.num_threads), bad_train),
            batch_keys=("image", "label", "mask"),
            mesh=mesh,
            num_classes=train_ds.num_classes,
            manager=manager,
            writer=writer,
            workdir=workdir,
            evaluate=lambda state: {
                k: v for k, v in test_accuracy(state).items() if k in ("top1", "top5")
            },
            progress=progress,
        )
        trained = loop.run(spec, state, stop)
        final_step = trained.step
        if final_step < num_steps:
            return {
                "mode": "finetune",
                "step": final_step,
                "num_steps": num_steps,
                "finished": False,
                "preempted": trained.preempted,
            }
        acc = test_accuracy(trained.state, progress=progress)
        writer.write(
            "eval", final_step, final_step * batch_size, {"top1": acc["top1"], "top5": acc["top5"]}
        )
    finally:
        writer.close()
        manager.close()
    result = {
        "mode": "finetune",
        "finished": True,
        "dataset": str(t.dataset),
        "checkpoint": metadata["pretrained"],
        "step": final_step,
        "num_steps": num_steps,
        "images_seen": final_step * batch_size,
        "test_top1": acc["top1"],
        "test_top5": acc["top5"],
        "num_test": acc["images"],
        "num_train": len(train_ds.source),
        "num_classes": train_ds.num_classes,
        "bad_images": bad_train.bad_records + acc["bad_images"],
        "image_size": int(config.data.image_size),
    }
    _write_json(workdir / RESULTS_FILE, result)
    log_fn(
        f"fine-tuned test top-1 {acc['top1']:.2%}  top-5 {acc['top5']:.2%} ({acc['images']:,} test "
        f"images) -> {workdir / RESULTS_FILE}"
    )
    return result


# ----------------------------------------------------------------------------------------------------
# Baselines.
# ----------------------------------------------------------------------------------------------------


def write_random_init_checkpoint(
    config,
    path: str | Path,
    num_classes: int = 1,
    seed: int | None = None,
    metadata: dict | None = None,
) -> Path:
    """A randomly initialized model of ``config.model`` saved as an inference checkpoint: the "no
    pretraining" baseline of a transfer comparison (and a fixture for tests). ``metadata`` is stored too
    (e.g. ``vocab_fingerprint`` for a head over a vocabulary)."""

    model = models.create(config.model, num_classes)
    size = int(config.data.get("eval_image_size", 224))
    rng = jax.random.key(int(config.seed if seed is None else seed))
    variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    return checkpoint.save_inference_checkpoint(
        path,
        variables,
        {
            "config": config,
            "source": "random initialization",
            "seed": int(config.seed if seed is None else seed),
            **(metadata or {}),
        },
    )

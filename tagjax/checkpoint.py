"""Checkpoints: the train state, the data-iterator state and metadata, saved together with Orbax.

One checkpoint is one Orbax step directory ``<workdir>/checkpoints/<step>/`` with three items, written
to a temporary directory and renamed into place only when all three are complete, so a run killed at
any moment leaves either a whole checkpoint or none:

``state/``  the train state pytree (params, batch_stats, opt_state, step, rng), each array written
            by the host(s) holding its shards, restorable onto any other mesh or device count;
``data/``   the grain iterator state of each host (``process_<i>-of-<n>.json``, the file layout of
            grain's own Orbax handler), captured at the step boundary the state belongs to, so a
            restart continues the exact data order;
``meta/``   JSON: the resolved config, vocabulary fingerprint, tagjax version, step, images seen,
            mesh shape, and whatever the caller adds. It is what makes a checkpoint self-describing
            (``tagjax predict CKPT`` needs nothing else) and what lets a restart refuse a checkpoint
            of another experiment instead of failing deep inside Orbax or, worse, silently mixing
            two runs.

Saves are asynchronous: :meth:`CheckpointManager.save` blocks only while the arrays are copied off
the accelerator (and while a previous save, if still running, finishes); the disk writes run in a
background thread. ``benchmarks/checkpoint_blocking.py`` measures that blocking time.

Inference checkpoints (imported PyTorch weights, or exports of trained ones) use the same layout with
``state = {"params", "batch_stats"}`` and no ``data`` item, so :func:`load_for_inference`,
:func:`load_backbone` and :func:`restore_backbone` read both kinds the same way::

    from tagjax import checkpoint
    variables, meta = checkpoint.load_for_inference("/path/to/workdir")   # newest checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocp_managers

from tagjax import __version__
from tagjax.errors import UserError
from tagjax.metrics_writer import as_path

log = logging.getLogger(__name__)

FORMAT = "tagjax.checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_DIRNAME = "checkpoints"
HEAD = "fc"  # the hashtag head's name in params (torchvision layout; see tagjax.models)

# Config fields whose change makes a checkpoint belong to another experiment. The tree-structure check
# in `_check_structure` catches every shape change on its own (head size, width, optimizer slots); these
# are the changes that keep all shapes but would silently corrupt a resumed run: images seen are
# step * batch_size (schedule, keep policies and the data position all depend on it), and the data
# iterator state only means something for the same source, split and sampling.
COMPATIBILITY_FIELDS = (
    "model.name",
    "train.batch_size",
    "loss",
    "data.synthetic",
    "data.train_split",
    "data.sampling",
)

PyTree = Any


class _OrbaxInfoFilter(logging.Filter):
    """Drops Orbax's INFO chatter (a dozen lines per save through absl's logger); warnings pass.

    Each save is summarized by one line of ours instead. Set the ``tagjax.checkpoint`` logger to DEBUG
    to see Orbax's lines again.
    """

    # The newest failure Orbax logged from a background save.
    last_error: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "/orbax/" in record.pathname.replace("\\", "/")
        if from_orbax and record.levelno >= logging.ERROR and record.exc_info:
            # A background save failed: Orbax logs it with its traceback (and then only skips the
            # step). CheckpointManager.check_saves reports it as one line and stops the run.
            _OrbaxInfoFilter.last_error = record.exc_info[1]
            return log.isEnabledFor(logging.DEBUG)
        if record.levelno >= logging.WARNING or log.isEnabledFor(logging.DEBUG):
            return True
        return not from_orbax


_ORBAX_FILTER = _OrbaxInfoFilter()


class _UnretrievedReadFilter(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for TensorStore reads: when one array of a
    damaged checkpoint fails to restore, Orbax's other reads of it fail too and nobody awaits them, so
    asyncio prints each with its traceback (before or after our one-line error, as the garbage
    collector decides). The damage is reported once, by :func:`_reading`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Task exception was never retrieved")
            and "tensorstore_spec" in message
        )


_UNRETRIEVED_READ_FILTER = _UnretrievedReadFilter()


def _quiet_orbax() -> None:
    absl_logger = logging.getLogger("absl")
    if _ORBAX_FILTER not in absl_logger.filters:
        absl_logger.addFilter(_ORBAX_FILTER)


# ----------------------------------------------------------------------------------------------------
# The data-iterator item: a tiny Orbax handler of our own.
# ----------------------------------------------------------------------------------------------------


class DataStateHandler(ocp.CheckpointHandler):
    """Writes one host's data-iterator state as ``process_<i>-of-<n>.json``.

    grain ships an Orbax handler too, but it calls ``iterator.get_state()`` itself and needs the live
    iterator again at restore time. Ours takes the state already captured at the step boundary, so
    the checkpoint holds exactly the batches consumed by the train state it is saved with, and a
    restore can hand the state back before any iterator exists. The file names and contents are the
    same as grain's, so either handler reads the other's files.
    """

    def save(self, directory: epath.Path, args: DataStateSave):
        if args.state is None:
            return
        index, count = jax.process_index(), jax.process_count()
        (directory / f"process_{index}-of-{count}.json").write_text(args.state)

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> str | None:
        index, count = jax.process_index(), jax.process_count()
        path = directory / f"process_{index}-of-{count}.json"
        if not path.exists():
            return None
        return path.read_text()

    def metadata(self, directory: epath.Path) -> None:
        return None

    def structure(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: str | None  # the iterator state as text (JSON), or None for "no data item"


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _handler_registry() -> ocp.handlers.CheckpointHandlerRegistry:
    return ocp.handlers.create_default_handler_registry(
        state=ocp.PyTreeCheckpointHandler(),
        data=DataStateHandler(),
        meta=ocp.JsonCheckpointHandler(),
    )


def _encode_data_state(state: Any) -> tuple[str | None, str | None]:
    """(text, kind): grain's DatasetIterator state is a dict, DataLoaderIterator's is JSON bytes."""
    if state is None:
        return None, None
    if isinstance(state, bytes | bytearray):
        return bytes(state).decode(), "bytes"
    if isinstance(state, str):
        return state, "str"
    return json.dumps(state, indent=1, sort_keys=True), "dict"


def _decode_data_state(text: str | None, kind: str | None) -> Any:
    if text is None:
        return None
    if kind == "bytes":
        return text.encode()
    if kind == "str":
        return text
    return json.loads(text)


# ----------------------------------------------------------------------------------------------------
# Keep policies.
# ----------------------------------------------------------------------------------------------------


def images_seen(step: int, batch_size: int) -> int:
    """Images seen after ``step`` optimizer steps, as a Python int (JAX runs without 64-bit ints)."""
    return int(step) * int(batch_size)


@dataclasses.dataclass
class KeepEveryImages:
    """Orbax preservation policy: keep the first checkpoint at or after every multiple of N images.

    Counted in images, not steps, like every length in tagjax. "First in its bucket" is stable: a
    checkpoint kept once stays kept as newer ones arrive, whatever the save interval.
    """

    every_images: int
    batch_size: int

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        del context
        seen_buckets: set[int] = set()
        keep = []
        for info in sorted(checkpoints, key=lambda c: c.step):
            bucket = images_seen(info.step, self.batch_size) // self.every_images
            keep.append(bucket not in seen_buckets)
            seen_buckets.add(bucket)
        order = {info.step: k for info, k in zip(sorted(checkpoints, key=lambda c: c.step), keep)}
        return [order[info.step] for info in checkpoints]


# ----------------------------------------------------------------------------------------------------
# Metadata helpers.
# ----------------------------------------------------------------------------------------------------


def _config_dict(config: Any) -> dict:
    """A ConfigDict / mapping as plain JSON types (tuples become lists, as they do in the file)."""
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _lookup(tree: Mapping, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def mesh_shape_of(tree: PyTree) -> dict[str, int] | None:
    """The named mesh the arrays of ``tree`` live on (first NamedSharding found), as {axis: size}."""
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and hasattr(mesh, "shape"):
            return {str(k): int(v) for k, v in dict(mesh.shape).items()}
    return None


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[tuple[int, ...] | None, Any]]:
    """{"params/fc/kernel": (shape, dtype)} over the leaves of a state, abstract state or metadata tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    out = {}
    for path, leaf in flat:
        if _is_prng_key(leaf):
            out[_path_str(path)] = (None, None)  # stored as key data; shapes differ by design
        else:
            shape = getattr(leaf, "shape", None)
            out[_path_str(path)] = (
                None if shape is None else tuple(shape),
                getattr(leaf, "dtype", None),
            )
    return out


# ----------------------------------------------------------------------------------------------------
# Integrity: per-array checksums and the finiteness check, both computed on the device.
# ----------------------------------------------------------------------------------------------------

_WORD = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
_KNUTH = np.uint32(2654435761)  # odd multiplier: position weights that differ for every index


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32 checksum of an array's bytes: sum over elements of ``word * (position * K + 1)`` mod 2^32.

    Modular sums are exact in any order, so the value is the same whatever the mesh or device count
    the array lives on (a checkpoint saved on 8 devices verifies on 1). Position weights make a swap of
    two elements count; the positions come from iotas, so a sharded array is never reshaped or gathered.
    """
    if _is_prng_key(x):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    words = jax.lax.bitcast_convert_type(x, _WORD[x.dtype.itemsize]).astype(jnp.uint32)
    position = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        position = position + iota * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (position * _KNUTH + np.uint32(1)), dtype=jnp.uint32)


def _leaf_finite(x: jax.Array) -> jax.Array:
    if _is_prng_key(x) or not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.bool_(True)
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _summarize(leaves: list) -> tuple[list, list]:
    return [_leaf_checksum(x) for x in leaves], [_leaf_finite(x) for x in leaves]


@dataclasses.dataclass(frozen=True)
class StateSummary:
    """What :func:`summarize` found: a checksum per array and the arrays holding NaN or Inf."""

    checksums: dict[str, int]  # "params/fc/kernel" -> uint32 checksum of its bytes
    nonfinite: list[str]  # paths of floating-point arrays with a NaN or Inf

    def nonfinite_groups(self) -> list[str]:
        """The top-level fields (params, batch_stats, opt_state) holding a non-finite array."""
        return sorted({path.split("/")[0] for path in self.nonfinite})


def summarize(state: PyTree) -> StateSummary:
    """Checksums and finiteness of every array of ``state``, computed where the arrays live (one jitted
    pass over the state, a few bytes back to the host): what a save records and a restore verifies."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    paths = [_path_str(path) for path, _ in flat]
    checksums, finite = jax.device_get(_summarize([leaf for _, leaf in flat]))
    return StateSummary(
        {p: int(c) for p, c in zip(paths, checksums)},
        [p for p, ok in zip(paths, finite) if not bool(ok)],
    )


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be trusted (missing pieces, unreadable files, wrong checksums)."""


# Files every complete checkpoint step has (Orbax's layout: the pytree's index and OCDBT manifest, the
# JSON of our metadata); a step without one of them is damaged, not "another experiment".
_REQUIRED_FILES = (
    "_CHECKPOINT_METADATA",
    "state/_METADATA",
    "state/manifest.ocdbt",
    "meta/metadata",
)
SET_ASIDE_DIRNAME = "checkpoints_set_aside"


def _verify_files(where) -> None:
    """DamagedCheckpoint when step directory ``where`` lacks a file every complete checkpoint has."""
    for name in _REQUIRED_FILES:
        if not (where / name).exists():
            raise DamagedCheckpoint(f"checkpoint {where} is damaged: {name} is missing")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------
# The training-side manager.
# ----------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores a training run's checkpoints in ``<workdir>/checkpoints``.

    The training loop uses it like this (see tagjax.loop, which pretraining and fine-tuning share)::

        mgr = checkpoint.CheckpointManager(workdir, config, {"vocab_fingerprint": fp, "num_classes": n})
        state, data_state = mgr.restore_latest(abstract_state)   # (None, None) on a fresh workdir
        if data_state is not None:
            train_iter.set_state(data_state)
        for step in range(start, total):
            state = train_step(state, next(train_iter))
            if mgr.should_save(step + 1):
                mgr.save(step + 1, state, train_iter)
            if mgr.preempted:
                break                       # the preemption checkpoint is on its way; exit cleanly
        mgr.save(final_step, state, train_iter)     # no-op if that step is already saved
        mgr.close()                                  # waits for the last async save

    ``metadata`` is stored in every checkpoint's ``meta`` item next to what this class records itself;
    ``vocab_fingerprint`` in it is checked on restore.
    """

    def __init__(
        self,
        workdir: str | Path,
        config: Any,
        metadata: Mapping[str, Any] | None = None,
        *,
        install_signal_handler: bool | None = None,
    ):
        _quiet_orbax()
        # A local path or a URL such as gs://bucket/run (TPU pods); Path() would collapse gs:// to gs:/.
        self.workdir = as_path(workdir)
        self.directory = self.workdir / CHECKPOINTS_DIRNAME
        self.config = config
        self.base_metadata = dict(metadata or {})
        ck = config.checkpoint
        self.batch_size = int(config.train.batch_size)
        self.every_images = int(config.train.checkpoint_every_images)
        if int(ck.keep_last) < 1:
            raise UserError(
                f"config.checkpoint.keep_last={ck.keep_last} must be at least 1 (the newest checkpoint "
                "is what a restart resumes from)."
            )
        policies: list[Any] = [ocp_managers.LatestN(n=int(ck.keep_last))]
        if int(ck.keep_every_images) > 0:
            policies.append(KeepEveryImages(int(ck.keep_every_images), self.batch_size))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=bool(ck.async_save),
            # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp` behind: never a complete
            # step, so never restored; remove it on the next start.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._mgr = ocp.CheckpointManager(
            epath.Path(self.directory), options=options, handler_registry=_handler_registry()
        )
        self.last_save_blocking_s: float | None = None  # host time the last save() took
        self._unconfirmed: int | None = None  # the step of the last save not yet seen on disk
        self._failure_reported = False  # a failed save was raised; close() does not raise it again
        self.restore_step = int(ck.get("restore_step", 0) or 0)
        self._preempt_requested = threading.Event()
        self.preempted = False  # True once a preemption checkpoint was started: stop training
        self._previous_sigterm: Any = None
        if install_signal_handler is None:
            install_signal_handler = bool(ck.save_on_preemption)
        if install_signal_handler:
            self._install_sigterm_handler()

    # --- preemption ----------------------------------------------------------------------------------

    def _install_sigterm_handler(self) -> None:
        """SIGTERM (what SLURM, Kubernetes and cloud VMs send before killing) requests a checkpoint at
        the next step boundary instead of ending the process mid-step.

        Only on single-process runs: with several processes, every host must save at the same step,
        and JAX's preemption sync service (used by ``orbax ... reached_preemption``, see
        :meth:`should_save`) agrees on that step across hosts. A second SIGTERM ends the process.
        """
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            del frame
            if self._preempt_requested.is_set():  # asked twice: give up waiting for a step boundary
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
                return
            log.warning(
                "SIGTERM received: saving a checkpoint at the next step boundary, then stopping."
            )
            self._preempt_requested.set()

        self._previous_sigterm = signal.signal(signal.SIGTERM, handler)

    def request_preemption_save(self) -> None:
        """What the SIGTERM handler does; for schedulers that signal some other way (and for tests)."""
        self._preempt_requested.set()

    def _preemption_reached(self, step: int) -> bool:
        if self._preempt_requested.is_set():
            return True
        if jax.process_count() > 1:
            return bool(self._mgr.reached_preemption(step))
        return False

    # --- queries -------------------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mgr.all_steps())

    def should_save(self, step: int) -> bool:
        """True when ``step`` (optimizer steps done) crosses a ``checkpoint_every_images`` boundary, or a
        preemption was signalled. Call it at every step boundary."""
        if self._preemption_reached(step):
            return True
        if self.every_images <= 0 or step <= 0:
            return False
        now = images_seen(step, self.batch_size) // self.every_images
        before = images_seen(step - 1, self.batch_size) // self.every_images
        return now > before

    # --- save ----------------------------------------------------------------------------------------

    def _metadata(
        self, step: int, state: PyTree, extra: Mapping[str, Any] | None, data_kind: str | None
    ):
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": "train",
            "tagjax_version": __version__,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "step": int(step),
            "images_seen": images_seen(step, self.batch_size),
            "batch_size": self.batch_size,
            "mesh_shape": mesh_shape_of(state),
            "device_count": jax.device_count(),
            "process_count": jax.process_count(),
            "data_state_kind": data_kind,
            "config": _config_dict(self.config),
        }
        params = getattr(state, "params", None)
        if params is None and isinstance(state, Mapping):
            params = state.get("params")
        if isinstance(params, Mapping) and HEAD in params and "kernel" in params[HEAD]:
            meta["num_classes"] = int(params[HEAD]["kernel"].shape[-1])
        meta.update(self.base_metadata)
        meta.update(extra or {})
        return json.loads(json.dumps(meta, default=str))

    def save(
        self,
        step: int,
        state: PyTree,
        data_iterator: Any = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Starts saving ``state`` (and the iterator's current state) as step ``step``.

        Returns once the arrays are copied off the device; the files are written in the background, so
        ``state``'s buffers may be donated to the next step right away. Returns False without saving if
        ``step`` is already saved (e.g. the final save right after a periodic one). ``data_iterator`` is
        a grain iterator (its ``get_state()`` is taken now) or an already-captured state. Whether to save
        at this step is :meth:`should_save`'s decision; every call that reaches here saves.
        """
        start = time.perf_counter()
        step = int(step)
        if step in self._mgr.all_steps():
            return False
        data_state = (
            data_iterator.get_state() if hasattr(data_iterator, "get_state") else data_iterator
        )
        data_text, data_kind = _encode_data_state(data_state)
        summary = summarize(state)
        if summary.nonfinite:
            self._failure_reported = True
            raise UserError(
                f"not saving checkpoint {step}: the train state holds NaN/Inf in "
                f"{', '.join(summary.nonfinite_groups())} ({summary.nonfinite[0]} first); the newest "
                f"checkpoint stays {self.newest_on_disk()}. Lower config.optim.base_lr or set "
                "config.optim.grad_clip_norm, then restart (it resumes from that checkpoint)."
            )
        meta = self._metadata(step, state, metadata, data_kind)
        meta["checksums"] = summary.checksums
        items = {
            "state": ocp.args.PyTreeSave(state),
            "meta": ocp.args.JsonSave(meta),
        }
        if data_text is not None:
            items["data"] = DataStateSave(data_text)
        if self._preempt_requested.is_set() or (
            jax.process_count() > 1 and self._mgr.reached_preemption(step)
        ):
            self.preempted = True
        self.check_saves(wait=True)  # the previous save must be on disk before this one starts
        try:
            saved = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            self._fail(step, e)
        self._unconfirmed = step if saved else self._unconfirmed
        if not self._mgr.is_saving_in_progress():
            self.check_saves()  # a synchronous save (async_save=False) is complete already
        self.last_save_blocking_s = time.perf_counter() - start
        if saved:
            log.info(
                "checkpoint %d (%s images) started; the loop was blocked %.3f s",
                step,
                f"{meta['images_seen']:,}",
                self.last_save_blocking_s,
            )
        return bool(saved)

    def newest_on_disk(self) -> str:
        """The newest complete checkpoint directory, for messages ("none" on a fresh workdir)."""
        steps = _complete_steps(self.directory)
        return str(self.directory / str(max(steps))) if steps else "none"

    def _fail(self, step: int, error: BaseException | None) -> None:
        self._failure_reported = True
        self._unconfirmed = None
        why = _one_line(error) if error is not None else "no error was reported"
        raise UserError(
            f"checkpoint {step} could not be written ({why}); training stopped. The newest "
            f"checkpoint is {self.newest_on_disk()}: free space or fix the workdir, then rerun the "
            "same command to resume from it."
        ) from None

    def check_saves(self, *, wait: bool = False) -> None:
        """Raises UserError (one line) when the last save failed, e.g. in its background thread.

        Called at every step boundary (tagjax.loop), so a failed save stops training at the next step
        instead of surfacing saves later as a crash. Without ``wait`` it only looks when no save is
        running, which costs nothing. On several processes only the waiting form is used (at each save
        and at the end), so every process stops at the same step.
        """
        if self._unconfirmed is None:
            return
        if not wait and (jax.process_count() > 1 or self._mgr.is_saving_in_progress()):
            return
        error = None
        try:
            self._mgr.wait_until_finished()
            self._mgr.check_for_errors()
        except Exception as e:
            error = e
        step, self._unconfirmed = self._unconfirmed, None
        if error is None and (self.directory / str(step) / "_CHECKPOINT_METADATA").exists():
            return
        error = error or _ORBAX_FILTER.last_error
        _OrbaxInfoFilter.last_error = None
        self._unconfirmed = step
        self._fail(step, error)

    def wait_until_finished(self) -> None:
        """Blocks until the last asynchronous save is on disk (UserError if it failed)."""
        self.check_saves(wait=True)

    def close(self) -> None:
        """Waits for pending saves, then releases Orbax's threads and the SIGTERM handler.

        A failed save already reported (raised) is not raised again, so an error path that closes the
        manager ends with that one line."""
        try:
            if self._failure_reported:
                with contextlib.suppress(Exception):
                    self._mgr.wait_until_finished()
            else:
                self.check_saves(wait=True)
        finally:
            self._mgr.close()
            if self._previous_sigterm is not None:
                with contextlib.suppress(ValueError):  # not on the main thread any more
                    signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- restore -------------------------------------------------------------------------------------

    def metadata(self, step: int) -> dict:
        """The ``meta`` item of checkpoint ``step``."""
        restored = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore_latest(self, abstract_state: PyTree, data_iterator: Any = None) -> tuple[Any, Any]:
        """Restores the newest intact checkpoint onto ``abstract_state``'s shardings.

        ``abstract_state`` is the train state as ``jax.ShapeDtypeStruct``s carrying the *current* run's
        shardings (e.g. ``jax.eval_shape`` of the init, with ``sharding=``), so the checkpoint may come
        from any other mesh or device count. Returns ``(state, data_state)``, or ``(None, None)`` when the
        workdir has no checkpoint yet. If ``data_iterator`` is given, its state is set too.

        Every candidate is verified (its files, its metadata, each array against the checksum recorded
        when it was saved, and finiteness); a damaged one is moved to ``<workdir>/checkpoints_set_aside/``
        with a one-line warning naming it, and the next older one is tried. With
        ``config.checkpoint.restore_step=N`` exactly step N is restored (UserError if it is missing or
        damaged) and newer checkpoints are set aside, so the run continues from N.
        Raises UserError when the checkpoint belongs to another experiment (see COMPATIBILITY_FIELDS).
        """
        # Every step directory counts, complete or not: a damaged one must be set aside, or Orbax would
        # still list its step and never save that step again.
        steps = sorted(_step_dirs(self.directory), reverse=True)
        if self.restore_step:
            if self.restore_step not in steps:
                raise UserError(
                    f"config.checkpoint.restore_step={self.restore_step}: no checkpoint of that step in "
                    f"{self.directory} (there are: {', '.join(map(str, sorted(steps))) or 'none'})."
                )
            for newer in (s for s in steps if s > self.restore_step):
                self._set_aside(newer, f"newer than restore_step {self.restore_step}")
            try:
                return self._restore_verified(self.restore_step, abstract_state, data_iterator)
            except DamagedCheckpoint as e:
                raise UserError(
                    f"config.checkpoint.restore_step={self.restore_step}: {e}; pick another step."
                ) from None
        for step in steps:
            try:
                return self._restore_verified(step, abstract_state, data_iterator)
            except DamagedCheckpoint as e:
                self._set_aside(step, "damaged")
                log.warning("%s: set aside; trying the previous checkpoint", e)
        if steps:
            log.warning("no intact checkpoint left in %s: starting from scratch", self.directory)
        return None, None

    def _set_aside(self, step: int, why: str) -> None:
        """Moves checkpoint ``step`` out of Orbax's sight into ``checkpoints_set_aside/`` (kept, not
        deleted: a user may still want to look at it), so the run saves that step again later."""
        aside = self.workdir / SET_ASIDE_DIRNAME
        target = aside / f"{step}-{why.split()[0]}"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            n = 1
            while target.exists():
                n += 1
                target = aside / f"{step}-{why.split()[0]}-{n}"
            (self.directory / str(step)).rename(target)
            if why.split()[0] != "damaged":
                log.warning(
                    "checkpoint %s (%s) moved to %s", self.directory / str(step), why, target
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"tagjax_set_aside_{step}")
        self._mgr.reload()

    def _restore_verified(self, step: int, abstract_state: PyTree, data_iterator: Any):
        """:meth:`restore` of ``step`` after checking its files, then its arrays against the checksums
        stored at save time; DamagedCheckpoint (one line naming it) when anything is off."""
        where = self.directory / str(step)
        _verify_files(where)
        try:
            meta = self.metadata(step)
        except Exception as e:
            raise DamagedCheckpoint(
                f"checkpoint {where} is damaged: its metadata is unreadable ({_one_line(e)})"
            ) from None
        if meta.get("data_state_kind") is not None and not (where / "data").is_dir():
            raise DamagedCheckpoint(f"checkpoint {where} is damaged: data/ is missing")
        try:
            state, data_state = self.restore(step, abstract_state, None)
        except UserError:
            raise  # another experiment's checkpoint: not damage, the user must choose
        except Exception as e:
            raise DamagedCheckpoint(
                f"checkpoint {where} is damaged: its arrays do not restore ({_one_line(e)})"
            ) from None
        summary = summarize(state)
        expected = meta.get("checksums") or {}
        wrong = [p for p, c in summary.checksums.items() if p in expected and expected[p] != c]
        if wrong:
            raise DamagedCheckpoint(
                f"checkpoint {where} is damaged: {len(wrong)} array(s) differ from what was saved "
                f"({wrong[0]} first)"
            )
        if summary.nonfinite:
            raise DamagedCheckpoint(
                f"checkpoint {where} holds NaN/Inf in {', '.join(summary.nonfinite_groups())} "
                f"({summary.nonfinite[0]} first)"
            )
        if data_iterator is not None and data_state is not None:
            data_iterator.set_state(data_state)
        log.info(
            "restored checkpoint %s (%s images seen)", where, f"{meta.get('images_seen', 0):,}"
        )
        return state, data_state

    def restore(
        self, step: int, abstract_state: PyTree, data_iterator: Any = None
    ) -> tuple[Any, Any]:
        where = self.directory / str(step)
        meta = self.metadata(step)
        check_compatible(meta, self.config, self.base_metadata, where=where)
        stored = self._mgr.item_metadata(step)["state"]
        _check_structure(stored.tree if hasattr(stored, "tree") else stored, abstract_state, where)

        restore_data = data_iterator is not None or meta.get("data_state_kind") is not None
        reset_data = bool(self.config.checkpoint.get("reset_data_state", False))
        if restore_data and not reset_data and meta.get("process_count", 1) != jax.process_count():
            raise UserError(
                f"checkpoint {where} was written by {meta.get('process_count')} processes but this run "
                f"has {jax.process_count()}: the per-host data positions cannot be remapped; resume with "
                "the same host count, or pass --config.checkpoint.reset_data_state=True to keep the "
                "model and restart the data order."
            )
        items = {
            "state": ocp.args.PyTreeRestore(
                item=abstract_state,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            )
        }
        if restore_data and not reset_data and meta.get("data_state_kind") is not None:
            items["data"] = DataStateRestore()
        restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
        data_state = None
        if "data" in items:
            data_state = _decode_data_state(restored["data"], meta.get("data_state_kind"))
            if data_state is None:
                raise UserError(
                    f"checkpoint {where} has no data-iterator state for process {jax.process_index()}; "
                    "pass --config.checkpoint.reset_data_state=True to restart the data order."
                )
        elif reset_data and meta.get("data_state_kind") is not None:
            log.warning("checkpoint %s: data-iterator state ignored (reset_data_state=True)", where)
        if data_iterator is not None and data_state is not None:
            data_iterator.set_state(data_state)
        return restored["state"], data_state


def check_compatible(
    meta: Mapping[str, Any],
    config: Any,
    metadata: Mapping[str, Any] | None = None,
    *,
    where: Any = "the checkpoint",
) -> None:
    """Raises UserError naming the first difference that makes ``meta``'s run another experiment."""
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{where} is not a tagjax checkpoint (no tagjax metadata); pass another path."
        )
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise UserError(
            f"{where} was written by tagjax {meta.get('tagjax_version')} (checkpoint format "
            f"{meta.get('format_version')}); upgrade tagjax (this is {__version__}) to read it."
        )
    stored_cfg = meta.get("config") or {}
    current_cfg = _config_dict(config)
    for field in COMPATIBILITY_FIELDS:
        old, new = _lookup(stored_cfg, field), _lookup(current_cfg, field)
        if old is _MISSING or new is _MISSING or old == new:
            continue
        raise UserError(
            f"{where} was trained with {field}={old!r} but the config now says {new!r}; resume with the "
            f"original value (--config.{field}={old}) or start a new --workdir."
        )
    metadata = metadata or {}
    old_fp, new_fp = meta.get("vocab_fingerprint"), metadata.get("vocab_fingerprint")
    if old_fp and new_fp and old_fp != new_fp:
        raise UserError(
            f"{where} was trained on vocabulary {old_fp} but this run's vocabulary is {new_fp}; use the "
            "dataset (vocab.json) the run started with, or start a new --workdir."
        )


def _check_structure(stored_tree: PyTree, abstract_state: PyTree, where: Any) -> None:
    """Compares leaf paths and shapes before Orbax does, to fail with one sentence naming the leaf."""
    stored = _flat_shapes(stored_tree)
    wanted = _flat_shapes(abstract_state)
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
        what = f"has no {missing[0]!r}" if missing else f"has {extra[0]!r}, which this model lacks"
        raise UserError(
            f"{where} does not match this config's train state: the checkpoint {what} "
            f"({len(missing)} missing, {len(extra)} unexpected entries); resume with the original "
            "config (model, optimizer) or start a new --workdir."
        )
    for path, (shape, _) in wanted.items():
        old_shape = stored[path][0]
        if shape is not None and old_shape is not None and tuple(old_shape) != tuple(shape):
            raise UserError(
                f"{where} does not match this config's train state: {path} has shape "
                f"{tuple(old_shape)} in the checkpoint but {tuple(shape)} now; resume with the original "
                "config (model, number of labels) or start a new --workdir."
            )


# ----------------------------------------------------------------------------------------------------
# Notebook / transfer / predict side: one path in, variables out.
# ----------------------------------------------------------------------------------------------------


def _is_step_dir(path: Path) -> bool:
    return (path / "state").is_dir() and (path / "meta").is_dir()


def _step_dirs(root) -> list[int]:
    """The steps of all step directories in ``root`` (not Orbax's temporary ones)."""
    if not root.is_dir():
        return []
    return [int(c.name) for c in root.iterdir() if c.name.isdigit() and c.is_dir()]


def _complete_steps(root) -> list[int]:
    """The steps of the complete checkpoints in ``root`` (a checkpoints/ folder); Orbax's temporary
    directories of an unfinished save never count."""
    if not root.is_dir():
        return []
    return [int(c.name) for c in root.iterdir() if c.name.isdigit() and _is_step_dir(c)]


def resolve(path: str | Path) -> Path:
    """A checkpoint step directory from a workdir, a ``checkpoints/`` folder or a step directory.

    A workdir or ``checkpoints/`` folder resolves to its newest *complete* checkpoint (Orbax's
    temporary directories of an interrupted save are never candidates).
    """
    p = as_path(path)
    if not p.exists():
        raise UserError(
            f"checkpoint path {str(p)!r} does not exist; pass a workdir or a checkpoint directory."
        )
    if not p.is_dir():
        raise UserError(
            f"checkpoint path {str(p)!r} is a file, not a checkpoint directory; pass a workdir or a "
            "checkpoint directory."
        )
    if _is_step_dir(p):
        return p
    root = p / CHECKPOINTS_DIRNAME if (p / CHECKPOINTS_DIRNAME).is_dir() else p
    steps = []
    for child in root.iterdir():
        if child.is_dir() and child.name.isdigit() and _is_step_dir(child):
            steps.append(int(child.name))
    if not steps:
        raise UserError(
            f"no complete checkpoint under {str(p)!r}; pass a workdir that has trained, or a checkpoint "
            "directory (tagjax import-weights writes one)."
        )
    return root / str(max(steps))


def _checkpointer() -> ocp.Checkpointer:
    _quiet_orbax()
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=_handler_registry()))


@contextlib.contextmanager
def _reading(step_dir: Path):
    """Reads of checkpoint ``step_dir`` for inference: missing files (the trainer's check) or arrays
    that do not restore become one UserError naming the checkpoint and the previous intact one in the
    same folder, instead of an Orbax/TensorStore traceback. Nothing is moved: reading never changes a
    workdir (``tagjax train`` sets a damaged checkpoint aside when it resumes)."""
    try:
        _verify_files(step_dir)
        yield
    except UserError:
        raise
    except Exception as e:
        asyncio_logger = logging.getLogger("asyncio")
        if _UNRETRIEVED_READ_FILTER not in asyncio_logger.filters:
            asyncio_logger.addFilter(_UNRETRIEVED_READ_FILTER)
        gc.collect()  # the failed restore's unawaited reads: their errors are dropped now, not later
        what = (
            str(e)
            if isinstance(e, DamagedCheckpoint)
            else f"checkpoint {step_dir} is damaged: it does not restore ({_one_line(e)})"
        )
        raise UserError(f"{what}; {_instead_of(step_dir)}.") from None


def _instead_of(step_dir: Path) -> str:
    """What to pass instead of damaged ``step_dir``: the newest older step beside it with every file."""
    older = []
    if step_dir.name.isdigit():
        for step in _complete_steps(step_dir.parent):
            with contextlib.suppress(DamagedCheckpoint):
                if step < int(step_dir.name):
                    _verify_files(step_dir.parent / str(step))
                    older.append(step)
    if older:
        return f"pass --checkpoint {step_dir.parent / str(max(older))} to use the previous one"
    return "pass another checkpoint"


def read_metadata(path: str | Path) -> dict:
    """The metadata of the checkpoint at ``path`` (workdir, checkpoints folder or step directory)."""
    step_dir = resolve(path)
    with _reading(step_dir):
        meta = dict(
            _checkpointer().restore(step_dir, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        )
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{step_dir} is not a tagjax checkpoint (no tagjax metadata); pass another path."
        )
    return meta


def _stored_variables_tree(step_dir: Path) -> dict:
    with _reading(step_dir):
        md = _checkpointer().metadata(step_dir).item_metadata["state"]
    tree = md.tree if hasattr(md, "tree") else md
    return {k: tree[k] for k in ("params", "batch_stats") if k in tree}


def _load_variables(
    path: str | Path,
    *,
    drop_head: bool,
    sharding: jax.sharding.Sharding | Callable[[str, Any], jax.sharding.Sharding] | None,
) -> tuple[dict, dict]:
    step_dir = resolve(path)
    meta = read_metadata(step_dir)
    stored = _stored_variables_tree(step_dir)
    if "params" not in stored:
        raise UserError(
            f"{step_dir} holds no model parameters; pass a tagjax training or inference checkpoint."
        )
    if drop_head:
        stored["params"] = {k: v for k, v in stored["params"].items() if k != HEAD}
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(path, leaf):
        if callable(sharding):
            s = sharding(_path_str(path), leaf)
        else:
            s = sharding or default
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=s)

    abstract = jax.tree_util.tree_map_with_path(
        target, stored, is_leaf=lambda x: hasattr(x, "shape")
    )
    restored = _restore_part(step_dir, abstract)
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    return variables, meta


def _restore_part(step_dir: Path, abstract) -> dict:
    """The arrays of ``abstract``'s tree (ShapeDtypeStructs with shardings) read from the checkpoint's
    state; the others (optimizer slots, a head left out) are not read. Damage is one line."""
    with _reading(step_dir):
        return _checkpointer().restore(
            step_dir,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                    partial_restore=True,
                )
            ),
        )["state"]


def load_for_inference(path: str | Path, *, sharding=None) -> tuple[dict, dict]:
    """``(variables, meta)`` for prediction: backbone and hashtag head, ready for ``model.apply``.

    ``path``: a workdir (newest checkpoint), its ``checkpoints/`` folder, or one step directory; trained
    and imported checkpoints alike. Only params and batch stats are read (no optimizer state).
    ``sharding``: where the arrays go; default the first local device. A ``jax.sharding.Sharding`` for
    all arrays (e.g. replicated over a mesh), or ``f(path_str, array_metadata) -> Sharding``.
    ``meta["config"]["model"]`` says which model to build (``models.create(...)``).
    """
    return _load_variables(path, drop_head=False, sharding=sharding)


def load_backbone(path: str | Path, *, sharding=None) -> tuple[dict, dict]:
    """``(variables, meta)`` without the hashtag head ``params["fc"]`` (never read from disk)."""
    return _load_variables(path, drop_head=True, sharding=sharding)


restore_for_prediction = load_for_inference


def restore_backbone(path: str | Path, variables: PyTree) -> tuple[dict, dict]:
    """Transfer: the checkpoint's backbone placed into ``variables`` of a model with a *new* head.

    ``variables`` is the new model's ``init`` output (or abstract ``ShapeDtypeStruct``s with
    shardings); everything but ``params["fc"]`` is replaced by the checkpoint's values, placed with the
    sharding of the corresponding array in ``variables``, and the new head is kept as initialised.
    Raises UserError when the backbones differ (another architecture), naming the first difference.
    """
    step_dir = resolve(path)
    target = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    backbone_target = {
        "params": {k: v for k, v in target["params"].items() if k != HEAD},
        "batch_stats": target["batch_stats"],
    }
    stored = _stored_variables_tree(step_dir)
    stored["params"] = {k: v for k, v in stored.get("params", {}).items() if k != HEAD}
    stored.setdefault("batch_stats", {})
    _check_structure(stored, backbone_target, step_dir)

    def abstract(x):
        s = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0]
        )
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=s)

    abstract_target = jax.tree_util.tree_map(abstract, backbone_target)
    restored = _restore_part(step_dir, abstract_target)
    params = dict(restored["params"])
    if HEAD in target["params"]:
        params[HEAD] = target["params"][HEAD]
    out = dict(variables)
    out["params"] = params
    out["batch_stats"] = restored.get("batch_stats", {})
    return out, read_metadata(step_dir)


def save_inference_checkpoint(
    path: str | Path, variables: Mapping[str, Any], metadata: Mapping[str, Any]
) -> Path:
    """Writes ``{"params", "batch_stats"}`` + metadata as a checkpoint step directory at ``path``.

    For imported weights (tagjax.interop) and exports: the result reads exactly like a trained
    checkpoint through :func:`load_for_inference` / :func:`load_backbone` / :func:`restore_backbone`.
    ``metadata`` must hold ``config`` (a ConfigDict or dict with at least ``model``, so a reader knows
    which model to build); ``vocab_fingerprint`` and e.g. ``source`` are recommended. The write is
    atomic (temporary directory, then rename); an existing ``path`` is refused.
    """
    path = as_path(path)
    if path.exists():
        raise UserError(
            f"{str(path)!r} already exists; choose a new output directory or delete it first."
        )
    config = _config_dict(metadata.get("config"))
    if "model" not in config or "name" not in config.get("model", {}):
        raise ValueError("save_inference_checkpoint: metadata['config'] must include model.name")
    params = variables["params"]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "inference",
        "tagjax_version": __version__,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": 0,
        "images_seen": 0,
        "mesh_shape": None,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "data_state_kind": None,
    }
    if HEAD in params and "kernel" in params[HEAD]:
        meta["num_classes"] = int(np.shape(params[HEAD]["kernel"])[-1])
    meta.update({k: v for k, v in metadata.items() if k != "config"})
    meta["config"] = config
    meta = json.loads(json.dumps(meta, default=str))
    state = {"params": params, "batch_stats": variables.get("batch_stats", {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _checkpointer() as ckptr:
        ckptr.save(
            epath.Path(path),
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
        )
    return path

"""The training loop shared by pretraining (tagjax.train) and fine-tuning (tagjax.transfer).

Both hand :func:`run` a :class:`Loop`: a jitted step ``(state, batch) -> (state, metrics)``, the per-host
batches, an evaluation, a checkpoint manager and a metric writer. Everything else, how long to train and
how often to log, evaluate, checkpoint or profile, comes from the run's ``config.train``, so pretraining
and fine-tuning differ by their step function and their config, never by a second loop.

The pieces, in the order a step meets them:

- :func:`restore_or_init`: the newest checkpoint of the workdir (with the data iterator's position), or a
  fresh state;
- :class:`Profiler`: a ``jax.profiler`` trace of the steps in ``config.train.profile_steps``;
- :class:`NonfiniteGuard`: the host half of the NaN/Inf rule (the step already kept such an update out of
  the state, see ``train.apply_if_finite``): ``nan_policy`` "stop" ends the run saying what to change,
  "skip" counts and goes on, up to ``max_consecutive_nonfinite`` in a row;
- :class:`LogWindow`: the mean step metrics between two log points, written as one "train" row of
  ``metrics.jsonl``/TensorBoard with img/s, img/s/device, MFU and skipped steps, and one progress line
  with the ETA;
- :func:`save_if_due`: a checkpoint every ``checkpoint_every_images`` or on preemption, which then ends
  the loop.

A step's metrics are fetched from the device one step late, so the host never waits for the device
between two steps; only log points, evaluations and the first step (whose wall time is compilation, not
throughput) wait.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from tagjax import models, progress, sharding
from tagjax.checkpoint import CheckpointManager
from tagjax.errors import UserError
from tagjax.metrics_writer import MetricWriter

log = logging.getLogger(__name__)

NAN_POLICIES = ("stop", "skip")
# The evaluation results the progress line shows when present (the JSONL log gets them all).
SHOWN_EVAL_METRICS = (
    "loss",
    "mAP",
    "precision@1",
    "precision@5",
    "recall@5",
    "top1",
    "top5",
    "num_images",
)

# Dense bf16/fp16 matrix peak per chip, FLOP/s, from the vendors' datasheets (without sparsity). Matched as
# substrings of jax's device_kind, first match wins (so "v5 lite" precedes "v5", "PCIe" precedes "H100").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("V100", 125e12),  # fp16 tensor cores (V100 has no bf16)
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU7x", 2307e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """The table's peak for ``device_kind`` (``jax.devices()[0].device_kind``); None if unknown or CPU."""
    for key, flops in PEAK_FLOPS:
        if key.lower() in device_kind.lower():
            return flops
    return None


def say(line: str) -> None:
    """One line for the user on stderr, from process 0 only, without breaking the progress bar."""
    if jax.process_index() == 0:
        progress.say(line)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_duration(seconds: float) -> str:
    """``h:mm:ss``, or "?" when unknown (no throughput measured yet)."""
    if not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------------------------------
# The pieces
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When a step is logged or evaluated. Intervals are in images seen (``config.train.*_images``), so
    they mean the same thing whatever the batch size; 0 turns an interval off."""

    batch_size: int
    num_steps: int  # steps of the whole run: total_images // batch_size
    log_every_images: int
    eval_every_images: int

    @classmethod
    def from_config(cls, train_config) -> Cadence:
        batch_size = int(train_config.batch_size)
        total_images = int(train_config.total_images)
        if total_images < batch_size:
            raise UserError(
                f"config.train.total_images={total_images} is less than one batch of {batch_size}: "
                "raise it."
            )
        return cls(
            batch_size,
            total_images // batch_size,
            int(train_config.log_every_images),
            int(train_config.eval_every_images),
        )

    def crossed(self, step: int, every: int) -> bool:
        """Whether ``step`` is the first step past a multiple of ``every`` images."""
        return (
            every > 0
            and (step * self.batch_size) // every > ((step - 1) * self.batch_size) // every
        )

    def should_log(self, step: int, stop: int) -> bool:
        return self.crossed(step, self.log_every_images) or step == stop

    def should_eval(self, step: int) -> bool:
        """Periodic evaluations; the final one (at ``num_steps``) is the caller's, which reports it."""
        return self.crossed(step, self.eval_every_images) and step != self.num_steps


# Numeric fields of a run's config that must be positive (> 0) or at least zero; checked before any data
# is opened or anything compiled, so a typo is one line, not a crash deep inside the first step.
POSITIVE_FIELDS = ("train.batch_size", "train.total_images", "data.image_size")
NON_NEGATIVE_FIELDS = (
    "optim.base_lr",
    "optim.weight_decay",
    "train.log_every_images",
    "train.eval_every_images",
    "train.checkpoint_every_images",
    "train.eval_max_images",
    "data.num_workers",
)


def _walk(config, prefix: str = ""):
    items = config.items() if hasattr(config, "items") else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _walk(value, name + ".")
        else:
            yield name, value


def validate_config(config) -> None:
    """Raises UserError (one line naming the field) for numbers no run can use: NaN or Inf anywhere in
    the config, a zero or negative batch size, image size or length, a negative learning rate,
    interval or worker count."""
    values = dict(_walk(config))
    for name, value in values.items():
        numbers = value if isinstance(value, tuple | list) else (value,)
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                raise UserError(f"config.{name}={value}: must be a finite number.")
    for name in POSITIVE_FIELDS + NON_NEGATIVE_FIELDS:
        value = values.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name in POSITIVE_FIELDS and value <= 0:
            raise UserError(f"config.{name}={value}: must be greater than 0.")
        if value < 0:
            raise UserError(f"config.{name}={value}: must not be negative.")
    profile_steps = values.get("train.profile_steps") or ()
    try:
        first, last = (int(s) for s in profile_steps) if profile_steps else (0, 1)
    except (TypeError, ValueError):
        first, last = -1, -1
    if not 0 <= first < last:
        raise UserError(
            f"config.train.profile_steps={profile_steps!r}: give two steps (first, last) with "
            "0 <= first < last, e.g. --config.train.profile_steps='(10,15)'."
        )


def prepare_workdir(workdir) -> None:
    """Creates ``workdir`` and checks that it is a writable directory, with one line when not."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file, not a directory; pass a directory.")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".tagjax-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"--workdir {workdir} is not writable ({e.strerror or type(e).__name__}); pass a "
            "directory this user can write to."
        ) from None


def restore_or_init(
    manager: CheckpointManager,
    abstract_state,
    init: Callable[[], Any],
    data_iterator: Any = None,
) -> tuple[Any, int]:
    """``(state, step)``: the workdir's newest checkpoint restored onto ``abstract_state``'s shardings (and
    ``data_iterator`` moved to where that run was), or ``init()`` when the workdir has none.

    When neither works (another experiment's checkpoint, says its UserError; a pretrained trunk that does
    not fit), Orbax's threads and the iterator's prefetch are released before the error propagates, so
    the process can exit.
    """
    try:
        state, _ = manager.restore_latest(abstract_state, data_iterator)
        if state is None:
            state = init()
    except BaseException:
        manager.close()
        close_iterator(data_iterator)
        raise
    return state, int(jax.device_get(state.step))


def close_iterator(iterator: Any) -> None:
    """Stops a grain iterator's prefetch threads / worker processes (no-op for other iterators)."""
    if hasattr(iterator, "close"):
        iterator.close()


class NonfiniteGuard:
    """The host half of the NaN/Inf rule: reads a step's ``nonfinite`` metric and decides whether the run
    goes on. The step itself already kept such an update out of the state (``train.apply_if_finite``)."""

    def __init__(self, policy: str, max_consecutive: int, batch_size: int):
        if policy not in NAN_POLICIES:
            raise UserError(
                f"config.train.nan_policy={policy!r}: choose one of {', '.join(NAN_POLICIES)}."
            )
        self.policy, self.max_consecutive, self.batch_size = policy, max_consecutive, batch_size
        self.skipped = 0  # updates skipped in this run
        self.consecutive = 0

    @classmethod
    def from_config(cls, train_config) -> NonfiniteGuard:
        return cls(
            str(train_config.nan_policy),
            int(train_config.get("max_consecutive_nonfinite", 20)),
            int(train_config.batch_size),
        )

    def passes(self, step: int, metrics: Mapping[str, float]) -> bool:
        """True when step ``step``'s update was finite (its metrics count); raises per the policy."""
        if metrics.get("nonfinite", 0.0) <= 0:
            self.consecutive = 0
            return True
        if self.policy == "stop":
            raise UserError(
                f"the loss, the gradients or the updated state became NaN/Inf at step {step:,} "
                f"({step * self.batch_size:,} images seen; that update was not applied): lower "
                "config.optim.base_lr, set config.optim.grad_clip_norm, or set "
                "config.train.nan_policy=skip to skip such updates."
            )
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "step %d: non-finite loss, gradients or update; update skipped (%d so far)",
            step,
            self.skipped,
        )
        if self.consecutive > self.max_consecutive:
            raise UserError(
                f"{self.consecutive} consecutive updates were NaN/Inf (up to step {step:,}), more than "
                f"config.train.max_consecutive_nonfinite={self.max_consecutive}: the run diverged; "
                "lower config.optim.base_lr or restart from an earlier checkpoint."
            )
        return False


class LogWindow:
    """Step metrics between two log points, and what one log point writes and prints.

    Every counted step's metrics enter the means; only steps after :meth:`restart_clock` enter the
    throughput, so the first step (compilation) and evaluations (:meth:`pause`) are not training speed.
    ``lr`` is the rate of the window's last step (what the run is at now), not a mean.
    """

    def __init__(
        self,
        writer: MetricWriter,
        cadence: Cadence,
        num_devices: int,
        train_flops_per_image: float,
        peak_flops_per_device: float | None,
        bar=None,
    ):
        self.writer, self.cadence, self.bar = writer, cadence, bar
        self.num_devices = num_devices
        self.train_flops_per_image = train_flops_per_image
        self.peak_flops_per_device = peak_flops_per_device
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.last_lr = float("nan")
        self.restart_clock()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()
        self.timed_steps = 0

    def pause(self, seconds: float) -> None:
        """Leaves ``seconds`` of wall time (an evaluation) out of the throughput."""
        self.start += seconds

    def step_done(self) -> None:
        """A step was dispatched: it counts towards the throughput (its metrics come in :meth:`add`)."""
        self.timed_steps += 1

    def add(self, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if key != "nonfinite":
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.last_lr = float(metrics.get("lr", float("nan")))
        self.steps += 1

    def means(self) -> dict[str, float]:
        out = {key: value / max(self.steps, 1) for key, value in self.sums.items()}
        if self.steps and "lr" in out:
            out["lr"] = self.last_lr
        return out

    def emit(self, step: int, skipped: int) -> dict:
        """Writes the window as one "train" row at ``step``, prints the progress line, starts a new
        window; returns the row."""
        batch_size, num_steps = self.cadence.batch_size, self.cadence.num_steps
        seconds = time.perf_counter() - self.start
        metrics = self.means()
        if self.timed_steps and seconds > 0:
            rate = self.timed_steps * batch_size / seconds
            metrics["images_per_second"] = rate
            metrics["images_per_second_per_device"] = rate / self.num_devices
            metrics["step_seconds"] = seconds / self.timed_steps
            if self.peak_flops_per_device:
                metrics["mfu"] = (
                    rate
                    * self.train_flops_per_image
                    / (self.peak_flops_per_device * self.num_devices)
                )
            eta = (num_steps - step) * batch_size / rate
        else:
            eta = float("nan")
        metrics["skipped_steps"] = skipped
        self.writer.write("train", step, step * batch_size, metrics)
        self.writer.flush()
        nan = float("nan")
        parts = [
            f"step {step:,}/{num_steps:,}",
            f"{step * batch_size:,} img",
            f"loss {metrics.get('loss', nan):.4f}",
            f"lr {metrics.get('lr', nan):.4g}",
            f"|g| {metrics.get('grad_norm', nan):.3g}",
        ]
        if "images_per_second" in metrics:
            parts.append(
                f"{metrics['images_per_second']:,.0f} img/s "
                f"({metrics['images_per_second_per_device']:,.0f}/device)"
            )
        parts.append(f"MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "MFU n/a")
        if skipped:
            parts.append(f"skipped {skipped}")
        parts.append(f"ETA {format_duration(eta)}")
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"loss {metrics.get('loss', nan):.3f}", refresh=False)
        say(" | ".join(parts))
        self._reset()
        return metrics


class Profiler:
    """A ``jax.profiler`` trace of steps ``[first, last)`` (``config.train.profile_steps``) written to
    ``directory``, for TensorBoard's or Perfetto's profile viewer; does nothing when no steps are given."""

    def __init__(self, steps, directory):
        steps = tuple(int(s) for s in steps or ())
        self.first, self.last = steps if steps else (None, None)
        self.directory = directory
        self.tracing = False

    def before_step(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after_step(self, done: int, state) -> None:
        if self.tracing and done == self.last:
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
            self.stop()
            say(f"profile of steps {self.first}-{self.last - 1} written to {self.directory}")

    def stop(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def save_if_due(manager: CheckpointManager, step: int, state, data_iterator: Any = None) -> bool:
    """Saves step ``step`` when the manager's cadence (or a preemption) says so; True when the run must
    stop now because a preemption checkpoint was just started.

    Also where a failed background save surfaces: ``manager.check_saves`` raises a one-line UserError
    at the first step boundary after the failure, so the run stops with the previous checkpoint as its
    newest instead of training on without saving."""
    manager.check_saves()
    if manager.should_save(step):
        manager.save(step, state, data_iterator)
        if manager.preempted:
            say(f"preempted: checkpoint at step {step:,} saved; stopping.")
            return True
    return False


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
    """What a run hands to :func:`run`; how long and how often come from ``config.train``."""

    config: Any  # the run's config (train.*, model and data.image_size for the FLOPs estimate)
    step_fn: (
        Callable  # jitted (state, global batch) -> (state, float32 scalar metrics incl. nonfinite)
    )
    batches: Iterator[Mapping]  # per-host numpy batches, one per step, from the state's step on
    batch_keys: tuple[str, ...]  # the fields of a batch the step reads
    mesh: Mesh
    num_classes: int  # of the model's head (for the FLOPs estimate behind MFU)
    manager: CheckpointManager
    writer: MetricWriter
    workdir: Path  # where profile/ goes
    # Saved with every checkpoint (a grain iterator's state); None when the data position is the step.
    data_iterator: Any = None
    # state -> metrics of a held-out evaluation, logged every config.train.eval_every_images.
    evaluate: Callable[[Any], dict] | None = None
    progress: bool | None = None  # the bar (process 0; None: when stderr is a terminal)


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int  # the state's step at the end (below num_steps when stopped early or preempted)
    train: dict  # the last log window's metrics
    eval: dict  # the last periodic evaluation's metrics ({} if none ran)
    skipped_steps: int  # non-finite updates skipped in this run
    preempted: bool = False  # stopped early by a preemption (SIGTERM), its checkpoint saved


def evaluate_and_log(loop: Loop, state, step: int, window: LogWindow | None = None) -> dict:
    """Runs ``loop.evaluate`` and logs it as an "eval" row at ``step`` and one line; the time it takes
    is left out of ``window``'s throughput."""
    start = time.perf_counter()
    result = dict(loop.evaluate(state))
    result["seconds"] = time.perf_counter() - start
    if window is not None:
        window.pause(result["seconds"])
    batch_size = int(loop.config.train.batch_size)
    loop.writer.write("eval", step, step * batch_size, result)
    shown = [f"{k} {format_value(result[k])}" for k in SHOWN_EVAL_METRICS if k in result]
    say(f"eval at step {step:,}: " + ", ".join(shown))
    return result


def run(loop: Loop, state, stop_step: int | None = None) -> LoopResult:
    """Trains ``state`` from its step to ``stop_step`` (default: the end of the run), then saves it.

    The final evaluation is left to the caller, which knows what to report; periodic ones run here.
    """
    config = loop.config
    cadence = Cadence.from_config(config.train)
    batch_size, num_steps = cadence.batch_size, cadence.num_steps
    start = int(jax.device_get(state.step))
    stop = num_steps if stop_step is None else min(int(stop_step), num_steps)
    guard = NonfiniteGuard.from_config(config.train)
    profiler = Profiler(config.train.get("profile_steps", ()), loop.workdir / "profile")
    bar = progress.progress_bar(
        total=num_steps * batch_size,
        initial=start * batch_size,
        unit="img",
        unit_scale=True,
        # None: off when stderr is not a terminal (log files)
        enabled=loop.progress if jax.process_index() == 0 else False,
    )
    window = LogWindow(
        loop.writer,
        cadence,
        loop.mesh.devices.size,
        3.0 * models.flops_per_image(config.model, int(config.data.image_size), loop.num_classes),
        peak_flops_per_device(jax.devices()[0].device_kind),
        bar,
    )
    last_train: dict = {}
    last_eval: dict = {}
    preempted = False
    pending: tuple[int, Any] | None = None  # (step number, device metrics) not fetched yet

    def collect(step: int, device_metrics) -> None:
        """Fetches a finished step's metrics, through the guard, into the window."""
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if guard.passes(step, metrics):
            window.add(metrics)

    loop_start = time.perf_counter()
    try:
        for step in range(start, stop):
            profiler.before_step(step)
            local = next(loop.batches)
            batch = sharding.global_batch({k: local[k] for k in loop.batch_keys}, loop.mesh)
            state, metrics = loop.step_fn(state, batch)
            if pending is not None:
                collect(*pending)  # the previous step: fetching it lets this one run meanwhile
            pending = (step + 1, metrics)
            done = step + 1
            window.step_done()
            bar.update(batch_size)
            profiler.after_step(done, state)
            if step == start:  # its wall time is compilation: measure it, keep it out of img/s
                collect(*pending)
                pending = None
                window.restart_clock()
                compile_seconds = time.perf_counter() - loop_start
                loop.writer.write(
                    "train", done, done * batch_size, {"compile_seconds": compile_seconds}
                )
            if cadence.should_log(done, stop):
                if pending is not None:
                    collect(*pending)
                    pending = None
                last_train = window.emit(done, guard.skipped)
            if loop.evaluate is not None and cadence.should_eval(done):
                last_eval = evaluate_and_log(loop, state, done, window)
            if save_if_due(loop.manager, done, state, loop.data_iterator):
                preempted = True
                break
        if pending is not None:
            collect(*pending)
        profiler.stop()
        final_step = int(jax.device_get(state.step))
        loop.manager.save(final_step, state, loop.data_iterator)  # no-op if just saved
    finally:
        bar.close()
    return LoopResult(state, final_step, last_train, last_eval, guard.skipped, preempted)

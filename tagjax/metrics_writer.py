"""Training metrics to ``<workdir>/metrics.jsonl`` and TensorBoard event files in ``<workdir>/tensorboard``.

One JSON object per line: ``{"step", "images_seen", "time", "split", <metric>: value, ...}``; ``split`` is
"train" or "eval". The JSONL log is the record a script reads (plots, tests, comparisons across runs);
TensorBoard is for watching. TensorBoard's x axis is *images seen* (runs with different batch sizes line
up), under ``train/<metric>`` and ``eval/<metric>`` (``@`` spelled ``_at_``: ``eval/precision_at_1``).
Values that are not finite are written as ``null`` in the JSONL log and left out of TensorBoard.

Only process 0 writes. A resumed run passes the step it restored: lines and events logged after that
step by the interrupted run are dropped, so the log of a resumed run reads as one uninterrupted run.

The workdir may be a local path or a URL (``gs://bucket/run`` on Cloud TPU; needs ``gcsfs`` for the JSONL
and ``google-cloud-storage`` for TensorBoard). Object stores cannot append, so there the JSONL log is kept
in memory and rewritten at every ``flush`` (each log interval); locally each line is appended at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from etils import epath
from tensorboardX import SummaryWriter

from tagjax.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def as_path(path: str | os.PathLike):
    """An absolute local ``pathlib.Path`` (``~`` expanded), or an ``etils.epath.Path`` for URLs such as
    gs://. Every library entry point taking a path from a user calls this once: Orbax refuses relative
    paths, and a relative one would change meaning with the working directory."""
    if "://" in str(path):
        return epath.Path(str(path))
    return Path(path).expanduser().absolute()


def is_remote(path) -> bool:
    return "://" in str(path)


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """The JSONL log of a run as a list of dicts (optionally only one split).

    A last line cut short (a run killed mid-write on a filesystem that tears appends, or a full disk)
    is left out with a warning; a bad line anywhere else is a UserError naming it."""
    path = as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = _parse_rows(path)
    return [r for r in rows if split is None or r.get("split") == split]


def _parse_rows(path) -> list[dict]:
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(
                    f"{path} line {number} is not JSON; repair or remove that line."
                ) from None
            log.warning("%s: its last line is incomplete (cut off mid-write); ignored", path)
    return rows


def _write_atomically(path, text: str) -> None:
    """Replaces ``path`` by ``text`` all at once: a reader (or a crash) sees the old or the new file."""
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value):
    value = float(value) if not isinstance(value, int | str | bool) else value
    if isinstance(value, float) and not math.isfinite(value):
        return (
            None  # strict JSON has no NaN/Inf (e.g. precision@1 of a bucket no prediction fell in)
        )
    return value


def _tb_tag(name: str) -> str:
    """TensorBoard allows [A-Za-z0-9_./-] in tags: ``precision@1`` -> ``precision_at_1``."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name.replace("@", "_at_"))


class MetricWriter:
    """Appends metric rows to the JSONL log and TensorBoard. A no-op when ``enabled`` is False."""

    def __init__(
        self, workdir: str | Path, *, enabled: bool = True, resume_step: int | None = None
    ):
        self.enabled = enabled
        self.path = as_path(workdir) / METRICS_FILE
        self._remote = is_remote(workdir)
        self._rows: list[dict] = []  # remote workdirs: the whole log, rewritten at each flush
        self._tb = None
        self._fd: int | None = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resume_images = None
        kept = _parse_rows(self.path) if self.path.exists() else []
        if resume_step is not None:
            dropped = sum(int(r.get("step", 0)) > resume_step for r in kept)
            kept = [r for r in kept if int(r.get("step", 0)) <= resume_step]
            if self.path.exists():
                _write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            if dropped:
                log.info(
                    "%s: %d rows logged after step %d dropped", self.path, dropped, resume_step
                )
            resume_images = max(
                (int(r["images_seen"]) for r in kept if "images_seen" in r), default=0
            )

        # TensorBoard: each run writes a fresh event file; purge_step records in it that events at or
        # past the resume point from earlier files are to be dropped, which TensorBoard does when it
        # reads the directory (other readers must apply the same rule: for each tag, keep only the
        # newest file's events from the purge step on).
        self._tb = SummaryWriter(
            str(as_path(workdir) / TENSORBOARD_DIR),
            purge_step=None if resume_images is None else resume_images + 1,
            flush_secs=30,
        )
        if self._remote:
            self._rows = kept
        else:
            # O_APPEND and one os.write per row: each line lands whole (a killed run keeps every
            # line written before, never half of one).
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, split: str, step: int, images_seen: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {
            "split": split,
            "step": int(step),
            "images_seen": int(images_seen),
            "time": round(time.time(), 3),
        }
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        if self._remote:
            self._rows.append(row)
        else:
            data = (json.dumps(row) + "\n").encode()
            written = os.write(self._fd, data)
            if written != len(data):  # a full disk: finish the line or fail, never leave half
                os.write(self._fd, data[written:])
        for key, value in metrics.items():
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                self._tb.add_scalar(
                    _tb_tag(f"{split}/{key}"), float(value), global_step=int(images_seen)
                )

    def write_text(self, tag: str, text: str) -> None:
        """A text panel in TensorBoard (the resolved config, the command line)."""
        if self.enabled:
            self._tb.add_text(tag, text)

    def flush(self) -> None:
        if self.enabled:
            if self._remote:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self._rows))
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._tb.close()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

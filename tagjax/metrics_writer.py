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
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

from etils import epath
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def as_path(path: str | os.PathLike):
    """A local ``pathlib.Path`` (``~`` expanded), or an ``etils.epath.Path`` for URLs such as gs://."""
    if "://" in str(path):
        return epath.Path(str(path))
    return Path(path).expanduser()


def is_remote(path) -> bool:
    return "://" in str(path)


def read_metrics(workdir: str | Path, split: str | None = None) -> list[dict]:
    """The JSONL log of a run as a list of dicts (optionally only one split)."""
    path = as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if split is None or r.get("split") == split]


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
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resume_images = None
        kept = read_metrics(workdir) if self.path.exists() else []
        if resume_step is not None and kept:
            kept = [r for r in kept if int(r.get("step", 0)) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            resume_images = max(
                (int(r["images_seen"]) for r in kept if "images_seen" in r), default=0
            )

        # purge_step drops events logged past the restored point by the interrupted run.
        self._tb = SummaryWriter(
            str(as_path(workdir) / TENSORBOARD_DIR),
            purge_step=None if resume_images is None else resume_images + 1,
            flush_secs=30,
        )
        if self._remote:
            self._rows = kept
        else:
            self._file = self.path.open(
                "a", buffering=1
            )  # line-buffered: a killed run keeps its lines

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
            self._file.write(json.dumps(row) + "\n")
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
            else:
                self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._file is not None:
                self._file.close()
            self._tb.close()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

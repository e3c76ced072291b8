"""Error of the streamed average precision (tagjax.metrics.StreamingMetricsAccumulator) against the exact
one, and the host memory each keeps, on real and on synthetic evaluation sets.

* ``real``: the demo's corpus (Debian's openclipart-svg, built by ``tagjax build openclipart``), every
  record of the dataset, scored by a nearest-class-mean classifier on 16x16 pixel thumbnails (softmax over
  negative squared distances to each label's mean thumbnail): real label statistics, real (weak) scores.
* ``synthetic``: Zipfian label frequencies (exponent 1) over ``--labels`` labels, ~2 labels per image,
  softmax scores of logits ``N(0, 2^2)`` with the true labels' logits raised by 2.5 (a weak model: mAP
  ~0.02, many positives among dense negatives, the hard case for binning).

For each set and each bin count: exact mAP, streamed mAP, |difference|, the largest per-label AP
difference, and the host memory of both accumulators. Run::

    python benchmarks/streamed_ap.py [--dataset DIR] [--images 20000] [--labels 1500]

Recorded on the project's 2-core build machine (2026-11-30) with the default arguments: the table is in
docs/evaluation.md ("Exact or streamed: host memory").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

from tagjax import metrics, records
from tagjax import vocab as vocab_lib

BATCH = 256


def real_set(dataset: Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, L], labels [N, M]) of every record of ``dataset`` under the thumbnail classifier."""
    manifest = records.load_manifest(dataset)
    num_labels = vocab_lib.Vocabulary.load(dataset / manifest.vocab_file).num_labels
    thumbs, lists = [], []
    for split in manifest.splits:
        for path in manifest.shard_paths(dataset, split):
            for data in records.read_shard(path):
                r = records.decode(data)
                image = cv2.imdecode(np.frombuffer(r.image, np.uint8), cv2.IMREAD_COLOR)
                thumbs.append(cv2.resize(image, (16, 16), interpolation=cv2.INTER_AREA).ravel())
                lists.append(r.labels)
    x = np.asarray(thumbs, np.float32) / 255.0
    labels = np.full((len(lists), max(map(len, lists))), -1, np.int32)
    for i, ids in enumerate(lists):
        labels[i, : len(ids)] = ids
    sums = np.zeros((num_labels, x.shape[1]), np.float32)
    counts = np.zeros(num_labels, np.float32)
    for i, ids in enumerate(lists):
        sums[list(ids)] += x[i]
        counts[list(ids)] += 1
    means = sums / np.maximum(counts, 1)[:, None]
    d2 = (x**2).sum(1)[:, None] - 2 * x @ means.T + (means**2).sum(1)[None, :]
    return metrics.scores_from_logits(-d2 / 4.0), labels


def synthetic_set(n: int, num_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_labels + 1)
    p /= p.sum()
    k = np.clip(rng.poisson(1.0, n) + 1, 1, 4)
    labels = np.full((n, 4), -1, np.int32)
    logits = 2 * rng.normal(size=(n, num_labels)).astype(np.float32)
    for i in range(n):
        ids = np.unique(rng.choice(num_labels, k[i], p=p))
        labels[i, : len(ids)] = ids
        logits[i, ids] += 2.5
    return metrics.scores_from_logits(logits), labels


def compare(name: str, scores: np.ndarray, labels: np.ndarray, bins_list) -> list[str]:
    n, num_labels = scores.shape
    exact = metrics.hashtag_metrics(scores, labels)
    rows = []
    for bins in bins_list:
        acc = metrics.StreamingMetricsAccumulator(num_labels, bins=bins)
        for a in range(0, n, BATCH):
            acc.update(scores[a : a + BATCH], labels[a : a + BATCH])
        got = acc.result()
        per_label = np.nanmax(np.abs(got["per_label_ap"] - exact["per_label_ap"]))
        hist_mb = num_labels * bins * 4 / 1e6
        kept_mb = n * (labels.shape[1] * 8 + 5 * 5) / 1e6  # ids + positive scores + top-5 ids/hits
        rows.append(
            f"| {name} | {n:,} x {num_labels:,} | {bins} | {exact['mAP']:.5f} | {got['mAP']:.5f} | "
            f"{abs(got['mAP'] - exact['mAP']):.1e} | {per_label:.1e} | "
            f"{hist_mb + kept_mb:.1f} MB | {n * num_labels * 4 / 1e6:.1f} MB |"
        )
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", type=Path, default=None, help="a built dataset (default: build one)"
    )
    parser.add_argument("--images", type=int, default=20_000, help="synthetic images")
    parser.add_argument("--labels", type=int, default=1_500, help="synthetic labels")
    parser.add_argument("--bins", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    dataset = args.dataset
    if dataset is None:
        dataset = Path("/tmp/tagjax-streamed-ap-openclipart")
        if not (dataset / records.MANIFEST).is_file():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tagjax.cli",
                    "build",
                    "openclipart",
                    "--output",
                    str(dataset),
                    "--max-side",
                    "64",
                    "--limit",
                    "3000",
                    "--no-progress",
                    "--overwrite",
                ],
                check=True,
            )
    print(
        "| set | images x labels | bins | exact mAP | streamed mAP | mAP error | max per-label AP error | streamed host memory | exact host memory |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    compare("openclipart, thumbnail classifier", *real_set(dataset), args.bins)
    compare("synthetic Zipfian", *synthetic_set(args.images, args.labels), args.bins)
    return 0


if __name__ == "__main__":
    sys.exit(main())

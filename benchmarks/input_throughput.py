"""Decoded + augmented training images per second per CPU core, tagjax against a plain PIL baseline.

The shards are written the way `tagjax build` writes them by default (tagjax.images.ImageOptions():
RGB baseline JPEG, 4:2:0, quality 90, shorter side 256), from the real photographs that ship with
Debian's tuxpaint templates and matplotlib's sample data, cut at random crops and scales so the set has
varied sizes and content. Every number comes from one process on one core (OpenCV single-threaded, no
grain workers), in the same run:

* ``baseline``: PIL ``Image.open`` + ``convert("RGB")`` + random-resized-crop with PIL's bilinear
  ``resize(box=...)`` + flip, to a uint8 array (no draft mode): what a straightforward pipeline does.
* ``tagjax augment``: ``tagjax.augment.train_image`` on the same JPEG bytes and the same crop windows
  (simplejpeg with DCT-scaled decoding where the crop allows, OpenCV resize into the batch buffer).
* ``tagjax pipeline``: the whole training iterator (``make_train_iterator``, hashtag resampling, ArrayRecord
  reads, record decoding, labels, batching) with ``num_workers=0``: its prefetch thread does all the work.
* ``baseline pipeline``: the same iterator with its decode + augment step swapped for the baseline's, so
  the end-to-end comparison carries the same reading and batching costs on both sides.

Rates are images per wall-clock second and per CPU-second of the process (the machine may be shared; the
CPU-time rate is the per-core cost). Run::

    python benchmarks/input_throughput.py [--images 512] [--seconds 5] [--size 224]
"""

from __future__ import annotations

import argparse
import glob
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags
from PIL import Image

from tagjax import augment, images, input_pipeline, records, sampling
from tagjax import vocab as vocab_lib
from tagjax.configs import default

PHOTOS = [
    *sorted(glob.glob("/usr/share/tuxpaint/templates/*.jpg")),
    *sorted(
        glob.glob(
            str(
                Path(sys.prefix)
                / "lib/python3*/site-packages/matplotlib/mpl-data/sample_data/*.jpg"
            )
        )
    ),
]
NOUNS = ["dog", "cat", "car", "tree", "house", "bird", "flower", "boat", "horse", "chair"]


def build_records(n: int, seed: int = 0) -> list[bytes]:
    """``n`` JPEGs as `tagjax build` stores them: random crops (40-100% side) of the photos, processed."""
    if not PHOTOS:
        raise SystemExit("no source photos found (install Debian's tuxpaint-data or matplotlib)")
    rng = np.random.default_rng(seed)
    sources = [Image.open(p).convert("RGB") for p in PHOTOS]
    opts = images.ImageOptions()
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        f = rng.uniform(0.4, 1.0)
        cw, ch = max(300, int(w * f)), max(300, int(h * rng.uniform(0.7, 1.0) * f))
        cw, ch = min(cw, w), min(ch, h)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        src.crop((x, y, x + cw, y + ch)).save(buf, format="JPEG", quality=95)
        out.append(images.process(buf.getvalue(), opts).jpeg)
    return out


def write_dataset(root: Path, jpegs: list[bytes]) -> None:
    vocab = vocab_lib.build_vocabulary({t: 100 - i for i, t in enumerate(NOUNS)}, mode="nouns")
    vocab.save(root / "vocab.json")
    rng = np.random.default_rng(1)
    lists = [
        sorted(set(rng.integers(0, vocab.num_labels, size=rng.integers(1, 4)).tolist()))
        for _ in jpegs
    ]
    encoded = [
        records.encode(records.Record(str(i), j, tuple(lab)))
        for i, (j, lab) in enumerate(zip(jpegs, lists))
    ]
    name = records.shard_name("train", 0, 1)
    records.write_shard(root / name, encoded)
    records.LabelStore.write(root, "train", lists, vocab.num_labels)
    splits = {"train": {"shards": [name], "num_records": len(jpegs)}}
    records.Manifest(records.SCHEMA_VERSION, splits, vocab_fingerprint=vocab.fingerprint()).save(
        root
    )


def pil_baseline(data: bytes, u: np.ndarray, aug: augment.TrainAugment) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    top, left, ch, cw = augment.crop_window(h, w, u, aug.area_range, aug.aspect_range)
    im = im.resize(
        (aug.size, aug.size), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
    )
    if u[augment._U_FLIP] < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def timed(fn, seconds: float) -> tuple[float, float, int]:
    """(images per wall second, images per CPU second, images) for ``fn() -> images done``."""
    fn()  # warm-up
    n, w0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - w0 < seconds:
        n += fn()
    return n / (time.perf_counter() - w0), n / (time.process_time() - c0), n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512, help="records in the benchmark shard")
    p.add_argument("--seconds", type=float, default=5.0, help="timing length of each measurement")
    p.add_argument("--size", type=int, default=224, help="output side in pixels")
    p.add_argument("--batch", type=int, default=256, help="host batch of the pipeline measurement")
    p.add_argument(
        "--workers", type=int, default=0, help="also time the pipeline with this many workers"
    )
    args = p.parse_args(argv)
    flags.FLAGS.mark_as_parsed()

    t0 = time.perf_counter()
    jpegs = build_records(args.images)
    sizes = np.asarray([augment._header(j) for j in jpegs])
    print(
        f"{len(jpegs)} records as `tagjax build` writes them: shorter side {sizes.min(1).min()}-"
        f"{sizes.min(1).max()} px, longer side up to {sizes.max()}, mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB "
        f"({time.perf_counter() - t0:.1f} s to prepare)"
    )
    cfg = default.get_config()
    cfg.data.image_size = args.size
    aug = augment.TrainAugment.from_config(cfg.data)
    u = sampling.uniforms(0, sampling.STREAM_AUGMENT, np.arange(len(jpegs)), augment.NUM_UNIFORMS)
    out = np.empty((args.size, args.size, 3), np.uint8)

    def run_baseline():
        for j, data in enumerate(jpegs):
            pil_baseline(data, u[j], aug)
        return len(jpegs)

    def run_augment():
        for j, data in enumerate(jpegs):
            augment.train_image(data, out, u[j], aug)
        return len(jpegs)

    results = {}
    for name, fn in (("baseline (PIL)", run_baseline), ("tagjax augment", run_augment)):
        results[name] = timed(fn, args.seconds)

    def pil_into(data, out_slice, u_row, aug_):  # the baseline, shaped like augment.train_image
        out_slice[...] = pil_baseline(data, u_row, aug_)

    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp), jpegs)
        cfg.data.dataset = tmp
        cfg.data.num_workers = 0
        cfg.train.batch_size = args.batch

        def pipeline_rate(workers: int):
            cfg.data.num_workers = workers
            it = input_pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
            rate = timed(lambda: len(next(it)["image"]), args.seconds)
            it.close()
            return rate

        fast_train_image = augment.train_image
        augment.train_image = pil_into  # the same iterator with the baseline's decode + augment
        try:
            results["baseline pipeline"] = pipeline_rate(0)
        finally:
            augment.train_image = fast_train_image
        results["tagjax pipeline"] = pipeline_rate(0)
        if args.workers:
            wall, _, n = pipeline_rate(args.workers)
            workers_line = (
                f"\ntagjax pipeline with {args.workers} grain worker processes: {wall:,.0f} img/s "
                f"in total (wall clock, {n} images)"
            )

    print(f"\n{args.size}px random-resized-crop + flip, one process, one core:\n")
    print("| | img/s (wall) | img/s per CPU-second | vs its baseline (CPU) |")
    print("|---|---|---|---|")
    for name, (wall, cpu, _) in results.items():
        base = results["baseline pipeline" if "pipeline" in name else "baseline (PIL)"][1]
        print(f"| {name} | {wall:,.0f} | {cpu:,.0f} | {cpu / base:.2f}x |")
    if args.workers:
        print(workers_line)


if __name__ == "__main__":
    main()

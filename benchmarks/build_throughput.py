"""Local builder throughput: posts per second, and per core, for `tagjax build`.

Generates a synthetic corpus of photo-sized JPEGs (a JSONL manifest with hashtags, one image per post),
builds it with 1 worker and with N workers, and reports posts/s for the whole build and for the image
stage alone (decode + resize + JPEG + hashes), divided by the number of worker processes.

    .venv/bin/python benchmarks/build_throughput.py --posts 2000 --size 640x480 --max-side 256 --workers 1 2
    .venv/bin/python benchmarks/build_throughput.py --openclipart --max-side 96 --workers 2

With --openclipart the real corpus is built instead (rasterized SVGs come from the cache after the first
run; pass --raster-cache '' to measure cold rasterization).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tagjax import build, build_steps, images

TAGS = [
    "dog",
    "cat",
    "beach",
    "car",
    "tree",
    "house",
    "boat",
    "flower",
    "bird",
    "horse",
    "mountain",
    "bridge",
    "pizza",
    "guitar",
    "bicycle",
    "train",
    "castle",
    "sunset",
    "lake",
    "forest",
]


def make_corpus(root: Path, n: int, width: int, height: int, seed: int = 0) -> Path:
    """Photo-like JPEGs: smooth colour fields plus texture noise (so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    lines = []
    for i in range(n):
        f = rng.uniform(0.005, 0.03, 3)
        ph = rng.uniform(0, 6.3, 3)
        base = 128 + 90 * np.sin(x[..., None] * f + ph) * np.cos(y[..., None] * f[::-1] + ph[::-1])
        noise = rng.normal(0, 12, (height, width, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (root / "img" / f"{i:06d}.jpg").write_bytes(buf.getvalue())
        tags = list(rng.choice(TAGS, size=int(rng.integers(1, 4)), replace=False))
        lines.append(
            json.dumps(
                {
                    "id": f"post{i:06d}",
                    "image": f"img/{i:06d}.jpg",
                    "tags": tags,
                    "user": f"user{i % 97}",
                    "public": True,
                }
            )
        )
    (root / "posts.jsonl").write_text("\n".join(lines) + "\n")
    return root / "posts.jsonl"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=2000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--max-side", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--openclipart", action="store_true")
    ap.add_argument("--raster-cache", default=None)
    ap.add_argument("--corpus-dir", default=None, help="keep the generated corpus here for re-runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.openclipart:
            inputs = ("openclipart",)
        else:
            w, h = (int(v) for v in args.size.split("x"))
            corpus = Path(args.corpus_dir or tmp) / f"tagjax-bench-{args.posts}-{w}x{h}"
            if not (corpus / "posts.jsonl").is_file():
                t0 = time.time()
                make_corpus(corpus, args.posts, w, h)
                print(f"generated {args.posts} {w}x{h} JPEGs in {time.time() - t0:.1f}s")
            inputs = (f"jsonl:{corpus / 'posts.jsonl'}",)
        for workers in args.workers:
            cfg = build_steps.BuildConfig(
                inputs=inputs,
                output=str(tmp / f"out{workers}"),
                workers=workers,
                progress=False,
                images=images.ImageOptions(max_side=args.max_side),
                raster_cache=args.raster_cache,
            )
            t0 = time.time()
            stats = build.build(cfg)
            total = time.time() - t0
            attempted = stats["images"]["attempted"]
            img_s = stats["timing_s"]["images"]
            print(
                f"workers={workers}: {stats['posts_read']} posts read, {attempted} images, "
                f"{stats['posts_written']} written; total {total:.1f}s = {stats['posts_read'] / total:.0f} "
                f"posts/s ({stats['posts_read'] / total / workers:.0f} per core); image stage "
                f"{img_s:.1f}s = {attempted / img_s:.0f} img/s ({attempted / img_s / workers:.0f} per core); "
                f"phases {stats['timing_s']}"
            )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

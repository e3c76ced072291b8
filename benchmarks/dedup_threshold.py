"""Tunes the near-duplicate Hamming threshold on real openclipart cliparts.

Two distance distributions decide the threshold:

* copies: every clipart against a resized (50-80%) and JPEG-recompressed (quality 60-85) copy of
  itself, the kind of copy a re-upload makes: the threshold should catch nearly all of them;
* distinct cliparts: every pair of different files in the corpus. Some of those pairs *are* near
  duplicates (recoloured variants, the same drawing exported twice), so the pair count under each
  threshold is reported with sample pairs written to a contact sheet for inspection.

    .venv/bin/python benchmarks/dedup_threshold.py --side 96 --workers 2 [--limit N] [--sheet out.png]

Rasterizations go through the same cache as `tagjax build`, so the first run pays for cairosvg once.
``--images GLOB`` hashes raster files instead (e.g. the raster cache's PNGs, or photo stamps), and
``--hash lanczos`` uses the perceptual hash tagjax had before its 64 px area pre-reduction (one Lanczos
pass from the stored image to 32x32), so the two can be compared on the same images:

    .venv/bin/python benchmarks/dedup_threshold.py --images '/usr/share/tuxpaint/stamps/**/*.png' \
        --side 256 --hash lanczos
"""

from __future__ import annotations

import argparse
import glob
import io
import multiprocessing as mp
import time

import numpy as np
from PIL import Image, ImageDraw

from tagjax import dedup, images, posts


def _lanczos_phash(pixels: np.ndarray) -> int:
    """The previous tagjax.dedup.phash: grayscale, one Lanczos pass to 32x32, DCT, median bits."""
    gray = Image.fromarray(np.asarray(pixels, np.uint8)).convert("L")
    x = np.asarray(gray.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (dedup._DCT @ x @ dedup._DCT.T)[:8, :8].ravel()
    return int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")


HASHES = {"current": dedup.phash, "lanczos": _lanczos_phash}


def _hash_one(args):
    post, side, cache_dir, seed, hash_name = args
    phash = HASHES[hash_name]
    opts = images.ImageOptions(max_side=side, min_side=1, max_aspect=1000)
    try:
        data = posts.load_image_bytes(post, side, posts.RasterCache(cache_dir))
        p = images.process(data, opts)
    except images.ImageSkip:
        return None
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 0.8)
    copy = Image.fromarray(p.pixels).resize(
        (max(8, round(p.width * scale)), max(8, round(p.height * scale))), Image.Resampling.BILINEAR
    )
    buf = io.BytesIO()
    copy.save(buf, "JPEG", quality=int(rng.integers(60, 86)))
    q = images.process(buf.getvalue(), opts)
    return post.post_id, phash(p.pixels), phash(q.pixels), p.jpeg, post.user


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=posts.OPENCLIPART_ROOT)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache", default=str(posts.default_raster_cache()))
    ap.add_argument("--sheet", default="")
    ap.add_argument(
        "--apart",
        default="codifiedivining",
        help="creator whose collection is also reported apart (openclipart's ~1.4k machine-"
        "generated spirograph stars: thin radial lines with almost no low-frequency "
        "structure, the worst case for a DCT hash)",
    )
    ap.add_argument(
        "--images", default="", help="glob of raster files to use instead of openclipart"
    )
    ap.add_argument("--hash", choices=sorted(HASHES), default="current")
    args = ap.parse_args()

    if args.images:
        paths = sorted(glob.glob(args.images, recursive=True))
        items = [posts.Post(post_id=p, image_path=p) for p in paths]
    else:
        items = [p for p in posts.read_openclipart(args.root) if p.problem is None]
    if args.limit:
        items = items[: args.limit]
    t0 = time.time()
    jobs = [(p, args.side, args.cache, i, args.hash) for i, p in enumerate(items)]
    with mp.get_context("forkserver").Pool(args.workers) as pool:
        results = [r for r in pool.imap(_hash_one, jobs, chunksize=8) if r is not None]
    print(f"{len(results)} cliparts hashed in {time.time() - t0:.0f}s")
    ids = [r[0] for r in results]
    h = np.array([r[1] for r in results], dtype=np.uint64)
    hc = np.array([r[2] for r in results], dtype=np.uint64)
    copy_d = np.bitwise_count(h ^ hc)
    n = len(h)
    pairs_total = n * (n - 1) // 2
    hist = np.zeros(65, np.int64)
    for i in range(0, n, 512):
        block = np.bitwise_count(h[i : i + 512, None] ^ h[None, :])
        rows = np.arange(i, min(i + 512, n))[:, None]
        upper = np.arange(n)[None, :] > rows
        hist += np.bincount(block[upper].ravel(), minlength=65)
    cum = np.cumsum(hist)
    print("t  copies<=t  distinct-pairs<=t  (fraction of all pairs)  images-with-a-neighbour<=t")
    for t in range(0, 17):
        pairs = dedup.near_pairs(h, t)
        touched = len(np.unique(pairs[:, :2])) if len(pairs) else 0
        print(
            f"{t:2d}  {np.mean(copy_d <= t):8.4f}  {cum[t]:10d}  ({cum[t] / pairs_total:.2e})  "
            f"{touched:6d} ({touched / n:.3f})"
        )
    print(
        "copy distance percentiles 50/90/99/max:",
        np.percentile(copy_d, [50, 90, 99]).tolist(),
        int(copy_d.max()),
    )
    users = np.array([r[4] for r in results])
    rest = users != args.apart
    print(f"\nwithout the {(~rest).sum()} images of {args.apart!r} ({rest.sum()} images):")
    print("t  copies<=t  distinct-pairs<=t  images-with-a-neighbour<=t")
    for t in range(0, 13, 2):
        pairs = dedup.near_pairs(h[rest], t)
        touched = len(np.unique(pairs[:, :2])) if len(pairs) else 0
        print(
            f"{t:2d}  {np.mean(copy_d[rest] <= t):8.4f}  {len(pairs):10d}  {touched:6d} ({touched / rest.sum():.3f})"
        )
    print(f"{args.apart!r} alone: copies<=4 {np.mean(copy_d[~rest] <= 4):.4f}")
    if args.sheet:
        jpeg = {r[0]: r[3] for r in results}
        rows = []
        rng = np.random.default_rng(0)
        for t in (0, 2, 4, 6, 8, 10, 12):
            pairs = dedup.near_pairs(h, t)
            pairs = pairs[pairs[:, 2] == t]
            pick = pairs[rng.permutation(len(pairs))[:6]] if len(pairs) else []
            rows.append((t, [(ids[a], ids[b]) for a, b, _ in pick]))
        cell = args.side
        sheet = Image.new("RGB", (40 + 6 * (2 * cell + 12), len(rows) * (cell + 8)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, (t, prs) in enumerate(rows):
            y = r * (cell + 8)
            draw.text((4, y + cell // 2), f"d={t}", fill="black")
            for c, (a, b) in enumerate(prs):
                x = 40 + c * (2 * cell + 12)
                for k, pid in enumerate((a, b)):
                    im = Image.open(io.BytesIO(jpeg[pid]))
                    im.thumbnail((cell, cell))
                    sheet.paste(im, (x + k * cell, y))
        sheet.save(args.sheet)
        print("contact sheet:", args.sheet)


if __name__ == "__main__":
    main()

"""The data path at internet scale, in simulation: label store, sampler index, time and memory to the first
training batch, sampler draws/s, at 10^6 .. 10^8 images, with the per-image costs and a fit to 3.5B.

For each (images N, labels L) it writes a synthetic label store with the paper's statistics (Zipfian
hashtag frequencies, p(h) ~ 1/(h+1) over L labels; 1 + Poisson(1) hashtags drawn per image, duplicates
merged: ~1.9 per image) the way ``tagjax build`` writes it (tagjax.records.LabelStoreWriter), then measures
in fresh processes:

* ``index``: building the sampler's hashtag -> images index (tagjax.sampling.InvertedIndex.build): wall
  time and peak resident memory (VmHWM);
* ``start``: ``make_train_iterator`` with ``config.data.sampling`` = ``sqrt`` (index cached) and
  ``images``, to the first batch of 256 images: wall time from before the process is spawned, and the
  process' memory at that point, split into anonymous memory (RssAnon: what the process owns) and mapped
  file pages (RssFile: the memory-mapped index and the libraries' code, shared and reclaimable). The
  record reader is a stub (a fixed 40x40 JPEG, labels read from the store): no model, no image shards;
* ``draws/s``: the sampler alone, 8,192 positions per call, for ~2 s;
* bytes per image on disk (label store; index) and resident (anonymous memory at the first batch / N).

Run (the 10^8 case needs ~5 GB of disk under --root and ~15 min on 2 cores)::

    python benchmarks/scale.py --root /tmp/tagjax-scale --sizes 1e6 1e7 1e8 --labels 17000 1500

The table it printed on this project's build machine is in docs/scaling.md ("Measured at scale"), with
the command line and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

from tagjax import records

CHUNK = 1 << 20
TARGET_N = 3_500_000_000
HOSTS = 42


def memory() -> dict:
    """This process' memory from /proc/self/status, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) / 1024
    return out


def generate(root: Path, n: int, num_labels: int, seed: int = 0) -> float:
    """Writes the synthetic train label store of ``n`` images; returns seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(1.0 / np.arange(1, num_labels + 1))
    cdf /= cdf[-1]
    writer = records.LabelStoreWriter(root, "train", num_labels)
    for first in range(0, n, CHUNK):
        m = min(CHUNK, n - first)
        k = 1 + rng.poisson(1.0, m)
        image = np.repeat(np.arange(m, dtype=np.int64), k)
        label = np.minimum(np.searchsorted(cdf, rng.random(len(image))), num_labels - 1)
        key = np.unique(image * num_labels + label)  # sorted by image, then label; no duplicates
        offsets = np.zeros(m + 1, np.int64)
        offsets[1:] = np.cumsum(np.bincount(key // num_labels, minlength=m))
        writer.add_chunk(records.LabelChunk(first, offsets, (key % num_labels).astype(np.int32)))
    writer.close()
    return time.perf_counter() - start


# ---- child processes ---------------------------------------------------------------------------


def child_index(root: Path, num_labels: int, cache: Path) -> dict:
    from tagjax import sampling

    store = records.LabelStore(root, "train")
    start = time.perf_counter()
    index = sampling.InvertedIndex.load_or_build(store, num_labels, cache)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "index_bytes": index.path.stat().st_size, **memory()}


_JPEG = None


class StubSource:
    """Stands in for tagjax.input_pipeline.RecordSource: a fixed small JPEG, and each record's labels
    read from the label store with ``os.pread`` (as a record reader reads records: no memory map, so
    the process' resident set shows what the pipeline itself holds)."""

    def __init__(self, dataset_dir, split, num_labels):
        self.store = records.LabelStore(Path(dataset_dir), split)
        self.num_records = self.store.num_records
        self.num_labels = num_labels
        self._files = None

    def identity(self) -> dict:
        return {"kind": "stub", "num_records": self.num_records}

    def load(self, ids):
        if self._files is None:  # opened once, like grain's readers
            self._files = [
                (os.open(path, os.O_RDONLY), records.npy_layout(path)[2])
                for path in (self.store.offsets_path, self.store.labels_path)
            ]
        (off_fd, off_base), (lab_fd, lab_base) = self._files
        out = []
        for i in ids:
            lo, hi = np.frombuffer(os.pread(off_fd, 16, off_base + 8 * int(i)), np.int64)
            data = os.pread(lab_fd, 4 * int(hi - lo), lab_base + 4 * int(lo))
            out.append((_JPEG, np.frombuffer(data, np.int32).astype(np.int64)))
        return out


def child_start(root: Path, num_labels: int, cache: Path, mode: str) -> dict:
    global _JPEG
    imported = time.time()
    import simplejpeg

    from tagjax import input_pipeline
    from tagjax.configs import default

    imported = time.time() - imported
    _JPEG = simplejpeg.encode_jpeg(np.full((40, 40, 3), 128, np.uint8), colorspace="RGB")
    input_pipeline.RecordSource = StubSource
    input_pipeline.load_vocabulary = lambda config, d=None: types.SimpleNamespace(
        num_labels=num_labels
    )
    c = default.get_config()
    c.data.dataset = str(root)
    c.data.sampling = mode
    c.data.cache_dir = str(cache)
    c.data.image_size = 32
    c.data.num_workers = 0
    c.train.batch_size = 256
    it = input_pipeline.make_train_iterator(c, process_index=0, process_count=1)
    batch = next(iter(it))
    assert batch["image"].shape[0] == 256
    first_batch = time.time()
    at_first = memory()
    sampler = it._batches.sampler
    draws, t0, pos = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < 2.0:
        sampler.sample(np.arange(pos, pos + 8192, dtype=np.int64))
        pos += 8192
        draws += 8192
    rate = draws / (time.perf_counter() - t0)
    return {
        "first_batch_time": first_batch,
        "import_seconds": imported,
        "at_first_batch": at_first,
        "draws_per_s": rate,
        "after_draws": memory(),
    }


def write_posts(folder: Path, n: int, seed: int = 0, per_tar: int = 10_000) -> None:
    """``n`` synthetic posts as webdataset tars: a 32x32 noise JPEG (distinct perceptual hashes), 1-3
    Zipfian hashtags from the in1k vocabulary's names, one of n/50 users, public."""
    import io
    import tarfile

    import simplejpeg

    from tagjax import vocab as vocab_lib

    vocab = vocab_lib.Vocabulary.load("in1k")
    names = [vocab.name_of(i) for i in range(vocab.num_labels)]
    cdf = np.cumsum(1.0 / np.arange(1, len(names) + 1))
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for t, first in enumerate(range(0, n, per_tar)):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(first, min(n, first + per_tar)):
                key = f"{i:09d}"
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                add(tar, f"{key}.jpg", simplejpeg.encode_jpeg(pixels, quality=80, colorspace="RGB"))
                tags = sorted(
                    {names[j] for j in np.searchsorted(cdf, rng.random(rng.integers(1, 4)))}
                )
                meta = {"id": key, "tags": tags, "user": f"u{rng.integers(max(1, n // 50))}"}
                add(tar, f"{key}.json", json.dumps(meta).encode())


def child_build(posts_dir: Path, out: Path, workers: str) -> dict:
    from tagjax import build, build_steps, images

    cfg = build_steps.BuildConfig(
        inputs=(f"wds:{posts_dir}",),
        output=str(out),
        vocab="in1k",
        images=images.ImageOptions(max_side=32),
        workers=int(workers),
        overwrite=True,
        progress=False,
        raster_cache="",
    )
    start = time.perf_counter()
    stats = build.build(cfg)
    return {
        "seconds": time.perf_counter() - start,
        "written": stats["posts_written"],
        "timing_s": stats["timing_s"],
        **memory(),
    }


def measure_build(root: Path, n: int, workers: int) -> dict:
    posts_dir = root / f"posts{n}"
    if not (posts_dir / "done").is_file():
        shutil.rmtree(posts_dir, ignore_errors=True)
        write_posts(posts_dir, n)
        (posts_dir / "done").write_text("")
    result, _ = run_child("build", posts_dir, root / f"built{n}", workers)
    shutil.rmtree(root / f"built{n}", ignore_errors=True)
    return {"posts": n, "workers": workers, **result}


def run_child(*args) -> tuple[dict, float]:
    spawned = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), spawned


# ---- the table ---------------------------------------------------------------------------------


def measure(root: Path, n: int, num_labels: int) -> dict:
    store_dir = root / f"n{n}-l{num_labels}"
    if not records.LabelStore(store_dir, "train").exists():
        shutil.rmtree(store_dir, ignore_errors=True)
        store_dir.mkdir(parents=True)
        gen = generate(store_dir, n, num_labels)
    else:
        gen = float("nan")
    store = records.LabelStore(store_dir, "train")
    cache = store_dir / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    index, _ = run_child("index", store_dir, num_labels, cache)
    row = {
        "images": n,
        "labels": num_labels,
        "pairs": store.num_pairs,
        "generate_s": gen,
        "store_bytes": store.offsets_path.stat().st_size + store.labels_path.stat().st_size,
        "index": index,
    }
    for mode in ("sqrt", "images"):
        start, spawned = run_child("start", store_dir, num_labels, cache, mode)
        start["seconds_to_first_batch"] = start.pop("first_batch_time") - spawned
        row[f"start_{mode}"] = start
    return row


def render(rows: list[dict]) -> str:
    lines = [
        "| images | labels | pairs/image | store B/image (disk) | index B/image (disk, mmapped) "
        "| index build s | index build peak RSS MB | first batch s (sqrt / images) "
        "| RssAnon MB at first batch (sqrt / images) | RssFile MB (sqrt) | draws/s (sqrt / images) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n, s, i = r["images"], r["start_sqrt"], r["start_images"]
        lines.append(
            f"| {n:.0e} | {r['labels']:,} | {r['pairs'] / n:.2f} | {r['store_bytes'] / n:.1f} | "
            f"{r['index']['index_bytes'] / n:.1f} | {r['index']['seconds']:.1f} | "
            f"{r['index']['VmHWM']:.0f} | {s['seconds_to_first_batch']:.1f} / "
            f"{i['seconds_to_first_batch']:.1f} | {s['at_first_batch']['RssAnon']:.0f} / "
            f"{i['at_first_batch']['RssAnon']:.0f} | {s['at_first_batch']['RssFile']:.0f} | "
            f"{s['draws_per_s']:,.0f} / {i['draws_per_s']:,.0f} |"
        )
    if rows:
        lines += ["", extrapolate(rows)]
    return "\n".join(lines)


def extrapolate(rows: list[dict]) -> str:
    """Per-image costs fitted over the measured sizes (largest label count), at 3.5B images."""
    num_labels = max(r["labels"] for r in rows)
    rows = sorted((r for r in rows if r["labels"] == num_labels), key=lambda r: r["images"])
    n = np.asarray([r["images"] for r in rows], np.float64)

    def fit(values) -> tuple[float, float]:
        if len(n) < 2:
            return float(values[0]) / n[0], 0.0
        slope, intercept = np.polyfit(n, np.asarray(values, np.float64), 1)
        return float(slope), float(intercept)

    pairs = rows[-1]["pairs"] / rows[-1]["images"]
    index_bytes = 4 if TARGET_N < (1 << 32) else 8
    t_slope, t_icpt = fit([r["index"]["seconds"] for r in rows])
    anon = [r["start_sqrt"]["at_first_batch"]["RssAnon"] for r in rows]
    start = [r[f"start_{m}"]["seconds_to_first_batch"] for r in rows for m in ("sqrt", "images")]
    a_slope, a_icpt = fit(anon)
    s_slope, _ = fit([r["start_sqrt"]["seconds_to_first_batch"] for r in rows])
    store = TARGET_N * (8 + 4 * pairs)
    index = TARGET_N * pairs * index_bytes
    return "\n".join(
        [
            f"Extrapolated to {TARGET_N / 1e9:.1f}B images ({num_labels:,} labels, {pairs:.2f} "
            f"hashtags per image; linear fits over {', '.join(f'{x:.0e}' for x in n)}):",
            f"- label store on disk: {store / 1e9:.1f} GB (shared storage; read only to build the index)",
            f"- sampler index: {index / 1e9:.1f} GB per host, memory-mapped (each of {HOSTS} hosts "
            f"maps the whole index: {index / 1e9:.1f} GB each, {HOSTS * index / 1e12:.2f} TB in all)",
            f"- index build: {t_slope * TARGET_N + t_icpt:,.0f} s on one core "
            f"({t_slope * 1e9:.0f} s per 1e9 images), peak memory bounded (see table)",
            f"- anonymous memory at the first batch: {max(anon):,.0f} MB measured at most; the "
            f"fitted per-image term ({a_slope * 1e9:.1f} MB per 1e9 images) gives "
            f"{max(anon[-1], a_slope * TARGET_N + a_icpt):,.0f} MB",
            f"- time to the first batch (index cached): {min(start):.1f}-{max(start):.1f} s measured, "
            f"no per-image term ({s_slope * 1e9:+.1f} s per 1e9 images, within noise)",
        ]
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "build":
            print(json.dumps(child_build(Path(rest[0]), Path(rest[1]), rest[2])))
            return 0
        root, num_labels, cache, *rest = rest
        fn = child_index if kind == "index" else child_start
        print(json.dumps(fn(Path(root), int(num_labels), Path(cache), *rest)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/tagjax-scale"))
    parser.add_argument("--sizes", type=float, nargs="*", default=[1e6, 1e7, 1e8])
    parser.add_argument("--labels", type=int, nargs="+", default=[17_000, 1_500])
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--build-posts",
        type=float,
        nargs="*",
        default=[],
        help="also run the local builder on this many synthetic posts (e.g. 1e4 1e5)",
    )
    parser.add_argument("--build-workers", type=int, default=2)
    parser.add_argument("--render", type=Path, default=None, help="only print the table of a --out")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    for n in args.build_posts:
        print(json.dumps(measure_build(args.root, int(n), args.build_workers)), flush=True)
    rows = []
    for num_labels in args.labels:
        for n in args.sizes:
            row = measure(args.root, int(n), num_labels)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))
    print(render(rows))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())

"""Local builder throughput: posts per second, and per core, for `tagjax build`; side by side with an
older tagjax.

Generates a corpus (a JSONL manifest with hashtags, one image per post), builds it, and reports posts/s
for the whole build and for the image stage alone (decode + resize + JPEG + hashes), divided by the
number of worker processes. Two corpora:

* ``--photos``: web-size JPEGs (default 1024x768, quality 90) of real photographs: each is a mosaic of
  Debian tuxpaint stamps (photo cut-outs of animals, food, plants, objects) pasted at their own size over
  a background made from another stamp, so the JPEGs carry real photographic texture;
* otherwise synthetic photo-like JPEGs (smooth colour fields plus noise) of ``--size``.

``--baseline REV`` measures the tagjax of git revision REV (extracted with ``git archive``) and the
working tree side by side, in alternating rounds, so both see the same machine load. Each round runs,
for each tree, the whole ``tagjax build`` command as a user does (a fresh process: start-up, imports,
vocabulary, images, deduplication, shards; ``--workers 1`` keeps everything in that process) and
reports its wall time and, because this benchmark usually shares its CPUs, the CPU seconds of the
process and its children (the cost per post whatever the load; one worker only: a multi-worker build's
workers are forkserver children that getrusage does not count), a digest of the dataset it wrote (the
same for every round of a tree), and the image stage alone as milliseconds of one core per image.
``--bytecode`` compiles every module beforehand (see ``compile_bytecode``).

    .venv/bin/python benchmarks/build_throughput.py --posts 2000 --size 640x480 --max-side 256 --workers 1 2
    .venv/bin/python benchmarks/build_throughput.py --openclipart --max-side 96 --workers 2
    .venv/bin/python benchmarks/build_throughput.py --photos --posts 1500 --baseline d09f989 --rounds 3 --workers 1

``--decoders`` times libjpeg-turbo's decoders on the corpus's first ``--stage-images`` JPEGs at each DCT
scale instead (simplejpeg, OpenCV, Pillow): the floor under the image stage is the entropy decoding they
all do in full, whatever the output size.

    .venv/bin/python benchmarks/build_throughput.py --photos --posts 1500 --decoders --corpus-dir /tmp/bench

With --openclipart the real corpus is built instead (rasterized SVGs come from the cache after the first
run; pass --raster-cache '' to measure cold rasterization).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
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
STAMPS = "/usr/share/tuxpaint/stamps"


def _write_manifest(root: Path, n: int, rng) -> Path:
    lines = []
    for i in range(n):
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


def make_corpus(root: Path, n: int, width: int, height: int, seed: int = 0) -> Path:
    """Photo-like JPEGs: smooth colour fields plus texture noise (so JPEG sizes are realistic)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.005, 0.03, 3)
        ph = rng.uniform(0, 6.3, 3)
        base = 128 + 90 * np.sin(x[..., None] * f + ph) * np.cos(y[..., None] * f[::-1] + ph[::-1])
        noise = rng.normal(0, 12, (height, width, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (root / "img" / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    return _write_manifest(root, n, rng)


def make_photo_corpus(root: Path, n: int, width: int, height: int, seed: int = 0) -> Path:
    """Web-size JPEGs of real photographs: mosaics of tuxpaint's photo stamps (see the docstring)."""
    paths = sorted(glob.glob(f"{STAMPS}/**/*.png", recursive=True))
    stamps = [Image.open(p).convert("RGBA") for p in paths]
    stamps = [s for s in stamps if min(s.size) >= 96]
    if not stamps:
        raise SystemExit(
            f"no photo stamps under {STAMPS}: install Debian's tuxpaint-stamps-default"
        )
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    for i in range(n):
        back = stamps[int(rng.integers(len(stamps)))]
        canvas = Image.new("RGBA", (width, height), (255, 255, 255, 255))
        canvas.alpha_composite(back.resize((width, height), Image.Resampling.BICUBIC))
        for _ in range(int(rng.integers(6, 13))):
            s = stamps[int(rng.integers(len(stamps)))]
            x = int(rng.integers(-s.width // 3, width - s.width // 2))
            y = int(rng.integers(-s.height // 3, height - s.height // 2))
            canvas.alpha_composite(s, (max(x, 0), max(y, 0)), (max(-x, 0), max(-y, 0)))
        buf = io.BytesIO()
        canvas.convert("RGB").save(buf, "JPEG", quality=90)
        (root / "img" / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    return _write_manifest(root, n, rng)


def _cpu_seconds() -> float:
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_build(inputs, output: Path, workers: int, max_side: int, raster_cache) -> dict:
    cfg = build_steps.BuildConfig(
        inputs=tuple(inputs),
        output=str(output),
        workers=workers,
        progress=False,
        images=images.ImageOptions(max_side=max_side),
        raster_cache=raster_cache,
    )
    cpu0, t0 = _cpu_seconds(), time.time()
    stats = build.build(cfg)
    return {
        "wall_s": time.time() - t0,
        "cpu_s": _cpu_seconds() - cpu0,
        "posts": stats["posts_read"],
        "images": stats["images"]["attempted"],
        "written": stats["posts_written"],
        "image_stage_s": stats["timing_s"]["images"],
        "timing": stats["timing_s"],
    }


def image_stage_ms(files: list[Path], max_side: int) -> float:
    """Milliseconds of one core per image for what a build worker does with one post's image (decode,
    resize, JPEG, both hashes: ``build_steps.process_post_image`` of the tagjax on sys.path), second of
    two passes."""
    from tagjax import posts

    opts = images.ImageOptions(max_side=max_side)
    items = [posts.Post(post_id=f.stem, image_bytes=f.read_bytes()) for f in files]
    best = float("inf")
    for _ in range(2):
        t0 = time.process_time()
        for post in items:
            build_steps.process_post_image(post, opts, None)
        best = min(best, time.process_time() - t0)
    return 1000 * best / len(items)


# `tagjax build` as a user runs it: the console script's body, in a fresh interpreter.
_CLI = "import sys; from tagjax.cli import main; sys.argv[0] = 'tagjax'; sys.exit(main())"


def compile_bytecode(cache: Path, trees: list[str]) -> dict:
    """Compiles the standard library, the environment's packages and ``trees`` into ``cache``
    (PYTHONPYCACHEPREFIX) and returns the environment that makes child processes read it: what a
    ``pip install`` gives a user. Where PYTHONDONTWRITEBYTECODE is set and the packages carry no
    .pyc files (these machines), every process otherwise compiles all it imports again."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(cache))
    paths = sysconfig.get_paths()
    folders = sorted({paths["stdlib"], paths["purelib"], paths["platlib"], *trees})
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j", "1", *folders],
        env=env,
        check=False,  # a few test files in site-packages do not compile; they are never imported
        capture_output=True,
    )
    return env


def command_build(
    tree: str, corpus: Path, output: Path, workers: int, max_side: int, env: dict
) -> dict:
    """Runs the whole ``tagjax build`` command of the tagjax in ``tree`` (process start, imports,
    vocabulary, images, dedup, shards) in a fresh process: its wall time and the CPU seconds of the
    process and its children (getrusage of waited-for children), and a digest of what it wrote."""
    cmd = [
        sys.executable,
        "-c",
        _CLI,
        "build",
        f"jsonl:{corpus / 'posts.jsonl'}",
        "--output",
        str(output),
        "--workers",
        str(workers),
        "--max-side",
        str(max_side),
        "--no-progress",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    subprocess.run(  # not from the repository: `python -c` puts the current folder on sys.path
        cmd,
        env=dict(env, PYTHONPATH=tree),
        cwd=output.parent,
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "digest": output_digest(output)}


def output_digest(output: Path) -> str:
    """sha256 over the dataset's files except the run's statistics (which hold timings)."""
    digest = hashlib.sha256()
    for path in sorted(output.iterdir()):
        if path.name not in ("stats.json", "report.txt"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def child(args) -> None:
    """The image stage alone, in this process (the tagjax on sys.path: the working tree or a baseline)."""
    import tagjax

    files = sorted((Path(args.corpus) / "img").glob("*.jpg"))[: args.stage_images]
    result = {"image_ms": image_stage_ms(files, args.max_side)}
    result["tagjax"] = str(Path(tagjax.__file__).parent)
    print(json.dumps(result))


def side_by_side(args, corpus: Path) -> None:
    here = Path(__file__).resolve().parent.parent
    posts = sum(1 for line in (corpus / "posts.jsonl").open() if line.strip())
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(here), "archive", args.baseline, "tagjax"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        trees = {f"baseline {args.baseline}": str(baseline), "working tree": str(here)}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        output = Path(tmp) / "out"  # one path for both: the manifest records it
        env = dict(os.environ)
        if args.bytecode:
            env = compile_bytecode(Path(tmp) / "pycache", list(trees.values()))
        for r in range(args.rounds):
            for name, path in trees.items() if r % 2 == 0 else reversed(trees.items()):
                shutil.rmtree(output, ignore_errors=True)
                row = command_build(path, corpus, output, args.workers[0], args.max_side, env)
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        "--corpus",
                        str(corpus),
                        "--max-side",
                        str(args.max_side),
                        "--stage-images",
                        str(args.stage_images),
                    ],
                    env=dict(env, PYTHONPATH=path),
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                stage = json.loads(out.strip().splitlines()[-1])
                assert stage["tagjax"].startswith(path), (stage["tagjax"], path)
                row["image_ms"] = stage["image_ms"]
                results[name].append(row)
                print(
                    f"round {r} {name:24s} wall {row['wall_s']:.2f}s cpu {row['cpu_s']:.2f}s "
                    f"image stage {row['image_ms']:.2f} ms/img output {row['digest']}",
                    flush=True,
                )
    # The CPU column is the command's own process: with --workers > 1 the image workers are children of
    # a forkserver nothing waits for, so getrusage does not see them and posts per CPU-second are
    # overstated; compare CPU columns at one worker only (the recorded tables do).
    bytecode = "compiled bytecode" if args.bytecode else "bytecode as the environment has it"
    print(
        f"\n`tagjax build`, end to end (process start to exit), {args.workers[0]} worker(s), {posts} "
        f"posts, {bytecode}, medians of {args.rounds} rounds:"
        "\n| code | posts/s (wall) | posts per CPU-second | CPU ms per post "
        "| image stage, ms of one core per image | output digest |"
        "\n|---|---|---|---|---|---|"
    )
    summary = {}
    for name, rows in results.items():
        wall = statistics.median(posts / x["wall_s"] for x in rows)
        per_cpu = statistics.median(posts / x["cpu_s"] for x in rows)
        ms = statistics.median(x["image_ms"] for x in rows)
        digests = sorted({x["digest"] for x in rows})
        summary[name] = (wall, per_cpu, ms)
        print(
            f"| {name} | {wall:.0f} | {per_cpu:.0f} | {1000 / per_cpu:.2f} | {ms:.2f} "
            f"| {', '.join(digests)} |"
        )
    (b_wall, b_cpu, b_ms), (n_wall, n_cpu, n_ms) = summary.values()
    print(
        f"speed-up: {n_wall / b_wall:.2f}x posts/s (wall), {n_cpu / b_cpu:.2f}x posts per "
        f"CPU-second, {b_ms / n_ms:.2f}x image stage"
    )


def decoder_floor(files: list[Path], width: int, height: int) -> None:
    """CPU ms per JPEG of each libjpeg-turbo front end at full size and at 1/2, 1/4, 1/8 (best of 3)."""
    import cv2
    import simplejpeg
    from PIL import features

    datas = [f.read_bytes() for f in files]

    def pil_draft(data, scale):
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (width // scale, height // scale))
            return np.asarray(im)

    def simple(data, scale):
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_height=height // scale, min_width=width // scale
        )

    cv_flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    cv_flags[8] = cv2.IMREAD_REDUCED_COLOR_8
    decoders = {
        f"simplejpeg {simplejpeg.__version__}": simple,
        f"OpenCV {cv2.__version__} imdecode": lambda d, s: cv2.imdecode(
            np.frombuffer(d, np.uint8), cv_flags[s]
        ),
        f"Pillow {Image.__version__} draft": pil_draft,
    }
    print(
        f"{len(datas)} JPEGs, {width}x{height}, mean {np.mean([len(d) for d in datas]) / 1e3:.0f} kB; "
        f"libjpeg-turbo {features.version('libjpeg_turbo')} (Pillow's); CPU ms per image, best of 3"
    )
    print("| decoder | full size | 1/2 | 1/4 | 1/8 |\n|---|---|---|---|---|")
    for name, decode in decoders.items():
        cells = []
        for scale in (1, 2, 4, 8):
            best = float("inf")
            for _ in range(3):
                t0 = time.process_time()
                for data in datas:
                    decode(data, scale)
                best = min(best, (time.process_time() - t0) / len(datas) * 1e3)
            cells.append(f"{best:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=2000)
    ap.add_argument("--size", default=None, help="WxH of the generated JPEGs")
    ap.add_argument("--max-side", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--openclipart", action="store_true")
    ap.add_argument("--photos", action="store_true", help="mosaics of real photos, see docstring")
    ap.add_argument("--raster-cache", default=None)
    ap.add_argument("--corpus-dir", default=None, help="keep the generated corpus here for re-runs")
    ap.add_argument("--baseline", default=None, help="git revision to measure side by side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--bytecode",
        action="store_true",
        help="with --baseline: compile every module first and let the builds read it (as after a "
        "pip install), instead of compiling what they import in every process",
    )
    ap.add_argument("--stage-images", type=int, default=200)
    ap.add_argument(
        "--decoders",
        action="store_true",
        help="time libjpeg-turbo's decoders on the generated JPEGs at each DCT scale (no build)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = None
        if args.openclipart:
            inputs = ("openclipart",)
        else:
            w, h = (
                int(v) for v in (args.size or ("1024x768" if args.photos else "640x480")).split("x")
            )
            kind = "photos" if args.photos else "bench"
            corpus = Path(args.corpus_dir or tmp) / f"tagjax-{kind}-{args.posts}-{w}x{h}"
            if not (corpus / "posts.jsonl").is_file():
                t0 = time.time()
                (make_photo_corpus if args.photos else make_corpus)(corpus, args.posts, w, h)
                print(f"generated {args.posts} {w}x{h} JPEGs in {time.time() - t0:.1f}s")
            inputs = (f"jsonl:{corpus / 'posts.jsonl'}",)
        if args.decoders:
            if corpus is None:
                raise SystemExit("--decoders needs a generated corpus (--photos or --size)")
            files = sorted(corpus.rglob("*.jpg"))[: args.stage_images]
            decoder_floor(files, w, h)
        elif args.baseline:
            if corpus is None:
                raise SystemExit("--baseline needs a generated corpus (--photos or --size)")
            side_by_side(args, corpus)
        else:
            for workers in args.workers:
                r = run_build(
                    inputs, tmp / f"out{workers}", workers, args.max_side, args.raster_cache
                )
                print(
                    f"workers={workers}: {r['posts']} posts read, {r['images']} images, "
                    f"{r['written']} written; total {r['wall_s']:.1f}s = {r['posts'] / r['wall_s']:.0f} "
                    f"posts/s ({r['posts'] / r['wall_s'] / workers:.0f} per core); image stage "
                    f"{r['image_stage_s']:.1f}s = {r['images'] / r['image_stage_s']:.0f} img/s "
                    f"({r['images'] / r['image_stage_s'] / workers:.0f} per core); phases {r['timing']}"
                )
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()

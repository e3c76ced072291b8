"""``tagjax build``: tagged posts -> a clean, deduplicated dataset directory (see tagjax.records).

The stages, in order; every post that leaves is counted under one reason (``stats.json``, ``report.txt``):

1. **Read** every input (tagjax.posts). Reader problems (unsafe archive members, unparsable metadata,
   symlinked copies) and repeated post ids are dropped first.
2. **Privacy**: only public posts; a post whose source does not say is dropped unless ``--assume-public``;
   opted-out post ids and user ids (``--optout-posts``/``--optout-users``, one id per line) are dropped
   here, before anything about them is computed. User ids are not written unless ``--keep-user-ids``.
3. **Uploader habits**: for each user with at least ``--habit-min-posts`` posts, a hashtag on more than
   ``--habit-fraction`` of them says more about the uploader than about any one image (an icon theme
   tagging every file #computer #icons, a shop tagging #sale); ``--habit-action drop`` removes those
   hashtags from that user's posts (other users' uses of the same hashtag are untouched).
4. **Labels**: hashtags are canonicalized with the vocabulary (``--vocab FILE`` or ``in1k``, or one built
   from this corpus' hashtag counts after step 3); posts left without a label are dropped.
   ``--max-posts-per-user`` then caps each user's posts (a deterministic sample by post id hash).
5. **Images** (worker processes): load (rasterizing SVGs through a cache), decode, RGB, resize, JPEG
   (tagjax.images). Corrupt, truncated, tiny or bomb images are counted; more than
   ``--max-failure-fraction`` of broken inputs stops the build loudly.
6. **Deduplication** (tagjax.dedup): near duplicates of evaluation images (``--eval-set``), then exact
   copies, then near duplicates; the deterministic keep rule decides which copy stays.
7. **Split**: each near-duplicate group's root post id is hashed with ``--split-seed``; a fraction
   ``--heldout-fraction`` of hash space is held out. Keyed on the post id, a post lands on the same side
   in every rebuild and in the Beam pipeline.
8. **Write**: ``records`` shards (record ``r`` of a split goes to shard ``hash(id) % shards``, sorted by
   hash inside the shard, so local and Beam builds write identical files), the label index per split,
   ``vocab.json``, statistics, and ``dataset.json`` last: a directory without it is an unfinished build.

The Apache Beam pipeline (tagjax.build_beam) runs the same per-post functions defined here.

``tagjax build --apply-optout DATASET --optout-posts FILE`` removes posts from a finished dataset:
every shard holding one is rewritten without it (atomically), the label indexes and statistics are
recomputed, and the manifest is replaced last.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from tagjax import dedup as dedup_lib
from tagjax import images as images_lib
from tagjax import posts as posts_lib
from tagjax import records
from tagjax import vocab as vocab_lib
from tagjax.errors import UserError

# Post-level drop reasons of the builder itself (readers', images' and dedup's reasons join them).
DUPLICATE_POST_ID = "duplicate_post_id"
PRIVATE = "private"
VISIBILITY_UNKNOWN = "visibility_unknown"
OPTOUT_POST = "optout_post"
OPTOUT_USER = "optout_user"
NO_HASHTAGS = "no_hashtags"
HABITUAL_ONLY = "habitual_hashtags_only"
NO_LABELS = "no_labels"
USER_CAP = "user_cap"
EVAL_DUPLICATE = "eval_near_duplicate"
EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"
OPTOUT_AFTER_BUILD = "optout_after_build"
# Inputs that are broken (not merely filtered): they count against --max-failure-fraction.
FAILURE_REASONS = frozenset(
    images_lib.FAILURE_REASONS | {posts_lib.MISSING_IMAGE, posts_lib.SVG_UNRENDERABLE}
)

STAGING = ".staging"
OUTPUT_FILES = (
    "vocab.json",
    "stats.json",
    "report.txt",
    "train.labels.npz",
    "heldout.labels.npz",
    records.MANIFEST,
    records.MANIFEST + ".tmp",
    "dataset.json.pending",
)


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Everything a build depends on; written into dataset.json so a dataset says how it was made.
    Every field is a ``tagjax build`` flag of the same name."""

    inputs: tuple[str, ...]
    output: str
    vocab: str | None = None  # vocab.json path or "in1k"; None = build one from this corpus' counts
    vocab_mode: str = (
        "nouns"  # when building: "nouns" (visual nouns), "nouns_paper" (every noun) or "in1k"
    )
    vocab_top_k: int = 0  # when building: keep the k most frequent labels (0 = all)
    vocab_min_count: int = 2  # when building: a label needs at least this many posts
    drop_ancestors: bool = False  # drop a label when a WordNet descendant is on the same post
    images: images_lib.ImageOptions = dataclasses.field(default_factory=images_lib.ImageOptions)
    dedup: dedup_lib.DedupOptions = dataclasses.field(default_factory=dedup_lib.DedupOptions)
    eval_sets: tuple[str, ...] = ()  # folders or tfds:NAME/SPLIT to decontaminate against
    tfds_data_dir: str | None = None
    assume_public: bool = False  # treat posts whose source gives no visibility as public
    optout_posts: str | None = None  # file: one post id per line
    optout_users: str | None = None  # file: one user id per line
    keep_user_ids: bool = False  # write the uploader id into each record
    max_posts_per_user: int = 0  # posts kept per user (0 = no cap)
    habit_fraction: float = 0.5  # a hashtag on more than this fraction of a user's posts is a habit
    habit_min_posts: int = 20  # users with fewer posts have no habits (too little evidence)
    habit_action: str = "drop"  # "drop" habitual hashtags from that user's posts, or "keep" them
    heldout_fraction: float = 0.02  # share of near-duplicate groups held out for hashtag metrics
    split_seed: str = "tagjax"  # salt of the split hash (changing it draws another split)
    shard_size: int = 10_000  # records per shard (at most)
    workers: int = 0  # image worker processes; 0 = all CPU cores, 1 = in this process
    max_failure_fraction: float = 0.05  # broken images / attempted above this stops the build
    failure_min_images: int = (
        1000  # ... checked once this many images were attempted (and at the end)
    )
    limit: int = 0  # read at most this many posts in total (0 = all); a quick subset
    raster_cache: str | None = (
        None  # rasterized-SVG cache dir; None = ~/.cache/tagjax/raster, "" = off
    )
    overwrite: bool = False  # replace a previous build in `output`
    yfcc_images: str | None = None  # folder of YFCC100M photos
    progress: bool = True

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"--heldout-fraction must be in [0, 1), got {self.heldout_fraction}.")
        if not 0.0 < self.habit_fraction <= 1.0:
            raise UserError(f"--habit-fraction must be in (0, 1], got {self.habit_fraction}.")
        if self.habit_action not in ("drop", "keep"):
            raise UserError(f"--habit-action must be drop or keep, got {self.habit_action!r}.")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}.")
        if self.vocab_mode not in vocab_lib.MODES:
            raise UserError(
                f"--vocab-mode must be one of {', '.join(vocab_lib.MODES)}, got {self.vocab_mode!r}."
            )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        d["eval_sets"] = list(self.eval_sets)
        for k in ("progress", "overwrite", "workers"):  # how it ran, not what it made
            d.pop(k)
        return d


# ---- per-post functions shared with the Beam pipeline -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptOut:
    posts: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()

    @classmethod
    def load(cls, posts_file: str | None, users_file: str | None) -> OptOut:
        return cls(posts=read_id_list(posts_file), users=read_id_list(users_file))


def read_id_list(path: str | None) -> frozenset[str]:
    """One id per line; blank lines and lines starting with '#' are ignored."""
    if not path:
        return frozenset()
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"opt-out list {p} does not exist.")
    with p.open(encoding="utf-8") as f:
        return frozenset(s for line in f if (s := line.strip()) and not s.startswith("#"))


def admit(post: posts_lib.Post, optout: OptOut, assume_public: bool) -> str | None:
    """The privacy gate: None if the post may be used, else the drop reason."""
    if post.problem:
        return post.problem
    if post.post_id in optout.posts:
        return OPTOUT_POST
    if post.user is not None and post.user in optout.users:
        return OPTOUT_USER
    if post.public is False:
        return PRIVATE
    if post.public is None and not assume_public:
        return VISIBILITY_UNKNOWN
    return None


def tag_forms(post: posts_lib.Post) -> tuple[str, ...]:
    """The post's hashtags as normalized forms (tagjax.hashtags.normalize), unique, in order."""
    from tagjax.hashtags import normalize

    out = []
    for tag in posts_lib.hashtags_of(post):
        form = normalize(tag)
        if form and form not in out:
            out.append(form)
    return tuple(out)


def habits_of_user(
    num_posts: int, form_posts: Mapping[str, int], fraction: float, min_posts: int
) -> frozenset[str]:
    """The hashtags one user puts on more than ``fraction`` of their posts (users with >= min_posts)."""
    if num_posts < min_posts:
        return frozenset()
    return frozenset(f for f, n in form_posts.items() if n > fraction * num_posts)


def without_habits(forms: Sequence[str], habits: frozenset[str]) -> tuple[str, ...]:
    return tuple(f for f in forms if f not in habits)


def id_hash(post_id: str, salt: str = "") -> int:
    """64-bit hash of a post id: split, user-cap sample and shard placement are keyed on it."""
    h = hashlib.blake2b(f"{salt}\x00{post_id}".encode(), digest_size=8, person=b"tagjax-id")
    return int.from_bytes(h.digest(), "big")


def split_of(root_id: str, heldout_fraction: float, seed: str) -> str:
    return "heldout" if id_hash(root_id, "split:" + seed) < heldout_fraction * 2.0**64 else "train"


def capped(post_ids: Iterable[str], cap: int) -> set[str]:
    """The ``cap`` posts of one user that are kept: the smallest id hashes (a fixed random sample)."""
    ids = sorted(post_ids, key=lambda p: (id_hash(p, "cap"), p))
    return set(ids if cap <= 0 else ids[:cap])


def num_shards(n: int, shard_size: int) -> int:
    return math.ceil(n / shard_size) if n else 0


def shard_of(post_id: str, shards: int) -> int:
    return id_hash(post_id, "shard") % shards


def record_sort_key(post_id: str) -> tuple[int, str]:
    return (id_hash(post_id, "order"), post_id)


@dataclasses.dataclass(frozen=True)
class ImageResult:
    """What a worker returns for one post: the stored JPEG and the keys dedup needs, or a reason."""

    post_id: str
    reason: str | None = None
    detail: str = ""
    jpeg: bytes = b""
    source_pixels: int = 0
    content_hash: str = ""
    phash: int = 0


def process_post_image(
    post: posts_lib.Post, options: images_lib.ImageOptions, cache: posts_lib.RasterCache | None
) -> ImageResult:
    """Load, normalize and hash one post's image; every failure becomes a counted reason."""
    try:
        data = posts_lib.load_image_bytes(post, options.max_side, cache)
        p = images_lib.process(data, options)
    except images_lib.ImageSkip as e:
        return ImageResult(post.post_id, reason=e.reason, detail=e.detail[:200])
    return ImageResult(
        post.post_id,
        jpeg=p.jpeg,
        source_pixels=p.source_pixels,
        content_hash=dedup_lib.content_hash(p.pixels),
        phash=dedup_lib.phash(p.pixels),
    )


class EvalMatcher:
    """Training image hash -> the closest evaluation image within the threshold, through the same
    chunk keys as near-duplicate search (exact: every eval image within the threshold is a candidate)."""

    def __init__(self, eval_hashes: Sequence[tuple[str, int]], threshold: int):
        self.threshold = threshold
        self.hashes = list(eval_hashes)
        self.index: dict = collections.defaultdict(list)
        if threshold >= 0:
            for i, (_, h) in enumerate(self.hashes):
                for key in dedup_lib.chunk_keys(h, threshold):
                    self.index[key].append(i)

    def match(self, h: int) -> tuple[str, int] | None:
        if not self.hashes or self.threshold < 0:
            return None
        best = None
        for key in dedup_lib.chunk_keys(h, self.threshold):
            for i in self.index.get(key, ()):
                name, eh = self.hashes[i]
                d = dedup_lib.hamming(h, eh)
                if d <= self.threshold and (best is None or (d, name) < best):
                    best = (d, name)
        return None if best is None else (best[1], best[0])


def build_vocabulary(cfg: BuildConfig, form_counts: Mapping[str, int]):
    """The vocabulary: the given file (or builtin name), or one built from the corpus' counts."""
    from tagjax import vocab as vocab_lib

    if cfg.vocab:
        return vocab_lib.Vocabulary.load(cfg.vocab)
    if not form_counts:
        raise UserError(
            "no post has a hashtag left to build a vocabulary from; check the inputs "
            "(or pass --vocab in1k / --vocab FILE)."
        )
    return vocab_lib.build_vocabulary(
        form_counts,
        mode=cfg.vocab_mode,
        top_k=cfg.vocab_top_k or None,
        min_count=cfg.vocab_min_count,
        source="tagjax build",
        progress=False,
    )


def make_record(
    post_id: str, jpeg: bytes, labels: Sequence[int], user: str | None, keep_user_ids: bool
) -> bytes:
    return records.encode(
        records.Record(
            post_id=post_id, image=jpeg, labels=tuple(labels), user=user if keep_user_ids else None
        )
    )


def write_one_shard(
    root: Path, split: str, index: int, count: int, items: Iterable[tuple[str, bytes]]
) -> tuple[str, list[list[int]]]:
    """Writes one shard from (post_id, encoded record) items in the canonical order (sorted by id hash);
    returns its file name and its records' label lists in order. Local and Beam builds both call this,
    which is why they write identical shards."""
    group = sorted(items, key=lambda x: record_sort_key(x[0]))
    name = records.shard_name(split, index, count)
    records.write_shard(root / name, (data for _, data in group))
    return name, [list(records.decode(data).labels) for _, data in group]


# ---- statistics and report ---------------------------------------------------------------------------


class Stats:
    """Counts of a build: posts in, out, and dropped per reason, overall and per input source."""

    def __init__(self):
        self.read = collections.Counter()  # source -> posts read
        self.dropped = collections.Counter()  # reason -> posts
        self.dropped_by_source: dict[str, collections.Counter] = collections.defaultdict(
            collections.Counter
        )
        self.kept_by_source = collections.Counter()
        self.tags_dropped = collections.Counter()  # hashtag-level reasons (tagjax.hashtags)
        self.images_attempted = 0
        self.image_failures = 0
        self.extra: dict = {}

    def drop(self, source: str, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        self.dropped_by_source[source][reason] += n


def summarize(
    stats: Stats,
    cfg_json: dict,
    vocab,
    split_labels: Mapping[str, list[list[int]]],
    timing: Mapping[str, float],
) -> dict:
    """stats.json content."""
    counts = {s: len(v) for s, v in split_labels.items()}
    train_counts = np.zeros(vocab.num_labels, np.int64)
    for labels in split_labels.get("train", []):
        train_counts[labels] += 1
    order = np.argsort(-train_counts, kind="stable")
    top = [[vocab.name_of(int(i)), int(train_counts[i])] for i in order[:30] if train_counts[i] > 0]
    posts_read = sum(stats.read.values())
    dedup_reasons = (EVAL_DUPLICATE, EXACT_DUPLICATE, NEAR_DUPLICATE)
    per_source = {}
    for source in sorted(stats.read):
        d = stats.dropped_by_source.get(source, collections.Counter())
        hashed = stats.kept_by_source[source] + sum(d[r] for r in dedup_reasons)
        per_source[source] = {
            "read": stats.read[source],
            "kept": stats.kept_by_source[source],
            "dropped": dict(sorted(d.items())),
            "dedup_removal_rate": round(sum(d[r] for r in dedup_reasons) / hashed, 4)
            if hashed
            else 0.0,
        }
    num_labels_per_post = [len(x) for v in split_labels.values() for x in v]
    return {
        "posts_read": posts_read,
        "posts_written": sum(counts.values()),
        "records": counts,
        "dropped": dict(sorted(stats.dropped.items(), key=lambda kv: -kv[1])),
        "per_source": per_source,
        "images": {"attempted": stats.images_attempted, "failed": stats.image_failures},
        "hashtags_dropped": dict(sorted(stats.tags_dropped.items(), key=lambda kv: -kv[1])),
        "labels": {
            "vocabulary_size": vocab.num_labels,
            "used_in_train": int((train_counts > 0).sum()),
            "mean_per_post": round(float(np.mean(num_labels_per_post)), 3)
            if num_labels_per_post
            else 0,
            "most_frequent_train": top,
        },
        **stats.extra,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "config": cfg_json,
    }


def render_report(s: dict) -> str:
    """report.txt: the numbers a person checks after a build."""
    lines = ["tagjax build report", "=" * 19, ""]
    lines.append(f"posts read      {s['posts_read']:>10,}")
    for split, n in s["records"].items():
        lines.append(f"{split:<15} {n:>10,}")
    lines.append(
        f"kept            {s['posts_written']:>10,}  "
        f"({s['posts_written'] / max(1, s['posts_read']):.1%} of posts read)"
    )
    lines += ["", "dropped, per reason:"]
    for reason, n in s["dropped"].items():
        lines.append(f"  {reason:<28} {n:>10,}")
    img = s["images"]
    lines += [
        "",
        f"images decoded: {img['attempted']:,} attempted, {img['failed']:,} broken "
        f"({img['failed'] / max(1, img['attempted']):.2%})",
    ]
    if "dedup" in s:
        d = s["dedup"]
        lines += [
            "",
            f"deduplication (near threshold {d['near_threshold']}, eval threshold "
            f"{d['eval_threshold']}, Hamming distance of 64-bit perceptual hashes):",
            f"  exact duplicates removed       {d['exact_removed']:>8,}",
            f"  near duplicates removed        {d['near_removed']:>8,}",
            f"  near-duplicates of eval images {d['eval_removed']:>8,}",
            f"  removal rate                   {d['removal_rate']:>8.2%}",
        ]
        for m in d.get("eval_matches", [])[:20]:
            lines.append(f"    {m['post_id']}  ~  {m['eval_image']}  (distance {m['distance']})")
        if len(d.get("eval_matches", [])) > 20:
            lines.append(f"    ... {len(d['eval_matches']) - 20} more in stats.json")
    lines += ["", "per input source:"]
    for source, ps in s["per_source"].items():
        lines.append(
            f"  {source}: read {ps['read']:,}, kept {ps['kept']:,}, "
            f"dedup removal rate {ps['dedup_removal_rate']:.2%}"
        )
    if "habits" in s:
        h = s["habits"]
        lines += [
            "",
            f"uploader habits: {h['users_with_habits']} users, {h['hashtags_removed']:,} "
            f"hashtag uses removed; most common habitual hashtags: "
            + ", ".join(f"#{t} ({n})" for t, n in h["top_habitual"][:10]),
        ]
    lab = s["labels"]
    lines += [
        "",
        f"labels: {lab['vocabulary_size']:,} in the vocabulary, {lab['used_in_train']:,} used "
        f"in train, {lab['mean_per_post']} per post on average",
        "most frequent labels (train images):",
    ]
    for name, n in lab["most_frequent_train"][:20]:
        lines.append(f"  #{name:<26} {n:>8,}")
    if s["hashtags_dropped"]:
        lines += [
            "",
            "hashtags dropped, per reason: "
            + ", ".join(f"{r} {n:,}" for r, n in s["hashtags_dropped"].items()),
        ]
    lines += ["", "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in s["timing_s"].items()), ""]
    return "\n".join(lines)


# ---- output directory --------------------------------------------------------------------------------


def _is_output_file(name: str) -> bool:
    return (
        name in OUTPUT_FILES
        or name == STAGING
        or name.endswith(".array_record")
        or name.endswith(".array_record.tmp")
        or name.endswith(".tmp.npz")
    )


def prepare_output(path: Path, overwrite: bool) -> None:
    """Refuses a non-empty directory unless ``overwrite``; even then, only files a build writes are
    removed (dataset.json first, so an interrupted cleanup never leaves a complete-looking dataset)."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory; choose another --output.")
    path.mkdir(parents=True, exist_ok=True)
    entries = sorted(os.listdir(path))
    if not entries:
        return
    if not overwrite:
        raise UserError(
            f"output directory {path} is not empty; pass --overwrite to replace the "
            "dataset in it, or choose another --output."
        )
    foreign = [e for e in entries if not _is_output_file(e)]
    if foreign:
        raise UserError(
            f"output directory {path} holds files a build did not write ({foreign[0]!r}, "
            f"{len(foreign)} in all); --overwrite only replaces a dataset, choose an empty "
            "directory."
        )
    manifest = path / records.MANIFEST
    if manifest.exists():
        manifest.unlink()
    for e in entries:
        p = path / e
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def finalize(
    root: Path,
    cfg: BuildConfig,
    vocab,
    shards: Mapping[str, Sequence[tuple[str, list]]],
    stats: Stats,
    timing: dict,
) -> dict:
    """After every shard is written: label indexes, vocab, stats, report, and dataset.json last.

    ``shards``: split -> [(shard file name, label lists of its records)] in shard order.
    """
    splits, split_labels = {}, {}
    for split in records.SPLITS:
        entries = list(shards.get(split, []))
        label_lists = [labels for _, lists in entries for labels in lists]
        records.LabelIndex.from_lists(label_lists).save(root / f"{split}.labels.npz")
        splits[split] = {"shards": [name for name, _ in entries], "num_records": len(label_lists)}
        split_labels[split] = label_lists
    vocab.save(root / "vocab.json")
    summary = summarize(stats, cfg.to_json(), vocab, split_labels, timing)
    (root / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "report.txt").write_text(render_report(summary))
    manifest = records.Manifest(
        schema_version=records.SCHEMA_VERSION,
        splits=splits,
        vocab_file="vocab.json",
        vocab_fingerprint=vocab.fingerprint(),
        build={
            **cfg.to_json(),
            "tagjax_version": _version(),
            "records_have_user": cfg.keep_user_ids,
        },
    )
    manifest.save(root)
    return summary


def _version() -> str:
    import tagjax

    try:
        return tagjax.__version__
    except AttributeError:  # a stale editable install can expose tagjax as a namespace package
        from importlib.metadata import version

        return version("tagjax")


# ---- the local builder -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Meta:
    """What pass 1 keeps per admitted post (no image bytes)."""

    post: posts_lib.Post  # image_bytes stripped
    unit: int
    position: int  # index of the post in its unit's reading order
    forms: tuple[str, ...]
    labels: tuple[int, ...] = ()


_WORKER: dict = {}


def _worker_init(
    options: images_lib.ImageOptions, cache_dir: str | None, subprocess: bool = False
) -> None:
    if subprocess:  # one image per worker at a time: OpenCV's own thread pool would only contend
        import cv2

        cv2.setNumThreads(1)
    _WORKER["options"] = options
    _WORKER["cache"] = posts_lib.RasterCache(cache_dir) if cache_dir else None


def _worker_process(post: posts_lib.Post) -> ImageResult:
    return process_post_image(post, _WORKER["options"], _WORKER["cache"])


def _bounded_imap(pool, fn, items: Iterable, window: int) -> Iterator:
    """``pool.imap_unordered`` over consecutive windows of ``items``: Pool's feeder thread would
    otherwise pull the whole iterable (every tar image in memory) before the first result returns."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == window:
            yield from pool.imap_unordered(fn, batch, chunksize=4)
            batch = []
    if batch:
        yield from pool.imap_unordered(fn, batch, chunksize=4)


def _worker_eval_hash(path: str) -> tuple[str, int] | None:
    try:
        p = images_lib.process(Path(path).read_bytes(), _WORKER["options"])
    except (images_lib.ImageSkip, OSError):
        return None
    return path, dedup_lib.phash(p.pixels)


def _eval_options(options: images_lib.ImageOptions) -> images_lib.ImageOptions:
    """Evaluation images are hashed whatever their size or shape: a tiny one can still be copied."""
    return dataclasses.replace(options, min_side=1, max_aspect=1e9)


def _raster_cache_dir(cfg: BuildConfig) -> str | None:
    if cfg.raster_cache == "":
        return None
    return (
        str(Path(cfg.raster_cache).expanduser())
        if cfg.raster_cache
        else str(posts_lib.default_raster_cache())
    )


def resolve_units(cfg: BuildConfig) -> list[posts_lib.Unit]:
    if not cfg.inputs:
        raise UserError("no input given; pass one or more KIND:PATH inputs (e.g. openclipart).")
    units = []
    for spec in cfg.inputs:
        units.extend(posts_lib.parse_source(spec, cfg.yfcc_images))
    return units


def iter_posts(
    units: Sequence[posts_lib.Unit], limit: int = 0
) -> Iterator[tuple[int, int, posts_lib.Post]]:
    """(unit index, position in the unit, post) over all units in order, at most ``limit`` posts."""
    n = 0
    for u, unit in enumerate(units):
        for i, post in enumerate(posts_lib.read_unit(unit)):
            if limit and n >= limit:
                return
            n += 1
            yield u, i, post


def load_eval_hashes(cfg: BuildConfig, pool) -> list[tuple[str, int]]:
    out = []
    options = _eval_options(cfg.images)
    for spec in cfg.eval_sets:
        if spec.startswith("tfds:"):
            out.extend(dedup_lib.load_eval_hashes(spec, options, cfg.tfds_data_dir))
            continue
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise UserError(f"evaluation set {spec!r} is neither a folder nor tfds:NAME/SPLIT.")
        files = sorted(
            str(p)
            for p in root.rglob("*")
            if p.suffix.lower() in posts_lib.IMAGE_EXTENSIONS and p.is_file()
        )
        results = (
            pool.imap(_worker_eval_hash, files, chunksize=16)
            if pool
            else map(_worker_eval_hash, files)
        )
        for r in results:
            if r is not None:
                out.append((f"{spec}:{Path(r[0]).relative_to(root).as_posix()}", r[1]))
    return out


def _check_failures(stats: Stats, cfg: BuildConfig, final: bool) -> None:
    if stats.images_attempted < (1 if final else cfg.failure_min_images):
        return
    fraction = stats.image_failures / stats.images_attempted
    if fraction > cfg.max_failure_fraction:
        broken = {r: n for r, n in stats.dropped.items() if r in FAILURE_REASONS}
        raise UserError(
            f"{stats.image_failures} of {stats.images_attempted} images are broken ({fraction:.1%}: "
            f"{broken}), above --max-failure-fraction {cfg.max_failure_fraction}; check the inputs "
            "or raise the threshold."
        )


def build(cfg: BuildConfig) -> dict:
    """Runs the whole local build; returns the stats dict (also in <output>/stats.json)."""
    from tqdm import tqdm

    from tagjax import vocab as vocab_lib

    root = Path(cfg.output).expanduser()
    units = resolve_units(cfg)
    optout = OptOut.load(cfg.optout_posts, cfg.optout_users)
    if cfg.vocab:
        vocab_lib.Vocabulary.load(cfg.vocab)  # fail before any work if it is unreadable
    prepare_output(root, cfg.overwrite)
    timing: dict[str, float] = {}
    stats = Stats()
    progress = cfg.progress

    # -- pass 1: read, privacy, hashtags, per-user statistics --------------------------------------
    t0 = time.time()
    metas: list[_Meta] = []
    seen_ids: set[str] = set()
    user_posts: collections.Counter = collections.Counter()
    user_forms: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    units_with_bytes: set[int] = set()
    for u, i, post in tqdm(
        iter_posts(units, cfg.limit), desc="reading posts", unit="post", disable=not progress
    ):
        stats.read[post.source] += 1
        if post.problem is None:
            if post.post_id in seen_ids:  # ids key opt-outs and the split: they must be unique
                stats.drop(post.source, DUPLICATE_POST_ID)
                continue
            seen_ids.add(post.post_id)
        reason = admit(post, optout, cfg.assume_public)
        if reason:
            stats.drop(post.source, reason)
            continue
        forms = tag_forms(post)
        if not forms:
            stats.drop(post.source, NO_HASHTAGS)
            continue
        if post.image_bytes is not None:
            units_with_bytes.add(u)
            post = dataclasses.replace(post, image_bytes=None)
        metas.append(_Meta(post=post, unit=u, position=i, forms=forms))
        if post.user is not None:
            user_posts[post.user] += 1
            user_forms[post.user].update(forms)
    timing["read"] = time.time() - t0

    # -- uploader habits, vocabulary, labels, per-user cap -----------------------------------------
    t0 = time.time()
    habits = {}
    if cfg.habit_action == "drop":
        for user, n in user_posts.items():
            h = habits_of_user(n, user_forms[user], cfg.habit_fraction, cfg.habit_min_posts)
            if h:
                habits[user] = h
    habit_uses = collections.Counter()
    survivors: list[_Meta] = []
    form_counts: collections.Counter = collections.Counter()
    for m in metas:
        user_habits = (
            habits.get(m.post.user, frozenset()) if m.post.user is not None else frozenset()
        )
        if user_habits:
            kept = without_habits(m.forms, user_habits)
            habit_uses.update(f for f in m.forms if f in user_habits)
            if not kept:
                stats.drop(m.post.source, HABITUAL_ONLY)
                continue
            m.forms = kept
        form_counts.update(m.forms)
        survivors.append(m)
    stats.extra["habits"] = {
        "users_with_habits": len(habits),
        "hashtags_removed": sum(habit_uses.values()),
        "top_habitual": [[t, n] for t, n in habit_uses.most_common(20)],
    }
    vocab = build_vocabulary(cfg, form_counts)
    canon = vocab_lib.Canonicalizer(vocab, drop_ancestors=cfg.drop_ancestors)
    labelled: list[_Meta] = []
    for m in survivors:
        result = canon(m.forms)
        stats.tags_dropped.update(result.dropped)
        if not result.label_ids:
            stats.drop(m.post.source, NO_LABELS)
            continue
        m.labels = result.label_ids
        labelled.append(m)
    if cfg.max_posts_per_user > 0:
        by_user: dict[str, list[str]] = collections.defaultdict(list)
        for m in labelled:
            if m.post.user is not None:
                by_user[m.post.user].append(m.post.post_id)
        allowed = set()
        for ids in by_user.values():
            allowed |= capped(ids, cfg.max_posts_per_user)
        kept_metas = []
        for m in labelled:
            if m.post.user is not None and m.post.post_id not in allowed:
                stats.drop(m.post.source, USER_CAP)
            else:
                kept_metas.append(m)
        labelled = kept_metas
    timing["labels"] = time.time() - t0
    del metas, survivors

    # -- pass 2: images (worker processes), staged on disk -----------------------------------------
    t0 = time.time()
    workers = cfg.workers or os.cpu_count() or 1
    cache_dir = _raster_cache_dir(cfg)
    staging_dir = root / STAGING
    staging_dir.mkdir()
    wanted = {m.post.post_id: m for m in labelled}
    pool = None
    if workers > 1:
        pool = mp.get_context("forkserver").Pool(
            workers, _worker_init, (cfg.images, cache_dir, True)
        )
    _worker_init(cfg.images, cache_dir)

    def image_jobs() -> Iterator[posts_lib.Post]:
        by_unit: dict[int, list[_Meta]] = collections.defaultdict(list)
        for m in labelled:
            by_unit[m.unit].append(m)
        for u in sorted(by_unit):
            if u in units_with_bytes:  # in-memory images (tars): read the unit again for the bytes
                positions = {m.position for m in by_unit[u]}
                for i, post in enumerate(posts_lib.read_unit(units[u])):
                    if i in positions:
                        yield post
            else:
                for m in by_unit[u]:
                    yield m.post

    ids, labels_of, users_of, sources_of, ranks, chashes, phashes, offsets = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    try:
        eval_hashes = load_eval_hashes(cfg, pool)
        results = (
            _bounded_imap(pool, _worker_process, image_jobs(), window=256 * workers)
            if pool
            else map(_worker_process, image_jobs())
        )
        with (
            open(staging_dir / "images.bin", "wb") as staged,
            tqdm(total=len(labelled), desc="images", unit="img", disable=not progress) as bar,
        ):
            position = 0
            for r in results:
                bar.update(1)
                m = wanted[r.post_id]
                stats.images_attempted += 1
                if r.reason:
                    stats.drop(m.post.source, r.reason)
                    if r.reason in FAILURE_REASONS:
                        stats.image_failures += 1
                        _check_failures(stats, cfg, final=False)
                    continue
                staged.write(r.jpeg)
                offsets.append((position, len(r.jpeg)))
                position += len(r.jpeg)
                ids.append(r.post_id)
                labels_of.append(m.labels)
                users_of.append(m.post.user)
                sources_of.append(m.post.source)
                ranks.append(dedup_lib.rank_key(r.post_id, r.source_pixels, len(m.labels)))
                chashes.append(r.content_hash)
                phashes.append(r.phash)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    _check_failures(stats, cfg, final=True)
    timing["images"] = time.time() - t0

    # -- dedup and split ---------------------------------------------------------------------------
    t0 = time.time()
    decision = deduplicate(ids, ranks, chashes, phashes, eval_hashes, cfg)
    for i, reason in decision.dropped.items():
        stats.drop(sources_of[i], reason)
    stats.extra["dedup"] = decision.summary
    timing["dedup"] = time.time() - t0

    t0 = time.time()
    by_split: dict[str, list[int]] = {s: [] for s in records.SPLITS}
    for i in range(len(ids)):
        if i not in decision.dropped:
            by_split[
                split_of(decision.root_of(ids[i]), cfg.heldout_fraction, cfg.split_seed)
            ].append(i)
            stats.kept_by_source[sources_of[i]] += 1
    shards: dict[str, list[tuple[str, list]]] = {}
    with (
        open(staging_dir / "images.bin", "rb") as staged,
        tqdm(
            total=sum(len(v) for v in by_split.values()),
            desc="writing shards",
            unit="rec",
            disable=not progress,
        ) as bar,
    ):

        def encoded(i: int) -> tuple[str, bytes]:
            staged.seek(offsets[i][0])
            jpeg = staged.read(offsets[i][1])
            bar.update(1)
            return ids[i], make_record(ids[i], jpeg, labels_of[i], users_of[i], cfg.keep_user_ids)

        for split, members in by_split.items():
            count = num_shards(len(members), cfg.shard_size)
            per_shard: dict[int, list[int]] = collections.defaultdict(list)
            for i in members:
                per_shard[shard_of(ids[i], count)].append(i)
            shards[split] = [
                write_one_shard(root, split, s, count, (encoded(i) for i in per_shard[s]))
                for s in range(count)
            ]
    timing["write"] = time.time() - t0
    summary = finalize(root, cfg, vocab, shards, stats, timing)
    shutil.rmtree(staging_dir)
    return summary


@dataclasses.dataclass
class DedupDecision:
    dropped: dict  # index -> reason
    roots: dict  # post id -> root post id (ids absent are their own root)
    summary: dict

    def root_of(self, post_id: str) -> str:
        return self.roots.get(post_id, post_id)


def deduplicate(
    ids: Sequence[str],
    ranks: Sequence[tuple],
    chashes: Sequence[str],
    phashes: Sequence[int],
    eval_hashes: Sequence[tuple[str, int]],
    cfg: BuildConfig,
) -> DedupDecision:
    """Eval decontamination, exact copies, near duplicates (tagjax.dedup), in that order."""
    opts = cfg.dedup
    n = len(ids)
    dropped: dict[int, str] = {}
    eval_matches = []
    matcher = EvalMatcher(eval_hashes, opts.eval_threshold)
    for i in range(n):
        m = matcher.match(phashes[i])
        if m is not None:
            dropped[i] = EVAL_DUPLICATE
            eval_matches.append({"post_id": ids[i], "eval_image": m[0], "distance": m[1]})
    alive = [i for i in range(n) if i not in dropped]
    rank = {ids[i]: ranks[i] for i in alive}
    index = {ids[i]: i for i in alive}
    exact_removed = 0
    if opts.exact:
        best = dedup_lib.best_of_groups({ids[i]: chashes[i] for i in alive}, rank)
        for pid, top in best.items():
            if pid != top:
                dropped[index[pid]] = EXACT_DUPLICATE
                exact_removed += 1
        alive = [i for i in alive if i not in dropped]
    near_removed = 0
    roots: dict[str, str] = {}
    if opts.near_threshold >= 0:
        best = dedup_lib.best_of_groups({ids[i]: phashes[i] for i in alive}, rank)
        for pid, top in best.items():
            if pid != top:
                dropped[index[pid]] = NEAR_DUPLICATE
                near_removed += 1
        alive = [i for i in alive if i not in dropped]
        pairs = dedup_lib.near_pairs(
            np.asarray([phashes[i] for i in alive], np.uint64), opts.near_threshold
        )
        edges = [(ids[alive[a]], ids[alive[b]], int(d)) for a, b, d in pairs]
        resolution = dedup_lib.resolve(rank, edges)
        for pid in resolution.dropped:
            dropped[index[pid]] = NEAR_DUPLICATE
            near_removed += 1
        roots = resolution.root
    summary = {
        "near_threshold": opts.near_threshold,
        "eval_threshold": opts.eval_threshold,
        "eval_images": len(eval_hashes),
        "images_hashed": n,
        "exact_removed": exact_removed,
        "near_removed": near_removed,
        "eval_removed": len(eval_matches),
        "removal_rate": round(len(dropped) / n, 4) if n else 0.0,
        "eval_matches": sorted(eval_matches, key=lambda m: m["post_id"]),
    }
    return DedupDecision(dropped=dropped, roots=roots, summary=summary)


# ---- opt-out after the fact --------------------------------------------------------------------------


def apply_optout(
    dataset: str,
    optout: OptOut,
    inputs: Sequence[str] = (),
    yfcc_images: str | None = None,
    progress: bool = True,
) -> dict:
    """Rewrites a finished dataset without the opted-out posts; returns {"removed": n, ...}.

    User opt-outs need to know which posts a user made: from the records' ``user`` field when the
    dataset kept it, else from the original inputs (``inputs``), read for their metadata only.
    """
    from tqdm import tqdm

    root = Path(dataset).expanduser()
    pending = root / "dataset.json.pending"
    if (root / records.MANIFEST).is_file():
        manifest = records.load_manifest(root)
    elif pending.is_file():  # a previous --apply-optout was interrupted: finish it
        manifest = records.Manifest(**json.loads(pending.read_text()))
    else:
        records.load_manifest(root)  # raises the "not a built dataset" error
    has_user = bool(manifest.build.get("records_have_user"))
    drop_ids = set(optout.posts)
    if optout.users and not has_user:
        if not inputs:
            raise UserError(
                "this dataset does not store user ids, so user opt-outs need the original "
                "inputs to find their posts: pass them too (tagjax build --apply-optout DIR "
                "--optout-users FILE KIND:PATH ...)."
            )
        units = [u for spec in inputs for u in posts_lib.parse_source(spec, yfcc_images)]
        for _, _, post in iter_posts(units):
            if post.user is not None and post.user in optout.users:
                drop_ids.add(post.post_id)
    # From here the dataset is being modified: take dataset.json away so nothing trains on a
    # half-rewritten directory; `pending` lets a re-run finish the job.
    pending.write_text(json.dumps(dataclasses.asdict(manifest), indent=2, sort_keys=True))
    (root / records.MANIFEST).unlink(missing_ok=True)
    removed = collections.Counter()
    splits = {}
    total = sum(manifest.num_records(s) for s in manifest.splits)
    with tqdm(total=total, desc="applying opt-outs", unit="rec", disable=not progress) as bar:
        for split in manifest.splits:
            label_lists = []
            n_kept = 0
            for path in manifest.shard_paths(root, split):
                data = records.read_shard(path)
                keep = []
                for item in data:
                    r = records.decode(item)
                    if r.post_id in drop_ids or (r.user is not None and r.user in optout.users):
                        removed[split] += 1
                        continue
                    keep.append(item)
                    label_lists.append(list(r.labels))
                if len(keep) != len(data):
                    records.write_shard(path, keep)
                n_kept += len(keep)
                bar.update(len(data))
            records.LabelIndex.from_lists(label_lists).save(root / f"{split}.labels.npz")
            splits[split] = {"shards": manifest.splits[split]["shards"], "num_records": n_kept}
    stats_path = root / "stats.json"
    if stats_path.is_file():
        s = json.loads(stats_path.read_text())
        n_removed = sum(removed.values())
        s["dropped"][OPTOUT_AFTER_BUILD] = s["dropped"].get(OPTOUT_AFTER_BUILD, 0) + n_removed
        s["records"] = {k: v["num_records"] for k, v in splits.items()}
        s["posts_written"] = sum(s["records"].values())
        if "dedup" in s:  # no listing may name an opted-out post
            s["dedup"]["eval_matches"] = [
                m for m in s["dedup"].get("eval_matches", []) if m["post_id"] not in drop_ids
            ]
        stats_path.write_text(json.dumps(s, indent=2) + "\n")
        (root / "report.txt").write_text(render_report(s))
    history = list(manifest.build.get("optouts_applied", []))
    history.append({"removed": dict(removed), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    new = dataclasses.replace(
        manifest, splits=splits, build={**manifest.build, "optouts_applied": history}
    )
    new.save(root)
    pending.unlink()
    return {"removed": sum(removed.values()), "per_split": dict(removed)}


# ---- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.epilog = (
        "Inputs are KIND:PATH with KIND one of "
        + ", ".join(posts_lib.SOURCE_KINDS)
        + "; `openclipart` alone reads Debian's openclipart-svg. Example: tagjax build "
        "openclipart --output /tmp/clipart --max-side 96 --limit 3000"
    )
    d = BuildConfig(inputs=(), output="")
    io_ = parser.add_argument_group("inputs and output")
    io_.add_argument("inputs", nargs="*", help="post sources, KIND:PATH")
    io_.add_argument("--output", "-o", help="dataset directory to create")
    io_.add_argument(
        "--overwrite", action="store_true", help="replace a previous build in --output"
    )
    io_.add_argument("--limit", type=int, default=d.limit, help="read at most N posts (0 = all)")
    io_.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help="image worker processes (0 = one per CPU core, 1 = no subprocesses)",
    )
    io_.add_argument("--yfcc-images", default=None, help="folder of YFCC100M photos (yfcc inputs)")
    io_.add_argument(
        "--raster-cache",
        default=None,
        help="cache of rasterized SVGs (default ~/.cache/tagjax/raster; '' = off)",
    )
    io_.add_argument("--no-progress", action="store_true", help="no progress bars")
    io_.add_argument(
        "--beam",
        action="store_true",
        help="run as an Apache Beam pipeline (tagjax.build_beam) instead of local workers",
    )
    io_.add_argument(
        "--beam-options",
        default="",
        help="Beam pipeline options, e.g. '--runner=FlinkRunner --flink_master=host:8081'",
    )
    pv = parser.add_argument_group("privacy")
    pv.add_argument(
        "--assume-public",
        action="store_true",
        help="use posts whose source does not record visibility (only your own data)",
    )
    pv.add_argument(
        "--optout-posts", default=None, help="file of post ids to exclude, one per line"
    )
    pv.add_argument(
        "--optout-users", default=None, help="file of user ids to exclude, one per line"
    )
    pv.add_argument(
        "--keep-user-ids", action="store_true", help="store the uploader id in each record"
    )
    pv.add_argument(
        "--apply-optout",
        metavar="DATASET",
        default=None,
        help="instead of building: remove the opted-out posts/users from DATASET",
    )
    lb = parser.add_argument_group("labels")
    lb.add_argument(
        "--vocab",
        default=None,
        help="vocab.json to label with, or 'in1k' (default: build one from the corpus)",
    )
    lb.add_argument("--vocab-mode", default=d.vocab_mode, choices=("nouns", "in1k"))
    lb.add_argument("--vocab-top-k", type=int, default=d.vocab_top_k)
    lb.add_argument("--vocab-min-count", type=int, default=d.vocab_min_count)
    lb.add_argument(
        "--drop-ancestors",
        action="store_true",
        help="keep #goldenretriever, drop #dog when both are on a post",
    )
    lb.add_argument("--habit-fraction", type=float, default=d.habit_fraction)
    lb.add_argument("--habit-min-posts", type=int, default=d.habit_min_posts)
    lb.add_argument("--habit-action", default=d.habit_action, choices=("drop", "keep"))
    lb.add_argument("--max-posts-per-user", type=int, default=d.max_posts_per_user)
    im = parser.add_argument_group("images")
    o = d.images
    im.add_argument("--max-side", type=int, default=o.max_side, help="shorter side at most, px")
    im.add_argument(
        "--min-side", type=int, default=o.min_side, help="smaller sources are skipped, px"
    )
    im.add_argument("--max-pixels", type=int, default=o.max_pixels, help="decompression-bomb limit")
    im.add_argument("--max-aspect", type=float, default=o.max_aspect)
    im.add_argument("--jpeg-quality", type=int, default=o.jpeg_quality)
    im.add_argument("--max-failure-fraction", type=float, default=d.max_failure_fraction)
    dd = parser.add_argument_group("deduplication and split")
    dd.add_argument(
        "--near-dup-threshold",
        type=int,
        default=d.dedup.near_threshold,
        help="Hamming distance of 64-bit perceptual hashes; -1 = off",
    )
    dd.add_argument("--no-exact-dedup", action="store_true")
    dd.add_argument(
        "--eval-set",
        action="append",
        default=[],
        help="folder or tfds:NAME/SPLIT whose near duplicates are removed (repeatable)",
    )
    dd.add_argument("--eval-threshold", type=int, default=d.dedup.eval_threshold)
    dd.add_argument("--tfds-data-dir", default=None)
    dd.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    dd.add_argument("--split-seed", default=d.split_seed)
    dd.add_argument("--shard-size", type=int, default=d.shard_size, help="records per shard")


def config_from_args(args) -> BuildConfig:
    try:
        image_options = images_lib.ImageOptions(
            max_side=args.max_side,
            min_side=args.min_side,
            max_pixels=args.max_pixels,
            max_aspect=args.max_aspect,
            jpeg_quality=args.jpeg_quality,
        )
    except ValueError as e:
        raise UserError(f"bad image option: {e}.") from None
    for name in ("near_dup_threshold", "eval_threshold"):
        t = getattr(args, name)
        if not -1 <= t < dedup_lib.HASH_BITS // 2:
            raise UserError(f"--{name.replace('_', '-')} must be in [-1, 31], got {t}.")
    return BuildConfig(
        inputs=tuple(args.inputs),
        output=args.output,
        vocab=args.vocab,
        vocab_mode=args.vocab_mode,
        vocab_top_k=args.vocab_top_k,
        vocab_min_count=args.vocab_min_count,
        drop_ancestors=args.drop_ancestors,
        images=image_options,
        dedup=dedup_lib.DedupOptions(
            exact=not args.no_exact_dedup,
            near_threshold=args.near_dup_threshold,
            eval_threshold=args.eval_threshold,
        ),
        eval_sets=tuple(args.eval_set),
        tfds_data_dir=args.tfds_data_dir,
        assume_public=args.assume_public,
        optout_posts=args.optout_posts,
        optout_users=args.optout_users,
        keep_user_ids=args.keep_user_ids,
        max_posts_per_user=args.max_posts_per_user,
        habit_fraction=args.habit_fraction,
        habit_min_posts=args.habit_min_posts,
        habit_action=args.habit_action,
        heldout_fraction=args.heldout_fraction,
        split_seed=args.split_seed,
        shard_size=args.shard_size,
        workers=args.workers,
        max_failure_fraction=args.max_failure_fraction,
        limit=args.limit,
        raster_cache=args.raster_cache,
        overwrite=args.overwrite,
        yfcc_images=args.yfcc_images,
        progress=not args.no_progress,
    )


def run(args) -> int:
    if args.apply_optout:
        optout = OptOut.load(args.optout_posts, args.optout_users)
        if not optout.posts and not optout.users:
            raise UserError("--apply-optout needs --optout-posts and/or --optout-users.")
        result = apply_optout(
            args.apply_optout, optout, args.inputs, args.yfcc_images, progress=not args.no_progress
        )
        print(
            f"removed {result['removed']} records ({result['per_split']}) from {args.apply_optout}"
        )
        return 0
    if not args.output:
        raise UserError("pass --output DIR for the dataset.")
    cfg = config_from_args(args)
    if args.beam:
        import shlex

        from tagjax import build_beam

        summary = build_beam.build(cfg, shlex.split(args.beam_options))
    else:
        summary = build(cfg)
    print(render_report(summary))
    print(f"dataset written to {cfg.output}")
    return 0

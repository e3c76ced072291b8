"""The pieces of ``tagjax build`` that the local builder (tagjax.build) and the Apache Beam pipeline
(tagjax.build_beam) share, so both make the same decisions for every post and write identical files.

* the build's configuration (:class:`BuildConfig`) and the drop reasons every post is counted under;
* the per-post steps, pure functions of one post (or one user's posts): the privacy gate (:func:`admit`),
  hashtag forms and uploader habits (:func:`tag_forms`, :func:`habits_of_user`, :func:`without_habits`),
  the user cap (:func:`capped`), image processing (:func:`process_post_image`), the split and the shard
  of a post id (:func:`split_of`, :func:`shard_of`), the record (:func:`make_record`);
* the dataset directory: staging, shards, statistics and the manifest written last
  (:func:`output_folder`, :func:`write_one_shard`, :func:`summarize`, :func:`finalize`);
* image worker processes (:func:`worker_init`, :func:`worker_process_image`, :func:`worker_eval_hash`).

The stages themselves are described in tagjax.build.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np

import tagjax
from tagjax import dedup as dedup_lib
from tagjax import images as images_lib
from tagjax import posts as posts_lib
from tagjax import records
from tagjax import vocab as vocab_lib
from tagjax.errors import UserError
from tagjax.hashtags import normalize

# Post-level drop reasons of the builder itself (readers', images' and dedup's reasons join them).
DUPLICATE_POST_ID = "duplicate_post_id"
PRIVATE = "private"
VISIBILITY_UNKNOWN = "visibility_unknown"
OPTOUT_POST = "optout_post"
OPTOUT_USER = "optout_user"
NO_HASHTAGS = "no_hashtags"
HABITUAL_ONLY = "habitual_hashtags_only"
TOO_MANY_HASHTAGS = "too_many_hashtags"  # more distinct hashtags than --max-hashtags-per-post
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
DROPS_FILE = "drops.jsonl"  # one line per dropped post: {"id", "reason"}
# The files a build writes besides its shards (dataset.json lists them under build.files), plus the
# `*.labels.npz` of builds made before the memory-mapped label store, so --overwrite removes those too.
OUTPUT_FILES = (
    "vocab.json",
    "stats.json",
    "report.txt",
    "train.labels.npz",
    "heldout.labels.npz",
    DROPS_FILE,
    *(
        f"{split}.labels.{part}.npy"
        for split in records.SPLITS
        for part in ("offsets", "ids", "counts")
    ),
    records.MANIFEST,
)
# Files of an unfinished write or an interrupted --apply-optout, removed with the dataset they belong to.
TRANSIENT_FILES = (records.MANIFEST + ".tmp", "dataset.json.pending")
# The habit filter "explains itself" (stats, report, stderr) when it removes more than this share of
# all hashtag uses.
HABIT_EXPLAIN_SHARE = 0.5


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
    # With fewer uploaders than this the filter is off: a hashtag one of a handful of uploaders puts on
    # most posts is as likely the corpus' topic as a habit.
    habit_min_users: int = 5
    max_hashtags_per_post: int = (
        500  # a post with more distinct hashtags is spam: too_many_hashtags
    )
    image_roots: tuple[
        str, ...
    ] = ()  # folders manifests' image paths may point into (--image-root)
    drops_file: bool = True  # write drops.jsonl (id and reason of every dropped post)
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
    # Where this run writes its files: "" = `output`; a rebuild writes into a hidden folder beside it
    # first (output_folder), and the dataset records `output`, where its files end up.
    write_dir: str = ""
    yfcc_images: str | None = None  # folder of YFCC100M photos
    progress: bool | None = None  # bars on stderr (None: when stderr is a terminal)

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
        if self.max_hashtags_per_post < 1:
            raise UserError(
                f"--max-hashtags-per-post must be at least 1, got {self.max_hashtags_per_post}."
            )
        if self.habit_min_users < 1:
            raise UserError(f"--habit-min-users must be at least 1, got {self.habit_min_users}.")
        if self.limit < 0:
            raise UserError(f"--limit must be 0 (all posts) or more, got {self.limit}.")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 (all cores) or more, got {self.workers}.")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise UserError(
                f"--max-failure-fraction must be in [0, 1], got {self.max_failure_fraction}."
            )

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["inputs"] = list(self.inputs)
        d["eval_sets"] = list(self.eval_sets)
        d["image_roots"] = list(self.image_roots)
        for k in ("progress", "overwrite", "workers", "write_dir"):  # how it ran, not what it made
            d.pop(k)
        return d

    @property
    def files_dir(self) -> str:
        """The folder this run writes into (see ``write_dir``)."""
        return self.write_dir or self.output


@dataclasses.dataclass(frozen=True)
class OptOut:
    posts: frozenset[str] = frozenset()
    users: frozenset[str] = frozenset()

    @classmethod
    def load(cls, posts_file: str | None, users_file: str | None) -> OptOut:
        def ids(path: str | None) -> frozenset[str]:
            return frozenset(posts_lib.read_id_list(path, "opt-out list")) if path else frozenset()

        return cls(posts=ids(posts_file), users=ids(users_file))


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


def tag_forms(post: posts_lib.Post, limit: int = 0) -> tuple[str, ...]:
    """The post's hashtags as normalized forms (tagjax.hashtags.normalize), unique, in order.

    Linear in the number of tags (a dict keeps the order and answers "seen?" in O(1)); with ``limit``
    it stops after ``limit + 1`` distinct forms, enough to tell that a post is over the cap."""
    out: dict[str, None] = {}
    for tag in posts_lib.hashtags_of(post):
        form = normalize(tag)
        if form and form not in out:
            out[form] = None
            if limit and len(out) > limit:
                break
    return tuple(out)


def forms_or_reason(post: posts_lib.Post, max_hashtags: int) -> tuple[tuple[str, ...], str | None]:
    """(the post's forms, None), or ((), why the post has no usable hashtags)."""
    forms = tag_forms(post, limit=max_hashtags)
    if not forms:
        return (), NO_HASHTAGS
    if len(forms) > max_hashtags:
        return (), TOO_MANY_HASHTAGS
    return forms, None


def habit_filter_applies(cfg: BuildConfig, num_users: int) -> bool:
    """Whether to look for uploader habits at all: asked for, and enough uploaders to tell a habit
    from a topic (``habit_min_users``)."""
    return cfg.habit_action == "drop" and num_users >= cfg.habit_min_users


def habit_summary(
    cfg: BuildConfig,
    num_users: int,
    users_with_habits: int,
    habit_uses: Mapping[str, int],
    tag_uses: int,
) -> dict:
    """stats.json's "habits": what the filter removed, why it did not run, and, when it removed most
    hashtag uses, a sentence explaining it (also in the report)."""
    out = {
        "users_with_habits": int(users_with_habits),
        "hashtags_removed": int(sum(habit_uses.values())),
        "top_habitual": [
            [t, int(n)] for t, n in sorted(habit_uses.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        ],
    }
    if cfg.habit_action == "drop" and num_users < cfg.habit_min_users:
        out["skipped"] = (
            f"uploader-habit filter off: {num_users} uploaders, fewer than --habit-min-users "
            f"{cfg.habit_min_users}, cannot tell a habit from the corpus' topic."
        )
    explanation = explain_habits(out, tag_uses)
    if explanation:
        out["explanation"] = explanation
    return out


def explain_habits(habits: dict, tag_uses: int) -> str | None:
    """A sentence on what the habit filter did when it removed most hashtag uses (else None)."""
    removed = habits.get("hashtags_removed", 0)
    if not tag_uses or removed <= HABIT_EXPLAIN_SHARE * tag_uses:
        return None
    top = ", ".join(f"#{t} ({n})" for t, n in habits.get("top_habitual", [])[:5])
    return (
        f"the uploader-habit filter removed {removed:,} of {tag_uses:,} hashtag uses "
        f"({removed / tag_uses:.0%}): {habits.get('users_with_habits', 0)} uploaders put the same "
        f"hashtags on more than --habit-fraction of their posts ({top}). If these are the corpus' "
        "topic rather than habits, pass --habit-action keep, raise --habit-fraction or "
        "--habit-min-users."
    )


def empty_build_error(
    posts_read: int, dropped: Mapping[str, int], habits: dict | None
) -> UserError:
    """The error of a build that would write no training record: every reason that emptied it."""
    reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(dropped.items(), key=lambda kv: -kv[1]))
    msg = (
        f"the build kept no training records: {posts_read:,} posts read, all dropped "
        f"({reasons or 'no reason recorded'}); nothing was written."
    )
    if dropped.get(HABITUAL_ONLY) and habits:
        msg += (
            f" {habits.get('users_with_habits', 0)} uploaders' habits removed every hashtag of "
            f"{dropped[HABITUAL_ONLY]:,} posts; --habit-action keep or --habit-min-users "
            "turns the filter off for corpora from few uploaders."
        )
    return UserError(msg)


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
        data = posts_lib.load_image_bytes(post, options.max_side, cache, options.max_file_bytes)
        p = images_lib.process(data, options)
    except images_lib.ImageSkip as e:
        return ImageResult(post.post_id, reason=e.reason, detail=e.detail[:200])
    return ImageResult(
        post.post_id,
        jpeg=p.jpeg,
        source_pixels=p.source_pixels,
        content_hash=dedup_lib.content_hash(p.jpeg),
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
        self.drop_log = None  # an open text file: one JSON line per dropped post (drops.jsonl)

    def drop(self, source: str, reason: str, n: int = 1, post_id: str | None = None) -> None:
        self.dropped[reason] += n
        self.dropped_by_source[source][reason] += n
        if self.drop_log is not None and post_id is not None:
            self.drop_log.write(drop_line(post_id, reason))


def drop_line(post_id: str, reason: str) -> str:
    """One line of drops.jsonl: the post id and the reason, nothing else about the post or its user."""
    return json.dumps({"id": post_id, "reason": reason}, ensure_ascii=False) + "\n"


def summarize(
    stats: Stats,
    cfg_json: dict,
    vocab,
    splits: Mapping[str, SplitWriter],
    timing: Mapping[str, float],
) -> dict:
    """stats.json content, from the counts of the splits as written."""
    counts = {s: w.num_records for s, w in splits.items()}
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
    train = splits.get("train")
    return {
        "posts_read": posts_read,
        "posts_written": sum(counts.values()),
        "records": counts,
        "dropped": dict(sorted(stats.dropped.items(), key=lambda kv: -kv[1])),
        "per_source": per_source,
        "images": {"attempted": stats.images_attempted, "failed": stats.image_failures},
        "hashtags_dropped": dict(sorted(stats.tags_dropped.items(), key=lambda kv: -kv[1])),
        "labels": label_summary_of_counts(
            vocab,
            train.label_counts if train is not None else np.zeros(vocab.num_labels, np.int64),
            sum(w.num_records for w in splits.values()),
            sum(w.num_pairs for w in splits.values()),
        ),
        **stats.extra,
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "config": cfg_json,
    }


def label_summary(vocab, split_labels: Mapping[str, Sequence[Sequence[int]]]) -> dict:
    """The "labels" part of stats.json from the records' label lists per split (removing posts after
    the fact computes it again from what is left)."""
    train_counts = np.zeros(vocab.num_labels, np.int64)
    for labels in split_labels.get("train", []):
        train_counts[list(labels)] += 1
    lengths = [len(x) for v in split_labels.values() for x in v]
    return label_summary_of_counts(vocab, train_counts, len(lengths), sum(lengths))


def label_summary_of_counts(
    vocab, train_counts: np.ndarray, num_records: int, num_pairs: int
) -> dict:
    """The "labels" part of stats.json: train images per label, and (image, label) pairs over images
    of every split."""
    order = np.argsort(-train_counts, kind="stable")
    top = [[vocab.name_of(int(i)), int(train_counts[i])] for i in order[:30] if train_counts[i] > 0]
    return {
        "vocabulary_size": vocab.num_labels,
        "used_in_train": int((train_counts > 0).sum()),
        "mean_per_post": round(num_pairs / num_records, 3) if num_records else 0,
        "most_frequent_train": top,
    }


def render_report(s: dict) -> str:
    """report.txt: the numbers a person checks after a build."""
    lines = ["tagjax build report", "=" * 19, ""]
    lines.append(f"posts read      {s['posts_read']:>10,}")
    for split, n in s["records"].items():
        lines.append(f"{split:<15} {n:>10,}")
    for split in [split for split, n in s["records"].items() if n == 0]:
        lines.append(
            f"warning: the {split} split is empty (too few posts for --heldout-fraction?); "
            "training on this dataset has no hashtag evaluation"
            if split == "heldout"
            else f"warning: the {split} split is empty"
        )
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
            "hashtag uses removed"
            + (
                "; most common habitual hashtags: "
                + ", ".join(f"#{t} ({n})" for t, n in h["top_habitual"][:10])
                if h["top_habitual"]
                else ""
            ),
        ]
        if h.get("skipped"):
            lines.append(f"  {h['skipped']}")
        if h.get("explanation"):
            lines.append(f"  note: {h['explanation']}")
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


def _listed_files(path: Path) -> list[str] | None:
    """The files a previous tagjax build's manifest says it wrote into ``path`` (None: no manifest).

    dataset.json (or the dataset.json.pending an interrupted --apply-optout leaves) lists its shards,
    its vocabulary and, since this field exists, every other file under ``build.files``; older
    manifests get the fixed output names."""
    for name in (records.MANIFEST, "dataset.json.pending"):
        p = path / name
        if not p.is_file():
            continue
        try:
            m = json.loads(p.read_text(encoding="utf-8"))
            listed = [m["vocab_file"]]
            for split in m["splits"].values():
                listed.extend(split["shards"])
            listed.extend(m.get("build", {}).get("files") or OUTPUT_FILES)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(
                f"{p} is not a readable tagjax dataset manifest; --overwrite refuses to delete "
                f"anything in {path}: remove it yourself or choose another --output."
            ) from None
        return [*listed, *TRANSIENT_FILES, name]
    return None


def _check_output(path: Path, overwrite: bool) -> tuple[bool, list[str] | None]:
    """Refuses a non-empty directory unless ``overwrite``; with it, only a previous tagjax build may be
    replaced (a folder without a tagjax manifest is refused whatever its files are called). Returns
    whether the directory was created here, and the files of the previous build to delete (None when
    the folder is empty): only those its manifest lists, never a path outside the folder."""
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory; choose another --output.")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    entries = sorted(os.listdir(path))
    if not entries:
        return created, None
    if not overwrite:
        raise UserError(
            f"output directory {path} is not empty; pass --overwrite to replace the "
            "dataset in it, or choose another --output."
        )
    listed = _listed_files(path)
    if listed is None:
        raise UserError(
            f"output directory {path} is not a tagjax dataset (it has no {records.MANIFEST}) and "
            f"holds files a build did not write ({entries[0]!r}, {len(entries)} in all); "
            "--overwrite only replaces a previous build, choose an empty directory."
        )
    return created, [n for n in dict.fromkeys(listed) if isinstance(n, str) and _plain_name(n)]


def _remove_previous(path: Path, names: list[str]) -> None:
    """Deletes a previous build's files, dataset.json first (an interrupted cleanup never leaves a
    complete-looking dataset)."""
    (path / records.MANIFEST).unlink(missing_ok=True)
    for name in [*names, STAGING]:
        p = path / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif name == STAGING and p.is_dir():
            shutil.rmtree(p)


@contextlib.contextmanager
def output_folder(path: Path, overwrite: bool) -> Iterator[Path]:
    """The folder a build writes into, cleaned up if the build fails or is interrupted.

    A new or empty ``path`` is written in place. A previous build in ``path`` (``overwrite``) stays whole
    until the new one has finished: the new one is written into a hidden sibling folder, then the old
    files are deleted and the new ones moved in, dataset.json last. So a rebuild that fails (every post
    private, a mistyped image root) or is stopped leaves the old dataset as it was."""
    created, previous = _check_output(path, overwrite)
    target = path
    if previous is not None:
        target = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
    try:
        yield target
    except BaseException:  # an error, Ctrl-C: no staging folder or half-written dataset is left
        if target == path:
            remove_partial_output(path, created)
        else:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if target != path:
        _remove_previous(path, previous)
        names = sorted(os.listdir(target), key=lambda n: n == records.MANIFEST)  # manifest last
        for name in names:
            os.replace(target / name, path / name)
        target.rmdir()


def _plain_name(name: str) -> bool:
    """A manifest entry naming a file directly in the dataset folder (a hostile manifest could list
    ``../x`` or ``/etc/x``; those are never deleted)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def remove_partial_output(path: Path, created: bool) -> None:
    """After a failed or interrupted build: removes its staging folder and the files it wrote (the
    folder was empty or emptied when it started), and the folder itself when the build created it."""
    if not path.is_dir():
        return
    shutil.rmtree(path / STAGING, ignore_errors=True)
    for name in os.listdir(path):
        if name in OUTPUT_FILES or name in TRANSIENT_FILES or _is_shard_file(name):
            (path / name).unlink(missing_ok=True)
    if created and not os.listdir(path):
        path.rmdir()


def _is_shard_file(name: str) -> bool:
    """A shard, or a temporary file of a shard or of a label store (records.NpyStreamWriter)."""
    return name.endswith((".array_record", ".array_record.tmp", ".tmp.npz")) or (
        ".labels." in name and name.endswith(".tmp")
    )


class SplitWriter:
    """One split as its shards are written, in shard order: their file names, and the split's label
    store written record by record (tagjax.records.LabelStoreWriter), so no per-record list is kept."""

    def __init__(self, root: Path, split: str, num_labels: int):
        self.shards: list[str] = []
        self.num_records = 0
        self.num_pairs = 0  # (record, label) pairs
        self.label_counts = np.zeros(num_labels, np.int64)  # records per label, once closed
        self._labels = records.LabelStoreWriter(root, split, num_labels)

    def add_shard(self, name: str, label_lists: Sequence[Sequence[int]]) -> None:
        """The file name of the next shard and its records' label lists, in record order."""
        self.shards.append(name)
        for labels in label_lists:
            self._labels.add(labels)
            self.num_pairs += len(labels)
        self.num_records += len(label_lists)

    def close(self) -> None:
        self.label_counts = self._labels.close().counts(len(self.label_counts))


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
    splits = {}
    for split in records.SPLITS:
        splits[split] = SplitWriter(root, split, vocab.num_labels)
        for name, label_lists in shards.get(split, []):
            splits[split].add_shard(name, label_lists)
    return finalize_splits(root, cfg, vocab, splits, stats, timing)


def finalize_splits(
    root: Path,
    cfg: BuildConfig,
    vocab,
    splits: Mapping[str, SplitWriter],
    stats: Stats,
    timing: dict,
) -> dict:
    """:func:`finalize` with the splits' shards already recorded in ``splits`` (one per split of
    tagjax.records.SPLITS, in that order); closes their label stores."""
    for writer in splits.values():
        writer.close()
    vocab.save(root / "vocab.json")
    summary = summarize(stats, cfg.to_json(), vocab, splits, timing)
    (root / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "report.txt").write_text(render_report(summary))
    written = [n for n in OUTPUT_FILES if n != records.MANIFEST and (root / n).is_file()]
    manifest = records.Manifest(
        schema_version=records.SCHEMA_VERSION,
        splits={
            split: {"shards": list(w.shards), "num_records": w.num_records}
            for split, w in splits.items()
        },
        vocab_file="vocab.json",
        vocab_fingerprint=vocab.fingerprint(),
        build={
            **cfg.to_json(),
            "tagjax_version": _version(),
            "records_have_user": cfg.keep_user_ids,
            "files": written,  # besides the shards: what --overwrite may delete
        },
    )
    manifest.save(root)
    return summary


def _version() -> str:

    try:
        return tagjax.__version__
    except AttributeError:  # a stale editable install can expose tagjax as a namespace package
        return version("tagjax")


_WORKER: dict = {}


def worker_init(
    options: images_lib.ImageOptions, cache_dir: str | None, subprocess: bool = False
) -> None:
    if subprocess:  # one image per worker at a time: OpenCV's own thread pool would only contend
        cv2.setNumThreads(1)
    _WORKER["options"] = options
    _WORKER["cache"] = posts_lib.RasterCache(cache_dir) if cache_dir else None


def worker_process_image(post: posts_lib.Post) -> ImageResult:
    return process_post_image(post, _WORKER["options"], _WORKER["cache"])


def worker_eval_hash(path: str) -> tuple[str, int] | None:
    options = _WORKER["options"]
    try:
        data = posts_lib.read_regular_file(path, options.max_file_bytes)
        p = images_lib.process(data, options)
    except images_lib.ImageSkip:
        return None
    return path, dedup_lib.phash(p.pixels)


def raster_cache_dir(cfg: BuildConfig) -> str | None:
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
        units.extend(
            posts_lib.parse_source(
                spec, cfg.yfcc_images, cfg.image_roots, cfg.images.max_file_bytes
            )
        )
    return units


def check_failures(stats: Stats, cfg: BuildConfig, final: bool) -> None:
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

"""The local ``tagjax build``: tagged posts -> a clean, deduplicated dataset directory (tagjax.records).

The stages, in order; every post that leaves is counted under one reason (``stats.json``, ``report.txt``):

1. **Read** every input (tagjax.posts, which treats inputs as hostile: image paths confined to allowed
   roots, regular files only, size caps). Reader problems (unsafe archive members or paths, unparsable
   or oversized metadata, symlinked copies) and repeated post ids are dropped first; posts with more
   than ``--max-hashtags-per-post`` distinct hashtags after the privacy gate.
2. **Privacy**: only public posts; a post whose source does not say is dropped unless ``--assume-public``;
   opted-out post ids and user ids (``--optout-posts``/``--optout-users``, one id per line) are dropped
   here, before anything about them is computed. User ids are not written unless ``--keep-user-ids``.
3. **Uploader habits** (only with at least ``--habit-min-users`` uploaders in the corpus): for each user
   with at least ``--habit-min-posts`` posts, a hashtag on more than
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
   ``vocab.json``, statistics, ``drops.jsonl`` (id and reason of every dropped post), and
   ``dataset.json`` last: a directory without it is an unfinished build.

A build that would keep no training record fails with the reasons that emptied it; a failed or
interrupted build removes its staging folder and whatever it wrote.

The per-post steps are tagjax.build_steps; the Apache Beam pipeline (tagjax.build_beam) runs the same ones.

Memory does not grow with the corpus: what the stages know about each post lives on disk in the staging
folder (:class:`PostTable`, an SQLite file: ids, users, hashtags, labels, each post's state; images.bin
and raw per-image columns: the processed JPEGs, their hashes and where they are), and shards and label
stores are written one shard at a time. Deduplication and the split hold per-image arrays (hashes, sort
orders, split and shard: ~60 B per image); the rest is per user with habits, per hashtag form and per
input source
(docs/scaling.md, "The local builder at scale").

``tagjax build --apply-optout DATASET --optout-posts FILE`` removes posts from a finished dataset:
every shard holding one is rewritten without it (atomically), the label indexes and statistics are
recomputed, and the manifest is replaced last.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import multiprocessing as mp
import operator
import os
import pickle
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from tagjax import build_steps as steps
from tagjax import dedup as dedup_lib
from tagjax import eval_sets, records
from tagjax import posts as posts_lib
from tagjax import vocab as vocab_lib
from tagjax.errors import UserError
from tagjax.progress import progress_bar

# ---- the local builder -------------------------------------------------------------------------------

# Posts per task sent to an image worker. Every task is a round trip through the pool's pipes that the
# main process pays for: chunks of 16 instead of 4 cut its CPU per post from ~0.43 to ~0.27 ms (2
# workers, benchmarks/README.md), which is what bounds a local build's posts/s whatever the workers.
_IMAGE_TASK_CHUNK = 16
# Rows of the post table read or written per statement batch.
_TABLE_BATCH = 8192
# SQLite page cache of the post table (KiB); the rest of the table stays on disk.
_TABLE_CACHE_KIB = 32 * 1024
# Post states in the table.
_ALIVE, _DROPPED, _CAPPED = 0, 1, 2


def _key(text: str) -> bytes:
    """A post id or user id as the post table stores it: UTF-8 with lone surrogates passed through
    (hostile inputs may hold any string), which sorts like the string itself."""
    return text.encode("utf-8", "surrogatepass")


def _text(key: bytes) -> str:
    return key.decode("utf-8", "surrogatepass")


def _labels_blob(labels: Sequence[int]) -> bytes:
    return np.asarray(labels, np.int32).tobytes()


def _labels_of(blob: bytes) -> tuple[int, ...]:
    return tuple(np.frombuffer(blob, np.int32).tolist())


class PostTable:
    """The admitted posts of a local build and what the stages decide about them, spilled to an SQLite
    file in the staging folder instead of Python objects (which took ~1.5 KB per post).

    ``posts`` has one row per post that passed reading and the privacy gate, numbered by ``seq`` in
    reading order: its unit and position there, the post (pickled, image bytes stripped), its hashtag
    forms, later its labels, and its state (alive, dropped, over the user cap). ``seen`` holds every
    post id read (repeated ids are dropped) and ``user_forms`` one row per (user, form) use for the
    uploader-habit statistics. SQLite keeps a bounded page cache and sorts on disk, so the memory of a
    build does not grow with its corpus. Ids and users are stored as :func:`_key` bytes.
    """

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in (
            "journal_mode = OFF",
            "synchronous = OFF",
            f"cache_size = -{_TABLE_CACHE_KIB}",
        ):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(
            """
            CREATE TABLE seen (pid BLOB PRIMARY KEY) WITHOUT ROWID;
            CREATE TABLE posts (
                seq INTEGER PRIMARY KEY, unit INTEGER, position INTEGER, pid BLOB, user BLOB,
                source INTEGER, post BLOB, forms BLOB, labels BLOB, cap BLOB,
                status INTEGER DEFAULT 0);
            CREATE TABLE user_forms (user BLOB, form BLOB);
            CREATE TABLE capped (seq INTEGER);
            """
        )
        self.db.execute("BEGIN")  # one transaction: the file is scratch, never read after a crash
        self.sources: list[str] = []  # source index -> input source name
        self._source_index: dict[str, int] = {}
        self._pending: list[tuple] = []
        self._pending_forms: list[tuple[bytes, bytes]] = []
        self.size = 0

    def close(self) -> None:
        self.db.close()

    def first_sighting(self, post_id: str) -> bool:
        """Records ``post_id`` as read; False when it was read before."""
        return (
            self.db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (_key(post_id),)).rowcount == 1
        )

    def add(self, unit: int, position: int, post: posts_lib.Post, forms: tuple[str, ...]) -> None:
        """Appends an admitted post (image bytes already stripped)."""
        source = self._source_index.setdefault(post.source, len(self.sources))
        if source == len(self.sources):
            self.sources.append(post.source)
        user = _key(post.user) if post.user is not None else None
        self._pending.append(
            (
                self.size,
                unit,
                position,
                _key(post.post_id),
                user,
                source,
                pickle.dumps(post),
                pickle.dumps(forms),
            )
        )
        if user is not None:
            self._pending_forms.extend((user, _key(f)) for f in forms)
        self.size += 1
        if len(self._pending) >= _TABLE_BATCH:
            self.flush()

    def flush(self) -> None:
        self.db.executemany(
            "INSERT INTO posts (seq, unit, position, pid, user, source, post, forms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            self._pending,
        )
        self.db.executemany("INSERT INTO user_forms VALUES (?, ?)", self._pending_forms)
        self._pending, self._pending_forms = [], []

    def num_users(self) -> int:
        return self.db.execute(
            "SELECT COUNT(DISTINCT user) FROM posts WHERE user IS NOT NULL"
        ).fetchone()[0]

    def user_form_counts(self, min_posts: int) -> Iterator[tuple[bytes, int, dict[str, int]]]:
        """(user, posts, form -> posts of the user with it) for each user with ``min_posts`` posts."""
        per_user = self.db.execute(
            "SELECT user, COUNT(*) FROM posts WHERE user IS NOT NULL GROUP BY user ORDER BY user"
        )
        per_form = self.db.execute(
            "SELECT user, form, COUNT(*) FROM user_forms GROUP BY user, form ORDER BY user, form"
        )
        # Every admitted post has a form: both queries list the same users in the same order.
        for (user, n), (_, rows) in zip(
            per_user, itertools.groupby(per_form, key=operator.itemgetter(0)), strict=True
        ):
            if n >= min_posts:
                yield user, n, {_text(form): c for _, form, c in rows}

    def rows(self, columns: str, status: int = _ALIVE) -> Iterator[tuple]:
        """(seq, *columns) of the posts in ``status``, in reading order. Read in batches, so the caller
        may update rows it has been given between two of them."""
        last = -1
        while True:
            batch = self.db.execute(
                f"SELECT seq, {columns} FROM posts WHERE seq > ? AND status = ? "
                f"ORDER BY seq LIMIT {_TABLE_BATCH}",
                (last, status),
            ).fetchall()
            if not batch:
                return
            yield from batch
            last = batch[-1][0]

    def update(self, assignment: str, rows: list[tuple]) -> None:
        """``UPDATE posts SET <assignment> WHERE seq = ?`` for each row (values..., seq); empties
        ``rows``."""
        self.db.executemany(f"UPDATE posts SET {assignment} WHERE seq = ?", rows)
        rows.clear()

    def count(self, status: int = _ALIVE) -> int:
        return self.db.execute("SELECT COUNT(*) FROM posts WHERE status = ?", (status,)).fetchone()[
            0
        ]

    def cap_users(self, cap: int) -> None:
        """Marks _CAPPED every alive post past the ``cap`` first of its user in (cap hash, id) order,
        the sample :func:`tagjax.build_steps.capped` keeps."""
        over, user_of_run, n = [], None, 0
        for seq, user in self.db.execute(
            "SELECT seq, user FROM posts WHERE status = ? AND user IS NOT NULL "
            "ORDER BY user, cap, pid",
            (_ALIVE,),
        ):
            n = n + 1 if user == user_of_run else 1
            user_of_run = user
            if n > cap:
                over.append((seq,))
                if len(over) >= _TABLE_BATCH:  # another table than the one being read
                    self.db.executemany("INSERT INTO capped VALUES (?)", over)
                    over.clear()
        self.db.executemany("INSERT INTO capped VALUES (?)", over)
        self.db.execute(
            "UPDATE posts SET status = ? WHERE seq IN (SELECT seq FROM capped)", (_CAPPED,)
        )

    def record_meta(self, seq: int) -> tuple[str, str | None, tuple[int, ...], str]:
        """(post id, user, labels, source) of one post."""
        pid, user, labels, source = self.db.execute(
            "SELECT pid, user, labels, source FROM posts WHERE seq = ?", (int(seq),)
        ).fetchone()
        return (
            _text(pid),
            _text(user) if user is not None else None,
            _labels_of(labels),
            self.sources[source],
        )


# The columns of _ImageColumns (64 B per image).
_IMAGE_COLUMNS = {
    "seq": np.int64,  # the post's row in the PostTable
    "offset": np.int64,  # where its JPEG starts in images.bin
    "length": np.int64,
    "source_pixels": np.int64,
    "num_labels": np.int64,
    "phash": np.uint64,
    "content_hash": "S16",
}


class _ImageColumns:
    """One row per processed image, in the order results arrive, appended to ``.npy``-less raw column
    files in the staging folder: what deduplication, the split and the shard writer need (64 B per
    image), not Python objects."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.size = 0
        self._buffers: dict[str, list] = {name: [] for name in _IMAGE_COLUMNS}
        self._files = {name: open(folder / f"images.{name}", "wb") for name in _IMAGE_COLUMNS}  # noqa: SIM115

    def append(self, **values) -> None:
        for name, value in values.items():
            self._buffers[name].append(value)
        self.size += 1
        if len(self._buffers["seq"]) >= _TABLE_BATCH:
            self._flush()

    def _flush(self) -> None:
        for name, values in self._buffers.items():
            np.asarray(values, _IMAGE_COLUMNS[name]).tofile(self._files[name])
            values.clear()

    def close(self) -> dict[str, np.ndarray]:
        """Finishes the files; returns the columns (memory-mapped)."""
        self._flush()
        for f in self._files.values():
            f.close()
        return {
            name: np.memmap(self.folder / f"images.{name}", dtype, mode="r")
            if self.size
            else np.zeros(0, dtype)
            for name, dtype in _IMAGE_COLUMNS.items()
        }


class _LazySequence(Sequence):
    """``seq[i]`` computed on demand: ids and dedup ranks are needed only for images with a duplicate."""

    def __init__(self, size: int, get: Callable[[int], object]):
        self._size, self._get = size, get

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i):
        return self._get(int(i))


def _bounded_imap(pool, fn, items: Iterable, window: int) -> Iterator:
    """``pool.imap_unordered`` over consecutive windows of ``items``: Pool's feeder thread would
    otherwise pull the whole iterable (every tar image in memory) before the first result returns."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == window:
            yield from pool.imap_unordered(fn, batch, chunksize=_IMAGE_TASK_CHUNK)
            batch = []
    if batch:
        yield from pool.imap_unordered(fn, batch, chunksize=_IMAGE_TASK_CHUNK)


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


def build(cfg: steps.BuildConfig) -> dict:
    """Runs the whole local build; returns the stats dict (also in <output>/stats.json)."""

    root = Path(cfg.output).expanduser()
    units = steps.resolve_units(cfg)
    optout = steps.OptOut.load(cfg.optout_posts, cfg.optout_users)
    if cfg.vocab:
        vocab_lib.Vocabulary.load(cfg.vocab)  # fail before any work if it is unreadable
    with steps.output_folder(root, cfg.overwrite) as folder:
        return _build(cfg, folder, units, optout)


def _build(
    cfg: steps.BuildConfig, root: Path, units: Sequence[posts_lib.Unit], optout: steps.OptOut
) -> dict:
    """The build inside an output folder that is ready: staging, and drops.jsonl while it is made."""
    stats = steps.Stats()
    staging_dir = root / steps.STAGING
    staging_dir.mkdir()
    with (
        open(staging_dir / steps.DROPS_FILE, "w", encoding="utf-8")
        if cfg.drops_file
        else contextlib.nullcontext()
    ) as drop_log:
        stats.drop_log = drop_log
        summary = _build_stages(cfg, root, units, optout, stats)
    shutil.rmtree(staging_dir)
    return summary


def _build_stages(
    cfg: steps.BuildConfig,
    root: Path,
    units: Sequence[posts_lib.Unit],
    optout: steps.OptOut,
    stats: steps.Stats,
) -> dict:
    """The stages of the module docstring, in order; every drop goes through ``stats.drop``."""
    staging_dir = root / steps.STAGING
    table = PostTable(staging_dir / "posts.sqlite")
    try:
        return _run_stages(cfg, root, units, stats, optout, table)
    finally:
        table.close()


def _run_stages(
    cfg: steps.BuildConfig,
    root: Path,
    units: Sequence[posts_lib.Unit],
    stats: steps.Stats,
    optout: steps.OptOut,
    table: PostTable,
) -> dict:
    timing: dict[str, float] = {}
    progress = cfg.progress
    staging_dir = root / steps.STAGING

    # -- pass 1: read, privacy, hashtags --------------------------------------------------------------
    t0 = time.time()
    units_with_bytes: set[int] = set()
    for u, i, post in progress_bar(
        iter_posts(units, cfg.limit), desc="reading posts", unit="post", enabled=progress
    ):
        stats.read[post.source] += 1
        if post.problem is None and not table.first_sighting(post.post_id):
            # ids key opt-outs and the split: they must be unique
            stats.drop(post.source, steps.DUPLICATE_POST_ID, post_id=post.post_id)
            continue
        reason = steps.admit(post, optout, cfg.assume_public)
        if not reason:
            forms, reason = steps.forms_or_reason(post, cfg.max_hashtags_per_post)
        if reason:
            stats.drop(post.source, reason, post_id=post.post_id)
            continue
        if post.image_bytes is not None:
            units_with_bytes.add(u)
            post = dataclasses.replace(post, image_bytes=None)
        table.add(u, i, post, forms)
    table.flush()
    timing["read"] = time.time() - t0

    # -- uploader habits, vocabulary, labels, per-user cap -----------------------------------------
    t0 = time.time()
    num_users = table.num_users()
    habits: dict[bytes, frozenset[str]] = {}
    if steps.habit_filter_applies(cfg, num_users):
        for user, n, form_posts in table.user_form_counts(cfg.habit_min_posts):
            h = steps.habits_of_user(n, form_posts, cfg.habit_fraction, cfg.habit_min_posts)
            if h:
                habits[user] = h
    habit_uses = collections.Counter()
    tag_uses = 0
    num_survivors = 0
    form_counts: collections.Counter = collections.Counter()
    updates: list[tuple] = []
    for seq, user, source, pid, forms_blob in table.rows("user, source, pid, forms"):
        forms = pickle.loads(forms_blob)
        tag_uses += len(forms)
        user_habits = habits.get(user, frozenset()) if user is not None else frozenset()
        if user_habits:
            kept = steps.without_habits(forms, user_habits)
            habit_uses.update(f for f in forms if f in user_habits)
            if not kept:
                stats.drop(table.sources[source], steps.HABITUAL_ONLY, post_id=_text(pid))
                updates.append((_DROPPED, None, seq))
            elif kept != forms:
                updates.append((_ALIVE, pickle.dumps(kept), seq))
            forms = kept
        if forms:
            form_counts.update(forms)
            num_survivors += 1
        if len(updates) >= _TABLE_BATCH:
            table.update("status = ?, forms = ?", updates)
    table.update("status = ?, forms = ?", updates)
    stats.extra["habits"] = steps.habit_summary(cfg, num_users, len(habits), habit_uses, tag_uses)
    if not num_survivors:
        raise steps.empty_build_error(
            sum(stats.read.values()), stats.dropped, stats.extra["habits"]
        )
    vocab = steps.build_vocabulary(cfg, form_counts)
    canon = vocab_lib.Canonicalizer(vocab, drop_ancestors=cfg.drop_ancestors)
    for seq, user, source, pid, forms_blob in table.rows("user, source, pid, forms"):
        result = canon(pickle.loads(forms_blob))
        stats.tags_dropped.update(result.dropped)
        if not result.label_ids:
            stats.drop(table.sources[source], steps.NO_LABELS, post_id=_text(pid))
            updates.append((_DROPPED, None, None, seq))
        else:
            cap = None
            if cfg.max_posts_per_user > 0 and user is not None:
                cap = steps.id_hash(_text(pid), "cap").to_bytes(8, "big")
            updates.append((_ALIVE, _labels_blob(result.label_ids), cap, seq))
        if len(updates) >= _TABLE_BATCH:
            table.update("status = ?, labels = ?, cap = ?", updates)
    table.update("status = ?, labels = ?, cap = ?", updates)
    if cfg.max_posts_per_user > 0:
        table.cap_users(cfg.max_posts_per_user)
        for _seq, source, pid in table.rows("source, pid", status=_CAPPED):
            stats.drop(table.sources[source], steps.USER_CAP, post_id=_text(pid))
        table.db.execute("UPDATE posts SET status = ? WHERE status = ?", (_DROPPED, _CAPPED))
    num_labelled = table.count()
    timing["labels"] = time.time() - t0

    # -- pass 2: images (worker processes), staged on disk -----------------------------------------
    t0 = time.time()
    if not num_labelled:
        raise steps.empty_build_error(
            sum(stats.read.values()), stats.dropped, stats.extra["habits"]
        )
    workers = cfg.workers or os.cpu_count() or 1
    cache_dir = steps.raster_cache_dir(cfg)
    pool = None
    if workers > 1:
        pool = mp.get_context("forkserver").Pool(
            workers, steps.worker_init, (cfg.images, cache_dir, True)
        )
    steps.worker_init(cfg.images, cache_dir)
    in_flight: dict[
        str, tuple
    ] = {}  # post id -> (seq, source, labels) of the posts sent to workers

    def image_jobs() -> Iterator[posts_lib.Post]:
        rows = table.rows("unit, position, post, labels, source")
        for u, group in itertools.groupby(rows, key=operator.itemgetter(1)):
            unit_rows = iter(group)
            if u in units_with_bytes:  # in-memory images (tars): read the unit again for the bytes
                wanted = next(unit_rows, None)
                for i, post in enumerate(posts_lib.read_unit(units[u])):
                    if wanted is None:
                        break
                    if i == wanted[2]:
                        in_flight[post.post_id] = (wanted[0], wanted[5], wanted[4])
                        yield post
                        wanted = next(unit_rows, None)
            else:
                for seq, _, _, post_blob, labels, source in unit_rows:
                    post = pickle.loads(post_blob)
                    in_flight[post.post_id] = (seq, source, labels)
                    yield post

    columns = _ImageColumns(staging_dir)
    try:
        eval_hashes = eval_sets.load_eval_hashes(cfg, pool)
        results = (
            _bounded_imap(pool, steps.worker_process_image, image_jobs(), window=256 * workers)
            if pool
            else map(steps.worker_process_image, image_jobs())
        )
        with (
            open(staging_dir / "images.bin", "wb") as staged,
            progress_bar(total=num_labelled, desc="images", unit="img", enabled=progress) as bar,
        ):
            position = 0
            for r in results:
                bar.update(1)
                seq, source, labels = in_flight.pop(r.post_id)
                stats.images_attempted += 1
                if r.reason:
                    stats.drop(table.sources[source], r.reason, post_id=r.post_id)
                    if r.reason in steps.FAILURE_REASONS:
                        stats.image_failures += 1
                        steps.check_failures(stats, cfg, final=False)
                    continue
                staged.write(r.jpeg)
                columns.append(
                    seq=seq,
                    offset=position,
                    length=len(r.jpeg),
                    source_pixels=r.source_pixels,
                    num_labels=len(labels) // 4,
                    phash=r.phash,
                    content_hash=bytes.fromhex(r.content_hash),
                )
                position += len(r.jpeg)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    steps.check_failures(stats, cfg, final=True)
    images = columns.close()
    timing["images"] = time.time() - t0

    # -- dedup and split ---------------------------------------------------------------------------
    t0 = time.time()
    n = columns.size
    meta = table.record_meta
    ids = _LazySequence(n, lambda i: meta(images["seq"][i])[0])
    ranks = _LazySequence(
        n,
        lambda i: dedup_lib.rank_key(ids[i], images["source_pixels"][i], images["num_labels"][i]),
    )
    decision = deduplicate(ids, ranks, images["content_hash"], images["phash"], eval_hashes, cfg)
    for i, reason in sorted(decision.dropped.items()):
        post_id, _, _, source = meta(images["seq"][i])
        stats.drop(source, reason, post_id=post_id)
    stats.extra["dedup"] = decision.summary
    timing["dedup"] = time.time() - t0

    t0 = time.time()
    kept = np.ones(n, bool)
    kept[list(decision.dropped)] = False
    heldout = np.zeros(n, bool)
    shard_hash = np.zeros(n, np.uint64)  # id_hash(id, "shard"): shard_of without the shard count
    for i in _indices_of(kept):
        post_id, _, _, source = meta(images["seq"][i])
        root_index = decision.root_of(i)
        root_id = post_id if root_index == i else ids[root_index]
        heldout[i] = steps.split_of(root_id, cfg.heldout_fraction, cfg.split_seed) == "heldout"
        shard_hash[i] = steps.id_hash(post_id, "shard")
        stats.kept_by_source[source] += 1
    members_of = {"train": np.flatnonzero(kept & ~heldout), "heldout": np.flatnonzero(heldout)}
    if not len(members_of["train"]):
        raise steps.empty_build_error(
            sum(stats.read.values()), stats.dropped, stats.extra["habits"]
        )
    if stats.drop_log is not None:
        stats.drop_log.flush()
        os.replace(staging_dir / steps.DROPS_FILE, root / steps.DROPS_FILE)
    splits: dict[str, steps.SplitWriter] = {}
    with (
        open(staging_dir / "images.bin", "rb") as staged,
        progress_bar(
            total=int(kept.sum()), desc="writing shards", unit="rec", enabled=progress
        ) as bar,
    ):

        def encoded(i: int) -> tuple[str, bytes]:
            post_id, user, labels, _ = meta(images["seq"][i])
            staged.seek(int(images["offset"][i]))
            jpeg = staged.read(int(images["length"][i]))
            bar.update(1)
            return post_id, steps.make_record(post_id, jpeg, labels, user, cfg.keep_user_ids)

        for split in records.SPLITS:
            members = members_of[split]
            count = steps.num_shards(len(members), cfg.shard_size)
            splits[split] = steps.SplitWriter(root, split, vocab.num_labels)
            if not count:
                continue
            shard = shard_hash[members] % np.uint64(count)
            order = np.argsort(
                shard, kind="stable"
            )  # index order inside a shard, as written before
            bounds = np.searchsorted(shard[order], np.arange(count + 1, dtype=np.uint64))
            for s in range(count):
                in_shard = members[order[bounds[s] : bounds[s + 1]]].tolist()
                name, label_lists = steps.write_one_shard(
                    root, split, s, count, (encoded(i) for i in in_shard)
                )
                splits[split].add_shard(name, label_lists)
    timing["write"] = time.time() - t0
    return steps.finalize_splits(root, cfg, vocab, splits, stats, timing)


def _indices_of(mask: np.ndarray) -> Iterator[int]:
    """The indices where ``mask`` is true, as ints, a batch at a time (not one list of them all)."""
    for start in range(0, len(mask), _TABLE_BATCH):
        yield from (np.flatnonzero(mask[start : start + _TABLE_BATCH]) + start).tolist()


@dataclasses.dataclass
class DedupDecision:
    """Which images dedup removes and each kept image's near-duplicate group, by image index."""

    dropped: dict  # index -> reason
    roots: dict  # index -> index of its group's root (indices absent are their own root)
    summary: dict

    def root_of(self, index: int) -> int:
        return self.roots.get(index, index)


def _non_best_of_equal(keys: np.ndarray, members: np.ndarray, ranks: Sequence[tuple]) -> list[int]:
    """The members whose key another member shares and that are not the best-ranked of those
    (tagjax.dedup.best_of_groups on arrays: ranks are read only for members of such groups)."""
    if len(members) < 2:
        return []
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    ends = np.append(starts[1:], len(members))
    out = []
    for a, b in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
        group = members[order[a:b]].tolist()
        top = min(group, key=ranks.__getitem__)
        out.extend(g for g in group if g != top)
    return out


def deduplicate(
    ids: Sequence[str],
    ranks: Sequence[tuple],
    chashes: Sequence[str] | np.ndarray,
    phashes: Sequence[int] | np.ndarray,
    eval_hashes: Sequence[tuple[str, int]],
    cfg: steps.BuildConfig,
) -> DedupDecision:
    """Eval decontamination, exact copies, near duplicates (tagjax.dedup), in that order.

    Images are indices into the four sequences; the hashes are grouped as arrays, and ``ids`` and
    ``ranks`` are read only for images that have a duplicate or an eval match (the local build passes
    sequences that look them up on demand)."""
    opts = cfg.dedup
    phashes = np.asarray(phashes, np.uint64)
    chashes = np.asarray(chashes)
    n = len(phashes)
    dropped: dict[int, str] = {}
    eval_matches = []
    alive = np.ones(n, bool)
    if eval_hashes and opts.eval_threshold >= 0:
        matcher = steps.EvalMatcher(eval_hashes, opts.eval_threshold)
        for i in range(n):
            m = matcher.match(int(phashes[i]))
            if m is not None:
                dropped[i] = steps.EVAL_DUPLICATE
                alive[i] = False
                eval_matches.append({"post_id": ids[i], "eval_image": m[0], "distance": m[1]})
    exact_removed = 0
    if opts.exact:
        members = np.flatnonzero(alive)
        for i in _non_best_of_equal(chashes[members], members, ranks):
            dropped[i] = steps.EXACT_DUPLICATE
            alive[i] = False
            exact_removed += 1
    near_removed = 0
    roots: dict[int, int] = {}
    if opts.near_threshold >= 0:
        members = np.flatnonzero(alive)
        for i in _non_best_of_equal(phashes[members], members, ranks):
            dropped[i] = steps.NEAR_DUPLICATE
            alive[i] = False
            near_removed += 1
        members = np.flatnonzero(alive)
        pairs = dedup_lib.near_pairs(phashes[members], opts.near_threshold)
        edges = [(int(members[a]), int(members[b]), int(d)) for a, b, d in pairs]
        node_ranks = {x: ranks[x] for a, b, _ in edges for x in (a, b)}
        resolution = dedup_lib.resolve(node_ranks, edges)
        for i in resolution.dropped:
            dropped[i] = steps.NEAR_DUPLICATE
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
    optout: steps.OptOut,
    inputs: Sequence[str] = (),
    yfcc_images: str | None = None,
    progress: bool | None = None,
) -> dict:
    """Rewrites a finished dataset without the opted-out posts; returns {"removed": n, ...}.

    User opt-outs need to know which posts a user made: from the records' ``user`` field when the
    dataset kept it, else from the original inputs (``inputs``), read for their metadata only.
    """

    root = Path(dataset).expanduser()
    pending = root / "dataset.json.pending"
    if (root / records.MANIFEST).is_file():
        manifest = records.load_manifest(root)
    elif pending.is_file():  # a previous --apply-optout was interrupted: finish it
        manifest = records.Manifest(**json.loads(pending.read_text()))
    else:
        records.load_manifest(root)  # raises the "not a built dataset" error
    has_user = bool(manifest.build.get("records_have_user"))
    num_labels = vocab_lib.Vocabulary.load(root / manifest.vocab_file).num_labels
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
    removed_ids: list[str] = []
    split_labels: dict[str, list[list[int]]] = {}
    splits = {}
    total = sum(manifest.num_records(s) for s in manifest.splits)
    with progress_bar(total=total, desc="applying opt-outs", unit="rec", enabled=progress) as bar:
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
                        removed_ids.append(r.post_id)
                        continue
                    keep.append(item)
                    label_lists.append(list(r.labels))
                if len(keep) != len(data):
                    records.write_shard(path, keep)
                n_kept += len(keep)
                bar.update(len(data))
            records.LabelStore.write(root, split, label_lists, num_labels)
            records.LabelStore(root, split).legacy_path.unlink(missing_ok=True)  # now stale
            splits[split] = {"shards": manifest.splits[split]["shards"], "num_records": n_kept}
            split_labels[split] = label_lists
    drops_path = root / steps.DROPS_FILE
    if drops_path.is_file() and removed_ids:
        with open(drops_path, "a", encoding="utf-8") as f:
            f.writelines(steps.drop_line(i, steps.OPTOUT_AFTER_BUILD) for i in removed_ids)
    stats_path = root / "stats.json"
    if stats_path.is_file():
        s = json.loads(stats_path.read_text())
        # The label counts are recomputed from the records that remain (report.txt follows).
        s["labels"] = steps.label_summary(
            vocab_lib.Vocabulary.load(root / manifest.vocab_file), split_labels
        )
        n_removed = sum(removed.values())
        s["dropped"][steps.OPTOUT_AFTER_BUILD] = (
            s["dropped"].get(steps.OPTOUT_AFTER_BUILD, 0) + n_removed
        )
        s["records"] = {k: v["num_records"] for k, v in splits.items()}
        s["posts_written"] = sum(s["records"].values())
        if "dedup" in s:  # no listing may name an opted-out post
            s["dedup"]["eval_matches"] = [
                m for m in s["dedup"].get("eval_matches", []) if m["post_id"] not in drop_ids
            ]
        stats_path.write_text(json.dumps(s, indent=2) + "\n")
        (root / "report.txt").write_text(steps.render_report(s))
    history = list(manifest.build.get("optouts_applied", []))
    history.append({"removed": dict(removed), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    new = dataclasses.replace(
        manifest, splits=splits, build={**manifest.build, "optouts_applied": history}
    )
    new.save(root)
    pending.unlink()
    return {"removed": sum(removed.values()), "per_split": dict(removed)}

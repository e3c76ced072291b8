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

``tagjax build --apply-optout DATASET --optout-posts FILE`` removes posts from a finished dataset:
every shard holding one is rewritten without it (atomically), the label indexes and statistics are
recomputed, and the manifest is replaced last.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
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


@dataclasses.dataclass
class _Meta:
    """What pass 1 keeps per admitted post (no image bytes)."""

    post: posts_lib.Post  # image_bytes stripped
    unit: int
    position: int  # index of the post in its unit's reading order
    forms: tuple[str, ...]
    labels: tuple[int, ...] = ()


# Posts per task sent to an image worker. Every task is a round trip through the pool's pipes that the
# main process pays for: chunks of 16 instead of 4 cut its CPU per post from ~0.43 to ~0.27 ms (2
# workers, benchmarks/README.md), which is what bounds a local build's posts/s whatever the workers.
_IMAGE_TASK_CHUNK = 16


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
    created = steps.prepare_output(root, cfg.overwrite)
    try:
        return _build(cfg, root, units, optout)
    except BaseException:  # an error, Ctrl-C: no staging folder or half-written dataset is left
        steps.remove_partial_output(root, created)
        raise


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
    timing: dict[str, float] = {}
    progress = cfg.progress
    staging_dir = root / steps.STAGING

    # -- pass 1: read, privacy, hashtags, per-user statistics --------------------------------------
    t0 = time.time()
    metas: list[_Meta] = []
    seen_ids: set[str] = set()
    user_posts: collections.Counter = collections.Counter()
    user_forms: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    units_with_bytes: set[int] = set()
    for u, i, post in progress_bar(
        iter_posts(units, cfg.limit), desc="reading posts", unit="post", enabled=progress
    ):
        stats.read[post.source] += 1
        if post.problem is None:
            if post.post_id in seen_ids:  # ids key opt-outs and the split: they must be unique
                stats.drop(post.source, steps.DUPLICATE_POST_ID, post_id=post.post_id)
                continue
            seen_ids.add(post.post_id)
        reason = steps.admit(post, optout, cfg.assume_public)
        if not reason:
            forms, reason = steps.forms_or_reason(post, cfg.max_hashtags_per_post)
        if reason:
            stats.drop(post.source, reason, post_id=post.post_id)
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
    if steps.habit_filter_applies(cfg, len(user_posts)):
        for user, n in user_posts.items():
            h = steps.habits_of_user(n, user_forms[user], cfg.habit_fraction, cfg.habit_min_posts)
            if h:
                habits[user] = h
    habit_uses = collections.Counter()
    tag_uses = 0
    survivors: list[_Meta] = []
    form_counts: collections.Counter = collections.Counter()
    for m in metas:
        tag_uses += len(m.forms)
        user_habits = (
            habits.get(m.post.user, frozenset()) if m.post.user is not None else frozenset()
        )
        if user_habits:
            kept = steps.without_habits(m.forms, user_habits)
            habit_uses.update(f for f in m.forms if f in user_habits)
            if not kept:
                stats.drop(m.post.source, steps.HABITUAL_ONLY, post_id=m.post.post_id)
                continue
            m.forms = kept
        form_counts.update(m.forms)
        survivors.append(m)
    stats.extra["habits"] = steps.habit_summary(
        cfg, len(user_posts), len(habits), habit_uses, tag_uses
    )
    if not survivors:
        raise steps.empty_build_error(
            sum(stats.read.values()), stats.dropped, stats.extra["habits"]
        )
    vocab = steps.build_vocabulary(cfg, form_counts)
    canon = vocab_lib.Canonicalizer(vocab, drop_ancestors=cfg.drop_ancestors)
    labelled: list[_Meta] = []
    for m in survivors:
        result = canon(m.forms)
        stats.tags_dropped.update(result.dropped)
        if not result.label_ids:
            stats.drop(m.post.source, steps.NO_LABELS, post_id=m.post.post_id)
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
            allowed |= steps.capped(ids, cfg.max_posts_per_user)
        kept_metas = []
        for m in labelled:
            if m.post.user is not None and m.post.post_id not in allowed:
                stats.drop(m.post.source, steps.USER_CAP, post_id=m.post.post_id)
            else:
                kept_metas.append(m)
        labelled = kept_metas
    timing["labels"] = time.time() - t0
    del metas, survivors

    # -- pass 2: images (worker processes), staged on disk -----------------------------------------
    t0 = time.time()
    if not labelled:
        raise steps.empty_build_error(
            sum(stats.read.values()), stats.dropped, stats.extra["habits"]
        )
    workers = cfg.workers or os.cpu_count() or 1
    cache_dir = steps.raster_cache_dir(cfg)
    wanted = {m.post.post_id: m for m in labelled}
    pool = None
    if workers > 1:
        pool = mp.get_context("forkserver").Pool(
            workers, steps.worker_init, (cfg.images, cache_dir, True)
        )
    steps.worker_init(cfg.images, cache_dir)

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
        eval_hashes = eval_sets.load_eval_hashes(cfg, pool)
        results = (
            _bounded_imap(pool, steps.worker_process_image, image_jobs(), window=256 * workers)
            if pool
            else map(steps.worker_process_image, image_jobs())
        )
        with (
            open(staging_dir / "images.bin", "wb") as staged,
            progress_bar(total=len(labelled), desc="images", unit="img", enabled=progress) as bar,
        ):
            position = 0
            for r in results:
                bar.update(1)
                m = wanted[r.post_id]
                stats.images_attempted += 1
                if r.reason:
                    stats.drop(m.post.source, r.reason, post_id=r.post_id)
                    if r.reason in steps.FAILURE_REASONS:
                        stats.image_failures += 1
                        steps.check_failures(stats, cfg, final=False)
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
    steps.check_failures(stats, cfg, final=True)
    timing["images"] = time.time() - t0

    # -- dedup and split ---------------------------------------------------------------------------
    t0 = time.time()
    decision = deduplicate(ids, ranks, chashes, phashes, eval_hashes, cfg)
    for i, reason in sorted(decision.dropped.items()):
        stats.drop(sources_of[i], reason, post_id=ids[i])
    stats.extra["dedup"] = decision.summary
    timing["dedup"] = time.time() - t0

    t0 = time.time()
    by_split: dict[str, list[int]] = {s: [] for s in records.SPLITS}
    for i in range(len(ids)):
        if i not in decision.dropped:
            by_split[
                steps.split_of(decision.root_of(ids[i]), cfg.heldout_fraction, cfg.split_seed)
            ].append(i)
            stats.kept_by_source[sources_of[i]] += 1
    if not by_split["train"]:
        raise steps.empty_build_error(
            sum(stats.read.values()), stats.dropped, stats.extra["habits"]
        )
    if stats.drop_log is not None:
        stats.drop_log.flush()
        os.replace(staging_dir / steps.DROPS_FILE, root / steps.DROPS_FILE)
    shards: dict[str, list[tuple[str, list]]] = {}
    with (
        open(staging_dir / "images.bin", "rb") as staged,
        progress_bar(
            total=sum(len(v) for v in by_split.values()),
            desc="writing shards",
            unit="rec",
            enabled=progress,
        ) as bar,
    ):

        def encoded(i: int) -> tuple[str, bytes]:
            staged.seek(offsets[i][0])
            jpeg = staged.read(offsets[i][1])
            bar.update(1)
            return ids[i], steps.make_record(
                ids[i], jpeg, labels_of[i], users_of[i], cfg.keep_user_ids
            )

        for split, members in by_split.items():
            count = steps.num_shards(len(members), cfg.shard_size)
            per_shard: dict[int, list[int]] = collections.defaultdict(list)
            for i in members:
                per_shard[steps.shard_of(ids[i], count)].append(i)
            shards[split] = [
                steps.write_one_shard(root, split, s, count, (encoded(i) for i in per_shard[s]))
                for s in range(count)
            ]
    timing["write"] = time.time() - t0
    return steps.finalize(root, cfg, vocab, shards, stats, timing)


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
    cfg: steps.BuildConfig,
) -> DedupDecision:
    """Eval decontamination, exact copies, near duplicates (tagjax.dedup), in that order."""
    opts = cfg.dedup
    n = len(ids)
    dropped: dict[int, str] = {}
    eval_matches = []
    matcher = steps.EvalMatcher(eval_hashes, opts.eval_threshold)
    for i in range(n):
        m = matcher.match(phashes[i])
        if m is not None:
            dropped[i] = steps.EVAL_DUPLICATE
            eval_matches.append({"post_id": ids[i], "eval_image": m[0], "distance": m[1]})
    alive = [i for i in range(n) if i not in dropped]
    rank = {ids[i]: ranks[i] for i in alive}
    index = {ids[i]: i for i in alive}
    exact_removed = 0
    if opts.exact:
        best = dedup_lib.best_of_groups({ids[i]: chashes[i] for i in alive}, rank)
        for pid, top in best.items():
            if pid != top:
                dropped[index[pid]] = steps.EXACT_DUPLICATE
                exact_removed += 1
        alive = [i for i in alive if i not in dropped]
    near_removed = 0
    roots: dict[str, str] = {}
    if opts.near_threshold >= 0:
        best = dedup_lib.best_of_groups({ids[i]: phashes[i] for i in alive}, rank)
        for pid, top in best.items():
            if pid != top:
                dropped[index[pid]] = steps.NEAR_DUPLICATE
                near_removed += 1
        alive = [i for i in alive if i not in dropped]
        pairs = dedup_lib.near_pairs(
            np.asarray([phashes[i] for i in alive], np.uint64), opts.near_threshold
        )
        edges = [(ids[alive[a]], ids[alive[b]], int(d)) for a, b, d in pairs]
        resolution = dedup_lib.resolve(rank, edges)
        for pid in resolution.dropped:
            dropped[index[pid]] = steps.NEAR_DUPLICATE
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

"""The dataset build as an Apache Beam pipeline, for corpora too large for one machine.

It applies the very functions of :mod:`tagjax.build` (privacy gate, hashtag forms, habits, vocabulary,
canonicalization, per-user cap, image processing, dedup keep rule, split, shard writer), arranged as
Beam stages, so on the same input it writes the same records into the same shards as the local builder
(``tests/test_build_beam.py`` checks it):

1. read: one element per input unit (a tar shard, a manifest, a folder), reshuffled so units spread
   over workers, then each unit's posts with their position (the "first occurrence" of a repeated post
   id is the one with the smallest position, as in the local builder's reading order);
2. privacy gate, hashtag forms; per-user habit table (GroupByKey on user); habits removed;
3. **count pass**: hashtag form counts (``Count.PerElement``) -> the vocabulary, built once on one
   worker and handed to every worker as a side input (or the ``--vocab`` file);
4. canonicalize; per-user cap (GroupByKey on user); images (decode, normalize, hash);
5. **dedup by hash grouping**: decontamination against the evaluation hashes (side input); exact copies
   (GroupByKey on the content hash); identical perceptual hashes (GroupByKey on the hash); near
   duplicates: every image is emitted under each of its threshold+1 hash-chunk keys, pairs within the
   threshold are found inside each group, and the keep rule runs on the list of pairs (one worker; its
   size is the number of near-duplicate pairs, not of images);
6. split by group root; records grouped by (split, shard) and written, each shard sorted by id hash;
7. finalize (one worker): label indexes, vocab.json, stats.json, report.txt, dataset.json last.

Runners: the tests use the DirectRunner (in process and with worker processes) and the portable runner
with an external worker pool (the Flink/Spark path). On Dataflow, Flink or Spark the inputs and the
output directory must be paths every worker can read and write (shards are written through POSIX files,
as ArrayRecord requires): a shared filesystem (NFS, Lustre, a GCS or S3 FUSE mount in the worker
container) mounted at the same path on the launcher and all workers. Runner commands and what a cluster
run needs: docs/dataset.md, "Building at scale".
``--limit`` is not supported here (a prefix of the input is a sequential notion): use the local builder.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from pathlib import Path

from tagjax import build_steps as steps
from tagjax import dedup as dedup_lib
from tagjax import eval_sets, records
from tagjax import posts as posts_lib
from tagjax import vocab as vocab_lib
from tagjax.errors import UserError

DROP = "drop"  # tagged output: (source, reason, post id)
EMPTY_NOTE = ".empty_build.json"  # _finalize -> build(): the build kept no training record
TAGDROP = "tagdrop"  # tagged output: (hashtag-level reason, count)
HABIT_USE = "habituse"  # tagged output: a habitual hashtag form removed from one post
EVAL_MATCH = "evalmatch"  # tagged output: {"post_id", "eval_image", "distance"}


def _beam():
    try:
        import apache_beam as beam
    except ImportError:
        raise UserError(
            "the Beam build needs apache-beam: install tagjax with the `beam` extra "
            "(pip install 'tagjax[beam]')."
        ) from None
    return beam


# ---- element functions (module level, so every runner can pickle them) --------------------------------


def _read_unit(indexed_unit):
    u, unit = indexed_unit
    for i, post in enumerate(posts_lib.read_unit(unit)):
        yield (u, i), post


def _problem_or_post(item):
    beam = _beam()
    seq, post = item
    if post.problem:
        yield beam.pvalue.TaggedOutput(DROP, (post.source, post.problem, post.post_id))
    else:
        yield post.post_id, (seq, post)


def _first_occurrence(kv):
    """A repeated post id: the occurrence read first is kept, the others are dropped."""
    beam = _beam()
    _, occurrences = kv
    occurrences = sorted(occurrences, key=lambda x: x[0])
    for _, post in occurrences[1:]:
        yield beam.pvalue.TaggedOutput(DROP, (post.source, steps.DUPLICATE_POST_ID, post.post_id))
    yield occurrences[0][1]


def _admit_and_forms(post, optout, assume_public, max_hashtags):
    beam = _beam()
    reason = steps.admit(post, optout, assume_public)
    if not reason:
        forms, reason = steps.forms_or_reason(post, max_hashtags)
    if reason:
        yield beam.pvalue.TaggedOutput(DROP, (post.source, reason, post.post_id))
        return
    yield post, forms


def _user_habits(kv, fraction, min_posts, num_users, min_users):
    if num_users < min_users:  # too few uploaders to tell a habit from a topic
        return
    user, form_lists = kv
    n = 0
    counts: collections.Counter = collections.Counter()
    for forms in form_lists:
        n += 1
        counts.update(forms)
    habits = steps.habits_of_user(n, counts, fraction, min_posts)
    if habits:
        yield user, sorted(habits)


def _remove_habits(item, habits):
    beam = _beam()
    post, forms = item
    user_habits = frozenset(habits.get(post.user, ())) if post.user is not None else frozenset()
    if user_habits:
        for f in forms:
            if f in user_habits:
                yield beam.pvalue.TaggedOutput(HABIT_USE, f)
        forms = steps.without_habits(forms, user_habits)
        if not forms:
            yield beam.pvalue.TaggedOutput(DROP, (post.source, steps.HABITUAL_ONLY, post.post_id))
            return
    yield post, forms


def _vocab_from_counts(counts, cfg):
    if not counts:  # every post was dropped before labels: _finalize reports why
        return None
    return steps.build_vocabulary(cfg, dict(counts)).to_json()


_CANON: dict = {}


def _canonicalizer(vocab_json, drop_ancestors):
    """One Canonicalizer per worker process and vocabulary (its cache is what makes it fast)."""

    key = (vocab_json["fingerprint"], drop_ancestors)
    if key not in _CANON:
        _CANON.clear()
        _CANON[key] = vocab_lib.Canonicalizer(
            vocab_lib.Vocabulary.from_json(vocab_json), drop_ancestors=drop_ancestors
        )
    return _CANON[key]


def _canonicalize(item, vocab_json, drop_ancestors):
    beam = _beam()
    post, forms = item
    result = _canonicalizer(vocab_json, drop_ancestors)(forms)
    for reason, n in result.dropped.items():
        yield beam.pvalue.TaggedOutput(TAGDROP, (reason, n))
    if not result.label_ids:
        yield beam.pvalue.TaggedOutput(DROP, (post.source, steps.NO_LABELS, post.post_id))
        return
    yield post, tuple(result.label_ids)


def _cap_user(kv, cap):
    beam = _beam()
    _, items = kv
    items = list(items)
    allowed = steps.capped([post.post_id for post, _ in items], cap)
    for post, labels in items:
        if post.post_id in allowed:
            yield post, labels
        else:
            yield beam.pvalue.TaggedOutput(DROP, (post.source, steps.USER_CAP, post.post_id))


_CACHES: dict = {}


def _process_image(item, options, cache_dir):
    beam = _beam()
    post, labels = item
    if cache_dir not in _CACHES:
        _CACHES[cache_dir] = posts_lib.RasterCache(cache_dir) if cache_dir else None
    r = steps.process_post_image(post, options, _CACHES[cache_dir])
    if r.reason:
        yield beam.pvalue.TaggedOutput(DROP, (post.source, r.reason, post.post_id))
        return
    rank = dedup_lib.rank_key(post.post_id, r.source_pixels, len(labels))
    # (post_id, labels, user, source, rank, content hash, perceptual hash, jpeg)
    yield (post.post_id, labels, post.user, post.source, rank, r.content_hash, r.phash, r.jpeg)


_MATCHERS: dict = {}


def _decontaminate(item, eval_hashes, threshold):
    beam = _beam()
    key = (id(eval_hashes), threshold)
    if key not in _MATCHERS:
        _MATCHERS.clear()
        _MATCHERS[key] = steps.EvalMatcher([tuple(x) for x in eval_hashes], threshold)
    m = _MATCHERS[key].match(item[6])
    if m is None:
        yield item
        return
    yield beam.pvalue.TaggedOutput(DROP, (item[3], steps.EVAL_DUPLICATE, item[0]))
    yield beam.pvalue.TaggedOutput(
        EVAL_MATCH, {"post_id": item[0], "eval_image": m[0], "distance": m[1]}
    )


def _keep_best(kv, reason):
    """Members of one exact group (same content hash, or same perceptual hash): the best stays."""
    beam = _beam()
    _, members = kv
    members = sorted(members, key=lambda it: it[4])
    for it in members[1:]:
        yield beam.pvalue.TaggedOutput(DROP, (it[3], reason, it[0]))
    yield members[0]


def _chunk_keyed(item, threshold):
    for key in dedup_lib.chunk_keys(item[6], threshold):
        yield key, (item[0], item[6], item[4])


def _pairs_in_group(kv, threshold):
    """All pairs within the threshold inside one chunk group, as (a, b, distance, rank_a, rank_b) a < b."""
    _, members = kv
    members = sorted(members)
    for i in range(len(members)):
        a_id, a_h, a_rank = members[i]
        for b_id, b_h, b_rank in members[i + 1 :]:
            d = dedup_lib.hamming(a_h, b_h)
            if d <= threshold:
                yield (a_id, b_id, d, tuple(a_rank), tuple(b_rank))


def _resolve_edges(edges):
    ranks = {}
    for a, b, _, ra, rb in edges:
        ranks[a], ranks[b] = tuple(ra), tuple(rb)
    resolution = dedup_lib.resolve(ranks, [(a, b, d) for a, b, d, _, _ in sorted(edges)])
    return {"dropped": {k: v[0] for k, v in resolution.dropped.items()}, "root": resolution.root}


def _assign_split(item, resolution, heldout_fraction, seed):
    beam = _beam()
    if item[0] in resolution["dropped"]:
        yield beam.pvalue.TaggedOutput(DROP, (item[3], steps.NEAR_DUPLICATE, item[0]))
        return
    root = resolution["root"].get(item[0], item[0])
    yield steps.split_of(root, heldout_fraction, seed), item


def _shard_keyed(split_item, split_counts, shard_size):
    split, item = split_item
    count = steps.num_shards(split_counts[split], shard_size)
    return (split, steps.shard_of(item[0], count), count), item


def _write_shard(kv, output, keep_user_ids):
    (split, index, count), items = kv
    encoded = [
        (it[0], steps.make_record(it[0], it[7], it[1], it[2], keep_user_ids)) for it in items
    ]
    name, label_lists = steps.write_one_shard(Path(output), split, index, count, encoded)
    return split, index, count, name, label_lists


def _finalize(
    shard_results,
    cfg,
    vocab_json,
    drops,
    tag_drops,
    habit_uses,
    habit_users,
    num_users,
    tag_uses,
    drop_ids,
    eval_matches,
    read_counts,
    kept_counts,
    images_attempted,
    images_hashed,
    eval_count,
    started,
):

    stats = steps.Stats()
    for source, n in read_counts:
        stats.read[source] += n
    for (source, reason), n in drops:
        stats.drop(source, reason, n)
    for source, n in kept_counts:
        stats.kept_by_source[source] += n
    for reason, n in tag_drops:
        stats.tags_dropped[reason] += n
    stats.images_attempted = int(images_attempted)
    stats.image_failures = sum(n for r, n in stats.dropped.items() if r in steps.FAILURE_REASONS)
    stats.extra["habits"] = steps.habit_summary(
        cfg, int(num_users), int(habit_users), dict(habit_uses), int(tag_uses)
    )
    d = stats.dropped
    hashed = int(images_hashed)
    removed = d[steps.EXACT_DUPLICATE] + d[steps.NEAR_DUPLICATE] + d[steps.EVAL_DUPLICATE]
    stats.extra["dedup"] = {
        "near_threshold": cfg.dedup.near_threshold,
        "eval_threshold": cfg.dedup.eval_threshold,
        "eval_images": int(eval_count),
        "images_hashed": hashed,
        "exact_removed": d[steps.EXACT_DUPLICATE],
        "near_removed": d[steps.NEAR_DUPLICATE],
        "eval_removed": d[steps.EVAL_DUPLICATE],
        "removal_rate": round(removed / hashed, 4) if hashed else 0.0,
        "eval_matches": sorted(eval_matches, key=lambda m: m["post_id"]),
    }
    steps.check_failures(
        stats, cfg, final=True
    )  # raises: the run fails and no dataset.json is written
    by_split: dict[str, dict[int, tuple]] = collections.defaultdict(dict)
    counts = {}
    for split, index, count, name, label_lists in shard_results:
        by_split[split][index] = (name, label_lists)
        counts[split] = count
    root = Path(cfg.files_dir)
    if vocab_json is None or not counts.get("train"):
        # No training record: build() turns this note into the error that names the reasons.
        (root / EMPTY_NOTE).write_text(
            json.dumps(
                {
                    "posts_read": sum(stats.read.values()),
                    "dropped": dict(stats.dropped),
                    "habits": stats.extra["habits"],
                }
            )
        )
        return 0
    if cfg.drops_file:
        with open(root / steps.DROPS_FILE, "w", encoding="utf-8") as f:
            f.writelines(steps.drop_line(pid, reason) for pid, reason in sorted(drop_ids))
    shards: dict[str, list] = {s: [] for s in records.SPLITS}
    for split, count in counts.items():
        for index in range(count):
            # A shard whose hash range received no record has no group: write it empty, as the
            # local builder does, so both builds list the same files.
            entry = by_split[split].get(index) or steps.write_one_shard(
                Path(cfg.files_dir), split, index, count, []
            )
            shards[split].append(entry)
    vocab = vocab_lib.Vocabulary.from_json(vocab_json)
    timing = {"beam_pipeline": time.time() - started}
    summary = steps.finalize(Path(cfg.files_dir), cfg, vocab, shards, stats, timing)
    return summary["posts_written"]


# ---- the pipeline --------------------------------------------------------------------------------


def build_pipeline(
    p, cfg: steps.BuildConfig, units, eval_hashes, optout: steps.OptOut, given_vocab_json=None
):
    """Adds the build's stages to pipeline ``p``."""
    beam = _beam()
    started = time.time()
    drops = []

    def split_outputs(pcoll, label, fn, *args, tags=(DROP,), **kwargs):
        out = pcoll | label >> beam.FlatMap(fn, *args, **kwargs).with_outputs(*tags, main="main")
        drops.append(out[DROP])
        return out

    units_pc = (
        p | "units" >> beam.Create(list(enumerate(units))) | "spread units" >> beam.Reshuffle()
    )
    posts_pc = units_pc | "read" >> beam.FlatMap(_read_unit)
    read_counts = (
        posts_pc
        | "source of read" >> beam.Map(lambda x: x[1].source)
        | "count read" >> beam.combiners.Count.PerElement()
    )
    keyed = split_outputs(posts_pc, "problems", _problem_or_post)
    unique = split_outputs(
        keyed.main | "group ids" >> beam.GroupByKey(), "first occurrence", _first_occurrence
    )
    with_forms = split_outputs(
        unique.main,
        "privacy + hashtags",
        _admit_and_forms,
        optout,
        cfg.assume_public,
        cfg.max_hashtags_per_post,
    )
    tag_uses = (
        with_forms.main
        | "tags per post" >> beam.Map(lambda x: len(x[1]))
        | "count tag uses" >> beam.CombineGlobally(sum)
    )
    user_forms = (
        with_forms.main
        | "users" >> beam.Filter(lambda x: x[0].user is not None)
        | "user forms" >> beam.Map(lambda x: (x[0].user, x[1]))
        | "group users" >> beam.GroupByKey()
    )
    num_users = user_forms | "count users" >> beam.combiners.Count.Globally()

    if cfg.habit_action == "drop":
        habits = user_forms | "habits" >> beam.FlatMap(
            _user_habits,
            cfg.habit_fraction,
            cfg.habit_min_posts,
            beam.pvalue.AsSingleton(num_users),
            cfg.habit_min_users,
        )
    else:
        habits = p | "no habits" >> beam.Create([])
    habits_dict = beam.pvalue.AsDict(habits)
    habit_users = habits | "count habit users" >> beam.combiners.Count.Globally()
    no_habits = split_outputs(
        with_forms.main, "remove habits", _remove_habits, habits_dict, tags=(DROP, HABIT_USE)
    )
    habit_uses = no_habits[HABIT_USE] | "count habit uses" >> beam.combiners.Count.PerElement()

    if given_vocab_json is not None:
        vocab = p | "given vocab" >> beam.Create([given_vocab_json])
    else:
        counts = (
            no_habits.main
            | "forms" >> beam.FlatMap(lambda x: x[1])
            | "count forms" >> beam.combiners.Count.PerElement()
            | "to dict" >> beam.combiners.ToDict()
        )
        vocab = counts | "build vocab" >> beam.Map(_vocab_from_counts, cfg)
    vocab_side = beam.pvalue.AsSingleton(vocab)
    labelled = split_outputs(
        no_habits.main,
        "canonicalize",
        _canonicalize,
        vocab_side,
        cfg.drop_ancestors,
        tags=(DROP, TAGDROP),
    )
    tag_drops = labelled[TAGDROP] | "sum tag drops" >> beam.CombinePerKey(sum)
    to_images = labelled.main
    if cfg.max_posts_per_user > 0:
        with_user = to_images | "has user" >> beam.Filter(lambda x: x[0].user is not None)
        without_user = to_images | "no user" >> beam.Filter(lambda x: x[0].user is None)
        capped_out = split_outputs(
            with_user
            | "by user" >> beam.Map(lambda x: (x[0].user, x))
            | "group for cap" >> beam.GroupByKey(),
            "cap",
            _cap_user,
            cfg.max_posts_per_user,
        )
        to_images = (capped_out.main, without_user) | "after cap" >> beam.Flatten()
    images_attempted = to_images | "count attempted" >> beam.combiners.Count.Globally()
    processed = split_outputs(
        to_images, "images", _process_image, cfg.images, steps.raster_cache_dir(cfg)
    )
    images_hashed = processed.main | "count hashed" >> beam.combiners.Count.Globally()

    eval_side = beam.pvalue.AsList(p | "eval hashes" >> beam.Create([list(x) for x in eval_hashes]))
    clean = split_outputs(
        processed.main,
        "decontaminate",
        _decontaminate,
        eval_side,
        cfg.dedup.eval_threshold,
        tags=(DROP, EVAL_MATCH),
    )
    eval_matches = clean[EVAL_MATCH] | "list eval matches" >> beam.combiners.ToList()
    items = clean.main
    if cfg.dedup.exact:
        items = split_outputs(
            items
            | "by content" >> beam.Map(lambda it: (it[5], it))
            | "group content" >> beam.GroupByKey(),
            "exact",
            _keep_best,
            steps.EXACT_DUPLICATE,
        ).main
    if cfg.dedup.near_threshold >= 0:
        t = cfg.dedup.near_threshold
        reps = split_outputs(
            items
            | "by phash" >> beam.Map(lambda it: (it[6], it))
            | "group phash" >> beam.GroupByKey(),
            "same phash",
            _keep_best,
            steps.NEAR_DUPLICATE,
        ).main
        edges = (
            reps
            | "chunk keys" >> beam.FlatMap(_chunk_keyed, t)
            | "group chunks" >> beam.GroupByKey()
            | "pairs" >> beam.FlatMap(_pairs_in_group, t)
            | "distinct pairs" >> beam.Distinct()
            | "all pairs" >> beam.combiners.ToList()
        )
        resolution = edges | "keep rule" >> beam.Map(_resolve_edges)
        items = reps
    else:
        resolution = p | "no near dedup" >> beam.Create([{"dropped": {}, "root": {}}])
    split_items = split_outputs(
        items,
        "split",
        _assign_split,
        beam.pvalue.AsSingleton(resolution),
        cfg.heldout_fraction,
        cfg.split_seed,
    )
    kept = split_items.main
    kept_counts = (
        kept
        | "source of kept" >> beam.Map(lambda x: x[1][3])
        | "count kept" >> beam.combiners.Count.PerElement()
    )
    split_counts = (
        kept
        | "split names" >> beam.Map(lambda x: x[0])
        | "count splits" >> beam.combiners.Count.PerElement()
    )
    shard_results = (
        kept
        | "shard keys" >> beam.Map(_shard_keyed, beam.pvalue.AsDict(split_counts), cfg.shard_size)
        | "group shards" >> beam.GroupByKey()
        | "write shards" >> beam.Map(_write_shard, cfg.files_dir, cfg.keep_user_ids)
        | "shard list" >> beam.combiners.ToList()
    )
    flat_drops = drops | "all drops" >> beam.Flatten()
    all_drops = (
        flat_drops
        | "drop keys" >> beam.Map(lambda d: (d[0], d[1]))
        | "count drops" >> beam.combiners.Count.PerElement()
    )
    if cfg.drops_file:
        drop_ids = flat_drops | "drop ids" >> beam.Map(lambda d: (d[2], d[1]))
    else:
        drop_ids = p | "no drop ids" >> beam.Create([])
    return shard_results | "finalize" >> beam.Map(
        _finalize,
        cfg,
        vocab_side,
        beam.pvalue.AsList(all_drops),
        beam.pvalue.AsList(tag_drops),
        beam.pvalue.AsList(habit_uses),
        beam.pvalue.AsSingleton(habit_users),
        beam.pvalue.AsSingleton(num_users),
        beam.pvalue.AsSingleton(tag_uses),
        beam.pvalue.AsList(drop_ids),
        beam.pvalue.AsSingleton(eval_matches),
        beam.pvalue.AsList(read_counts),
        beam.pvalue.AsList(kept_counts),
        beam.pvalue.AsSingleton(images_attempted),
        beam.pvalue.AsSingleton(images_hashed),
        len(eval_hashes),
        started,
    )


def build(cfg: steps.BuildConfig, pipeline_args=()) -> dict:
    """Runs the Beam build (DirectRunner unless ``pipeline_args`` say otherwise); returns stats.json."""
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    if cfg.limit:
        raise UserError(
            "--limit is not supported by the Beam build; use the local builder for subsets."
        )
    root = Path(cfg.output).expanduser()
    units = steps.resolve_units(cfg)
    optout = steps.OptOut.load(cfg.optout_posts, cfg.optout_users)
    given = vocab_lib.Vocabulary.load(cfg.vocab).to_json() if cfg.vocab else None
    with steps.output_folder(root, cfg.overwrite) as folder:
        run_cfg = dataclasses.replace(cfg, write_dir=str(folder))
        try:
            steps.worker_init(cfg.images, steps.raster_cache_dir(cfg))
            eval_hashes = eval_sets.load_eval_hashes(cfg, None)
            options = PipelineOptions(list(pipeline_args))
            with beam.Pipeline(options=options) as p:
                build_pipeline(p, run_cfg, units, eval_hashes, optout, given)
            empty = folder / EMPTY_NOTE
            if empty.is_file():
                note = json.loads(empty.read_text())
                raise steps.empty_build_error(note["posts_read"], note["dropped"], note["habits"])
            manifest = folder / records.MANIFEST
            if not manifest.is_file():
                raise UserError(
                    f"the Beam pipeline finished but wrote no {root / records.MANIFEST}; see the "
                    "runner's log."
                )
            return json.loads((folder / "stats.json").read_text())
        finally:
            (folder / EMPTY_NOTE).unlink(missing_ok=True)

"""What one hostile post costs the builder: a post with 40k or 450k distinct hashtags.

Measured, each on one post:

* hashtag forms, the old way (the list-membership loop ``tag_forms`` used before: quadratic) beside the
  current one (a dict: linear), without the per-post cap, so both do the whole post; the old loop runs
  only on the 40k post (the 450k one did not finish in 180 s when the issue was filed);
* the builder's pass-1 path for one manifest line (JSONL parse, privacy gate, forms with the default cap
  ``max_hashtags_per_post``), with the tags as a ``tags`` list and as ``#tags`` in the caption;
* canonicalization of the same number of distinct split compounds (``#dogcat``) by
  :class:`tagjax.vocab.Canonicalizer` (its per-compound re-sort was quadratic too);
* a whole ``tagjax build`` (one worker) of 20 ordinary posts plus the 450k-tag post.

Run (one core, as recorded in benchmarks/README.md)::

    taskset -c 0 .venv/bin/python benchmarks/hostile_posts.py
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tagjax import build, build_steps, images, posts
from tagjax import vocab as V
from tagjax.hashtags import normalize


def quadratic_tag_forms(post: posts.Post) -> tuple[str, ...]:
    """tagjax.build_steps.tag_forms as it was before the fix: ``form not in out`` on a list."""
    out: list[str] = []
    for tag in posts.hashtags_of(post):
        form = normalize(tag)
        if form and form not in out:
            out.append(form)
    return tuple(out)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def distinct_tags(n: int) -> list[str]:
    return [f"spam{i}tag" for i in range(n)]


def pass_one(manifest: Path) -> list[tuple[str, str | None]]:
    """What build.build does per post before any image is touched."""
    cfg = build_steps.BuildConfig(inputs=(), output="")
    optout = build_steps.OptOut()
    out = []
    for post in posts.read_jsonl(str(manifest)):
        reason = build_steps.admit(post, optout, assume_public=True)
        if not reason:
            _, reason = build_steps.forms_or_reason(post, cfg.max_hashtags_per_post)
        out.append((post.post_id, reason))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="40000,450000", help="distinct hashtags per hostile post")
    ap.add_argument("--old-max", type=int, default=40_000, help="largest post the old loop runs on")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    rows: list[tuple[str, int, float]] = []

    for n in sizes:
        post = posts.Post(post_id="hostile", tags=tuple(distinct_tags(n)), public=True)
        if n <= args.old_max:
            dt, forms = timed(quadratic_tag_forms, post)
            assert len(forms) == n
            rows.append(("tag forms, old (list, quadratic)", n, dt))
        dt, forms = timed(build_steps.tag_forms, post)
        assert len(forms) == n
        rows.append(("tag forms, now (dict, linear)", n, dt))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in sizes:
            for field in ("tags", "caption"):
                tags = distinct_tags(n)
                value = tags if field == "tags" else " ".join(f"#{t}" for t in tags)
                manifest = tmp / f"{field}{n}.jsonl"
                line = {"id": "hostile", "image": "x.jpg", field: value, "public": True}
                manifest.write_text(json.dumps(line) + "\n")
                dt, got = timed(pass_one, manifest)
                assert got == [("hostile", build_steps.TOO_MANY_HASHTAGS)], got
                rows.append((f"pass 1 of one JSONL line, {field} (capped)", n, dt))

        vocab = V.Vocabulary.load("in1k")
        names = [vocab.name_of(i) for i in range(vocab.num_labels)]
        rng = random.Random(0)
        for n in sizes:
            compounds: dict[str, None] = {}
            while len(compounds) < n:
                compounds[rng.choice(names) + rng.choice(names)] = None
            canon = V.Canonicalizer(vocab, split_compounds=True)
            tags = list(compounds)
            dt, result = timed(canon, tags)
            assert result.label_ids
            rows.append(("canonicalize split compounds (first sight)", n, dt))
            dt, _ = timed(canon, tags)
            rows.append(("canonicalize split compounds (cached)", n, dt))

        # A whole build: 20 ordinary posts and the 450k-tag one.
        corpus = tmp / "corpus"
        corpus.mkdir()
        lines = []
        animals = ["dog", "cat", "horse", "bird", "boat"]
        for i in range(20):
            pixels = np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, "JPEG")
            (corpus / f"{i}.jpg").write_bytes(buf.getvalue())
            lines.append({"id": f"p{i}", "image": f"{i}.jpg", "tags": [animals[i % 5]]})
        big = max(sizes)
        lines.append({"id": "hostile", "image": "0.jpg", "tags": distinct_tags(big)})
        (corpus / "posts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        cfg = build_steps.BuildConfig(
            inputs=(f"jsonl:{corpus / 'posts.jsonl'}",),
            output=str(tmp / "out"),
            assume_public=True,
            vocab_min_count=1,
            images=images.ImageOptions(max_side=32),
            dedup=build_steps.dedup_lib.DedupOptions(near_threshold=-1),
            heldout_fraction=0.0,
            workers=1,
            raster_cache="",
            progress=False,
        )
        dt, stats = timed(build.build, cfg)
        assert stats["dropped"][build_steps.TOO_MANY_HASHTAGS] == 1, stats["dropped"]
        rows.append((f"tagjax build: 20 posts + one {big:,}-tag post", big, dt))

    print(f"{'what':<52} {'tags':>9} {'seconds':>9}")
    for what, n, dt in rows:
        print(f"{what:<52} {n:>9,} {dt:>9.3f}")
    print(
        json.dumps(
            {
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "processor": platform.processor() or platform.platform(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tagjax.build: privacy, labels, image failures, dedup, split, output format, crash safety, opt-outs."""

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tagjax import build, build_steps, dedup, images, posts, records
from tagjax import vocab as vocab_lib
from tagjax.cli import main as cli_main
from tagjax.errors import UserError


def drawing(seed: int, size: int = 64) -> np.ndarray:
    """A small picture with structure (a gradient and a few shapes), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = Image.fromarray(
        np.clip(a * x[..., None] + b * (1 - y[..., None]), 0, 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            [x0, y0, x0 + w, y0 + h], fill=color
        )
    return np.asarray(img)


def jpeg(pixels: np.ndarray, quality: int = 90, scale: float = 1.0) -> bytes:
    img = Image.fromarray(pixels)
    if scale != 1.0:
        img = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR
        )
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# (post id, image spec, fields). Image specs: ("draw", seed, size), ("copy_of", id), ("near_of", id),
# ("corrupt",), ("truncated",), ("missing",).
CORPUS = [
    ("p01", ("draw", 1, 64), {"tags": ["dog", "beach"], "user": "u1"}),
    ("p02", ("draw", 2, 96), {"tags": ["cat"], "user": "u2"}),
    ("p03", ("draw", 3, 64), {"caption": "A #Horse and a #dog", "user": "u3"}),
    ("p04", ("draw", 4, 64), {"tags": ["car", "tree"], "user": "u1"}),
    ("p05", ("draw", 5, 64), {"tags": ["boat"], "user": "u4"}),
    ("p06", ("draw", 6, 64), {"tags": ["house", "flower"], "user": "u2"}),
    ("p07", ("draw", 7, 64), {"tags": ["#bird"], "user": "u3"}),
    ("p08", ("draw", 8, 64), {"tags": ["dogs"], "user": "u4"}),
    ("p09", ("draw", 9, 64), {"tags": ["cat", "tree"], "user": "u5"}),
    ("p10", ("draw", 10, 64), {"tags": ["flower"], "user": "u5"}),
    ("private1", ("draw", 11, 64), {"tags": ["dog"], "user": "u1", "public": False}),
    ("unknown1", ("draw", 12, 64), {"tags": ["dog"], "user": "u1", "public": None}),
    ("optuser1", ("draw", 13, 64), {"tags": ["cat"], "user": "opted_out_user"}),
    ("optpost1", ("draw", 14, 64), {"tags": ["dog"], "user": "u2"}),
    ("corrupt1", ("corrupt",), {"tags": ["dog"], "user": "u6"}),
    ("trunc1", ("truncated",), {"tags": ["cat"], "user": "u6"}),
    ("missing1", ("missing",), {"tags": ["cat"], "user": "u6"}),
    ("p01copy", ("copy_of", "p01"), {"tags": ["dog", "beach"], "user": "u7"}),
    ("p02near", ("near_of", "p02"), {"tags": ["cat"], "user": "u7"}),
    ("evalcopy", ("draw", 20, 64), {"tags": ["dog"], "user": "u8"}),
    ("nolabel1", ("draw", 21, 64), {"tags": ["happy", "instagood"], "user": "u8"}),
    ("notags1", ("draw", 22, 64), {"user": "u8"}),
    ("p05", ("draw", 23, 64), {"tags": ["cat"], "user": "u9"}),  # a repeated post id
]
KEPT = {f"p{i:02d}" for i in range(1, 11)}
EXPECTED_DROPS = {
    build_steps.PRIVATE: 1,
    build_steps.VISIBILITY_UNKNOWN: 1,
    build_steps.OPTOUT_USER: 1,
    build_steps.OPTOUT_POST: 1,
    images.CORRUPT: 1,
    images.TRUNCATED: 1,
    posts.MISSING_IMAGE: 1,
    build_steps.EXACT_DUPLICATE: 1,
    build_steps.NEAR_DUPLICATE: 1,
    build_steps.EVAL_DUPLICATE: 1,
    build_steps.NO_LABELS: 1,
    build_steps.NO_HASHTAGS: 1,
    build_steps.DUPLICATE_POST_ID: 1,
}


def write_corpus(root: Path) -> dict:
    """The corpus above as a JSONL manifest + images, an eval folder and opt-out lists."""
    (root / "img").mkdir(parents=True)
    data: dict[str, bytes] = {}
    lines = []
    for i, (pid, spec, fields) in enumerate(CORPUS):
        kind = spec[0]
        if kind == "draw":
            data[pid] = jpeg(drawing(spec[1], spec[2]))
        elif kind == "copy_of":
            data[pid] = data[spec[1]]
        elif kind == "near_of":
            seed, size = next(s[1:] for p, s, _ in CORPUS if p == spec[1])
            data[pid] = jpeg(drawing(seed, size), quality=80, scale=0.5)  # half size, recompressed
        elif kind == "corrupt":
            good = jpeg(drawing(30))  # 300 random bytes in the middle of the entropy-coded data
            noise = np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
            data[pid] = good[:700] + noise + good[1000:]
        elif kind == "truncated":
            good = jpeg(drawing(31))
            data[pid] = good[: len(good) // 2]
        name = f"img/{i:02d}.jpg"
        if pid in data and kind != "missing":
            (root / name).write_bytes(data[pid])
        line = {"id": pid, "image": name, **{k: v for k, v in fields.items() if k != "public"}}
        if fields.get("public", True) is not None:
            line["public"] = fields.get("public", True)
        lines.append(json.dumps(line))
    (root / "posts.jsonl").write_text("\n".join(lines) + "\n")
    (root / "eval").mkdir()
    (root / "eval" / "val0.jpg").write_bytes(jpeg(drawing(20, 64), quality=75, scale=0.8))
    (root / "eval" / "val1.jpg").write_bytes(jpeg(drawing(40, 64)))
    (root / "optout_posts.txt").write_text("# removed on request\noptpost1\n")
    (root / "optout_users.txt").write_text("opted_out_user\n")
    return {
        "manifest": str(root / "posts.jsonl"),
        "eval": str(root / "eval"),
        "optout_posts": str(root / "optout_posts.txt"),
        "optout_users": str(root / "optout_users.txt"),
    }


def corpus_config(paths: dict, output: Path, **overrides) -> build_steps.BuildConfig:
    kw = dict(
        inputs=(f"jsonl:{paths['manifest']}",),
        output=str(output),
        vocab_min_count=1,
        images=images.ImageOptions(max_side=32, min_side=8),
        eval_sets=(paths["eval"],),
        optout_posts=paths["optout_posts"],
        optout_users=paths["optout_users"],
        heldout_fraction=0.3,
        shard_size=4,
        workers=1,
        max_failure_fraction=0.5,
        raster_cache="",
        progress=False,
    )
    kw.update(overrides)
    return build_steps.BuildConfig(**kw)


def read_split(root: Path, split: str) -> list[records.Record]:
    manifest = records.load_manifest(root)
    return [
        records.decode(x) for p in manifest.shard_paths(root, split) for x in records.read_shard(p)
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    paths = write_corpus(base / "in")
    out = base / "out"
    stats = build.build(corpus_config(paths, out))
    return {"paths": paths, "out": out, "stats": stats, "base": base}


def test_only_clean_public_posts_reach_the_shards(built):
    out = built["out"]
    got = {r.post_id for s in records.SPLITS for r in read_split(out, s)}
    assert got == KEPT
    stats = built["stats"]
    assert {k: v for k, v in stats["dropped"].items()} == EXPECTED_DROPS
    assert stats["posts_read"] == len(CORPUS)
    assert stats["posts_written"] == len(KEPT)
    assert stats["posts_read"] == stats["posts_written"] + sum(stats["dropped"].values())
    assert stats["images"]["failed"] == 3
    assert stats["dedup"]["eval_matches"][0]["post_id"] == "evalcopy"
    assert stats["dedup"]["eval_matches"][0]["eval_image"].endswith("val0.jpg")


def test_records_round_trip_with_labels_and_no_user_ids(built):
    out = built["out"]
    vocab = vocab_lib.Vocabulary.load(out / "vocab.json")
    manifest = records.load_manifest(out)
    assert manifest.vocab_fingerprint == vocab.fingerprint()
    by_id = {}
    for split in records.SPLITS:
        recs = read_split(out, split)
        index = records.LabelStore(out, split).load()
        assert index.num_records == len(recs) == manifest.num_records(split)
        for i, r in enumerate(recs):
            assert list(index.labels_of(i)) == list(r.labels)
            assert records.decode(records.encode(r)) == r
            by_id[r.post_id] = r
    assert all(r.user is None for r in by_id.values())
    assert set(by_id["p01"].labels) == {vocab.id_of("dog"), vocab.id_of("beach")}
    assert vocab.id_of("dog") in by_id["p03"].labels  # from the caption
    assert by_id["p08"].labels == (vocab.id_of("dog"),)  # #dogs is #dog
    img = Image.open(io.BytesIO(by_id["p02"].image))
    assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 32
    assert manifest.num_records("train") > 0 and manifest.num_records("heldout") > 0
    assert len(manifest.splits["train"]["shards"]) == 2  # shard_size 4


def test_report_states_counts_and_top_labels(built):
    report = (built["out"] / "report.txt").read_text()
    assert "posts read" in report and "most frequent labels" in report
    assert "optout_user" in report and "eval_near_duplicate" in report
    assert "#dog" in report
    stats = json.loads((built["out"] / "stats.json").read_text())
    assert stats["labels"]["most_frequent_train"]
    assert "opted_out_user" not in (built["out"] / "stats.json").read_text()


def test_split_is_keyed_on_post_id_and_rebuild_is_identical(built, tmp_path):
    """Same input, other worker count: byte-identical shards (and so the same split)."""
    stats = build.build(corpus_config(built["paths"], tmp_path / "again", workers=2))
    assert stats["records"] == built["stats"]["records"]
    for name in sorted(p.name for p in built["out"].glob("*.array_record")):
        assert (tmp_path / "again" / name).read_bytes() == (built["out"] / name).read_bytes()
    for r in read_split(built["out"], "heldout"):
        assert build_steps.split_of(r.post_id, 0.3, "tagjax") == "heldout"


def test_metadata_spilled_in_tiny_batches_changes_no_byte(built, tmp_path, monkeypatch):
    """The builder keeps per-post metadata on disk (build.PostTable) and reads and writes it in
    batches; batches of 2 rows (every boundary crossed, user cap and habits on) must give the same
    dataset, file by file."""
    per_user = dict(max_posts_per_user=1, keep_user_ids=True, habit_min_users=1, habit_min_posts=2)
    outs = {}
    for batch in (build._TABLE_BATCH, 2):
        monkeypatch.setattr(build, "_TABLE_BATCH", batch)
        outs[batch] = tmp_path / str(batch)
        stats = build.build(
            corpus_config(built["paths"], outs[batch], max_failure_fraction=0.9, **per_user)
        )
        assert stats["dropped"][build_steps.USER_CAP] > 0
    ref, small = outs.values()
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in small.iterdir())
    for name in names:
        if name not in ("stats.json", "report.txt", "dataset.json"):  # they name times and paths
            assert (small / name).read_bytes() == (ref / name).read_bytes(), name


def test_near_duplicate_groups_never_straddle_the_split():
    # A chain a~b~c where a and c are both kept (distance 8 apart): they share a root, hence a split.
    cfg = build_steps.BuildConfig(
        inputs=(), output="", dedup=dedup.DedupOptions(near_threshold=4), heldout_fraction=0.5
    )
    ids = ["a", "b", "c"]
    ranks = [dedup.rank_key("a", 100, 1), dedup.rank_key("b", 50, 1), dedup.rank_key("c", 80, 1)]
    phashes = [0, 0b1111, 0b11111111]
    decision = build.deduplicate(ids, ranks, ["x", "y", "z"], phashes, [], cfg)
    assert decision.dropped == {1: build_steps.NEAR_DUPLICATE}
    assert decision.root_of(0) == decision.root_of(2) == 0  # "c" is in "a"'s group


def test_refuses_non_empty_output_and_overwrites_only_datasets(built, tmp_path):
    args = [
        "build",
        f"jsonl:{built['paths']['manifest']}",
        "--output",
        str(built["out"]),
        "--no-progress",
        "--workers",
        "1",
    ]
    assert cli_main(args) == 3
    assert records.load_manifest(built["out"])  # untouched
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with (
        pytest.raises(UserError, match="did not write"),
        build_steps.output_folder(foreign, overwrite=True),
    ):
        pass
    assert (foreign / "thesis.tex").exists()


def test_cli_build_and_overwrite(built, tmp_path, capsys):
    p = built["paths"]
    out = tmp_path / "cli"
    args = [
        "build",
        f"jsonl:{p['manifest']}",
        "--output",
        str(out),
        "--max-side",
        "32",
        "--vocab-min-count",
        "1",
        "--optout-users",
        p["optout_users"],
        "--optout-posts",
        p["optout_posts"],
        "--eval-set",
        p["eval"],
        "--max-failure-fraction",
        "0.5",
        "--workers",
        "1",
        "--no-progress",
        "--raster-cache",
        "",
    ]
    assert cli_main(args) == 0
    assert "most frequent labels" in capsys.readouterr().out
    assert cli_main([*args, "--overwrite"]) == 0
    assert {r.post_id for s in records.SPLITS for r in read_split(out, s)} == KEPT


def test_a_crash_never_leaves_a_complete_looking_dataset(built, tmp_path, monkeypatch):
    calls = []
    real = records.write_shard

    def flaky(path, recs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, recs)

    monkeypatch.setattr(records, "write_shard", flaky)
    out = tmp_path / "crashed"
    with pytest.raises(OSError):
        build.build(corpus_config(built["paths"], out))
    assert not (out / records.MANIFEST).exists()
    assert not list(out.glob("*.tmp"))
    with pytest.raises(UserError, match="did not finish"):
        records.load_manifest(out)
    monkeypatch.setattr(records, "write_shard", real)
    build.build(corpus_config(built["paths"], out, overwrite=True))
    assert records.load_manifest(out)


def test_too_many_broken_images_stop_the_build(built, tmp_path):
    with pytest.raises(UserError, match="broken"):
        build.build(corpus_config(built["paths"], tmp_path / "strict", max_failure_fraction=0.05))
    assert not (tmp_path / "strict" / records.MANIFEST).exists()


def test_apply_optout_after_the_fact(built, tmp_path):
    import shutil

    out = tmp_path / "ds"
    shutil.copytree(built["out"], out)
    optout = tmp_path / "late.txt"
    optout.write_text("p03\np07\n")
    users = tmp_path / "late_users.txt"
    users.write_text("u5\n")
    before = json.loads((out / "stats.json").read_text())
    assert (
        cli_main(
            ["build", "--apply-optout", str(out), "--optout-posts", str(optout), "--no-progress"]
        )
        == 0
    )
    assert not (out / "dataset.json.pending").exists()
    with pytest.raises(UserError, match="original inputs"):
        build.apply_optout(str(out), build_steps.OptOut(users=frozenset({"u5"})), progress=False)
    result = build.apply_optout(
        str(out),
        build_steps.OptOut(users=frozenset({"u5"})),
        inputs=[f"jsonl:{built['paths']['manifest']}"],
        progress=False,
    )
    assert result["removed"] == 2  # p09 and p10
    ids = set()
    for split in records.SPLITS:
        recs = read_split(out, split)
        index = records.LabelStore(out, split).load()
        assert index.num_records == len(recs)
        assert [list(index.labels_of(i)) for i in range(len(recs))] == [
            list(r.labels) for r in recs
        ]
        ids |= {r.post_id for r in recs}
    assert ids == KEPT - {"p03", "p07", "p09", "p10"}
    after = json.loads((out / "stats.json").read_text())
    assert after["dropped"][build_steps.OPTOUT_AFTER_BUILD] == 4
    assert after["posts_written"] == before["posts_written"] - 4
    assert len(records.load_manifest(out).build["optouts_applied"]) == 2


def test_uploader_habits_and_user_cap(tmp_path):
    lines = []
    (tmp_path / "img").mkdir()
    animals = ["dog", "cat", "horse", "bird", "boat", "car"]
    for i, animal in enumerate(animals):  # one uploader tags everything #computer
        (tmp_path / "img" / f"t{i}.jpg").write_bytes(jpeg(drawing(100 + i)))
        lines.append(
            {
                "id": f"t{i}",
                "image": f"img/t{i}.jpg",
                "tags": ["computer", animal],
                "user": "theme",
                "public": True,
            }
        )
    for i in range(2):
        (tmp_path / "img" / f"o{i}.jpg").write_bytes(jpeg(drawing(200 + i)))
        lines.append(
            {
                "id": f"o{i}",
                "image": f"img/o{i}.jpg",
                "tags": ["computer"],
                "user": f"other{i}",
                "public": True,
            }
        )
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    cfg = build_steps.BuildConfig(
        inputs=(str(tmp_path / "p.jsonl"),),
        output=str(tmp_path / "out"),
        vocab_min_count=1,
        images=images.ImageOptions(max_side=32),
        habit_min_posts=5,
        habit_min_users=3,
        max_posts_per_user=4,
        heldout_fraction=0.0,
        workers=1,
        raster_cache="",
        progress=False,
    )
    stats = build.build(cfg)
    vocab = vocab_lib.Vocabulary.load(tmp_path / "out" / "vocab.json")
    recs = {r.post_id: r for r in read_split(tmp_path / "out", "train")}
    computer = vocab.id_of("computer")
    assert computer is not None
    assert all(computer not in r.labels for pid, r in recs.items() if pid.startswith("t"))
    assert recs["o0"].labels == (computer,) and recs["o1"].labels == (computer,)
    assert stats["dropped"][build_steps.USER_CAP] == 2
    assert sum(pid.startswith("t") for pid in recs) == 4
    assert stats["habits"]["users_with_habits"] == 1
    assert "theme" not in json.dumps(stats)  # no user ids in the outputs


def test_archive_path_traversal_is_refused_and_nothing_escapes(tmp_path):
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    members = {}
    for i, animal in enumerate(["dog", "cat", "horse"]):
        members[f"{i:05d}.jpg"] = jpeg(drawing(300 + i))
        members[f"{i:05d}.json"] = json.dumps({"tags": [animal]}).encode()
    members["../../evil.jpg"] = jpeg(drawing(310))
    members["../../evil.json"] = json.dumps({"tags": ["dog"]}).encode()
    members["/tmp/evil2.jpg"] = jpeg(drawing(311))
    items = [
        *members.items(),
        ("00000.jpg", jpeg(drawing(320))),  # the key again: a repeated post id
        ("00000.json", json.dumps({"tags": ["cat"]}).encode()),
    ]
    with tarfile.open(shard, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    stats = build.build(
        build_steps.BuildConfig(
            inputs=(f"wds:{shard.parent}",),
            output=str(out),
            vocab_min_count=1,
            images=images.ImageOptions(max_side=32),
            heldout_fraction=0.0,
            workers=1,
            raster_cache="",
            progress=False,
        )
    )
    assert stats["dropped"][posts.UNSAFE_ARCHIVE_MEMBER] == 2
    assert stats["dropped"][build_steps.DUPLICATE_POST_ID] == 1
    recs = read_split(out, "train")
    assert sorted(r.post_id for r in recs) == ["00000", "00001", "00002"]  # the first 00000 only
    first = next(r for r in recs if r.post_id == "00000")
    expected = images.process(members["00000.jpg"], images.ImageOptions(max_side=32))
    stored = dedup.phash(np.asarray(Image.open(io.BytesIO(first.image))))
    assert dedup.hamming(stored, dedup.phash(expected.pixels)) <= 2
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out or p in out.parents for p in created)
    assert not any("evil" in p.name for p in tmp_path.rglob("*"))


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        build_steps.BuildConfig(inputs=(), output="", heldout_fraction=1.5)
    with pytest.raises(UserError, match="no input"):
        build.build(build_steps.BuildConfig(inputs=(), output=str(tmp_path / "o"), progress=False))
    with pytest.raises(UserError, match="opt-out list"):
        build_steps.OptOut.load(str(tmp_path / "nope.txt"), None)


@pytest.mark.skipif(
    not Path(posts.OPENCLIPART_ROOT).is_dir(), reason="openclipart-svg not installed"
)
def test_openclipart_end_to_end(tmp_path):
    cfg = build_steps.BuildConfig(
        inputs=("openclipart",),
        output=str(tmp_path / "oc"),
        limit=150,
        images=images.ImageOptions(max_side=32),
        heldout_fraction=0.1,
        workers=1,
        raster_cache=str(tmp_path / "cache"),
        progress=False,
        habit_min_posts=10,
    )
    stats = build.build(cfg)
    assert stats["posts_read"] == 150
    assert stats["posts_written"] > 20
    assert stats["labels"]["most_frequent_train"]
    assert (
        stats["dropped"].get(build_steps.HABITUAL_ONLY, 0) > 0
    )  # the icon themes and star collection
    recs = read_split(tmp_path / "oc", "train")
    img = Image.open(io.BytesIO(recs[0].image))
    assert min(img.size) == 32 and img.mode == "RGB"
    # a re-run is served by the raster cache and gives the same dataset
    cfg2 = dataclasses.replace(cfg, output=str(tmp_path / "oc2"))
    assert build.build(cfg2)["records"] == stats["records"]

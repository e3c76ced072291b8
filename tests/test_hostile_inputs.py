"""The builder against a generated hostile set: every manifest, tar and image is treated as hostile.

Each case checks the post is refused under its own reason, that nothing outside the allowed roots was
opened (every file open is recorded) or reached the shards (a canary image outside the root), and that
nothing was written outside the output folder.
"""

import builtins
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagjax import build, build_steps, dedup, images, posts, records
from tagjax.cli import main as cli_main
from tagjax.errors import UserError


def picture(seed: int, size: int = 48) -> bytes:
    """A JPEG with a structure of its own (blocks of random colour), different for every seed."""
    blocks = np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((size // 4, size // 4, 1), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def phash_of(jpeg: bytes) -> int:
    return dedup.phash(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def all_records(root: Path) -> list[records.Record]:
    manifest = records.load_manifest(root)
    return [
        records.decode(x)
        for split in manifest.splits
        for p in manifest.shard_paths(root, split)
        for x in records.read_shard(p)
    ]


def tree(path: Path) -> set[Path]:
    return set(path.rglob("*"))


def config(manifest: Path, out: Path, **kw) -> build_steps.BuildConfig:
    defaults = dict(
        inputs=(f"jsonl:{manifest}",),
        output=str(out),
        vocab_min_count=1,
        images=images.ImageOptions(max_side=32, max_file_bytes=200_000),
        heldout_fraction=0.0,
        workers=1,
        raster_cache="",
        progress=False,
    )
    return build_steps.BuildConfig(**{**defaults, **kw})


ANIMALS = ["dog", "cat", "horse", "bird", "boat", "car"]


@pytest.fixture()
def hostile_set(tmp_path):
    """tmp/secret/ (outside every root: canary image and text), tmp/data/ (the manifest's root)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    canary = picture(999)
    (secret / "canary.jpg").write_bytes(canary)
    (secret / "canary.txt").write_text("CANARY-CONTENT")
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    lines = []
    for i in range(6):
        (data / "img" / f"ok{i}.jpg").write_bytes(picture(i))
        lines.append({"id": f"ok{i}", "image": f"img/ok{i}.jpg", "tags": [ANIMALS[i]]})
    os.symlink(secret / "canary.jpg", data / "img" / "link.jpg")
    os.symlink("/dev/zero", data / "img" / "zero.jpg")
    os.mkfifo(data / "img" / "fifo.jpg")
    with open(data / "img" / "big.jpg", "wb") as f:  # sparse: 300 kB stated, above the 200 kB cap
        f.write(picture(7))
        f.truncate(300_000)
    hostile = {
        "dotdot": ("../secret/canary.jpg", posts.PATH_ESCAPES_ROOT),
        "deepdotdot": ("img/../../secret/canary.jpg", posts.PATH_ESCAPES_ROOT),
        "absolute": (str(secret / "canary.jpg"), posts.ABSOLUTE_PATH_OUTSIDE_ROOTS),
        "devzero": ("/dev/zero", posts.ABSOLUTE_PATH_OUTSIDE_ROOTS),
        "symlink": ("img/link.jpg", posts.SYMLINK_ESCAPES_ROOT),
        "zerolink": ("img/zero.jpg", posts.SYMLINK_ESCAPES_ROOT),
        "fifo": ("img/fifo.jpg", posts.NOT_A_REGULAR_FILE),
        "folder": ("img", posts.NOT_A_REGULAR_FILE),
        "big": ("img/big.jpg", posts.FILE_TOO_LARGE),
    }
    for pid, (image, _) in hostile.items():
        lines.append({"id": pid, "image": image, "tags": ["dog"]})
    lines.append({"id": "onlyid"})  # nothing but an id: no image (not "visibility unknown")
    lines.append({"id": "spam", "image": "img/ok0.jpg", "tags": [f"t{i}x" for i in range(600)]})
    manifest = data / "posts.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    expected = {pid: reason for pid, (_, reason) in hostile.items()}
    expected["onlyid"] = posts.NO_IMAGE
    expected["spam"] = build_steps.TOO_MANY_HASHTAGS
    return {
        "root": tmp_path,
        "data": data,
        "secret": secret,
        "canary": canary,
        "expected": expected,
    }


@pytest.fixture()
def opened_paths(monkeypatch):
    """Every path this process opens from now on (os.open and open), resolved."""
    seen: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def record(path):
        if isinstance(path, (str, bytes, os.PathLike)):
            seen.append(os.path.realpath(os.fsdecode(path)))

    def os_open(path, *args, **kwargs):
        record(path)
        return real_os_open(path, *args, **kwargs)

    def open_(file, *args, **kwargs):
        record(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    return seen


def test_hostile_manifest_paths_are_refused_before_opening(hostile_set, opened_paths):
    s = hostile_set
    out = s["root"] / "out"
    before = tree(s["root"])
    stats = build.build(config(s["data"] / "posts.jsonl", out, assume_public=True))

    for reason in set(s["expected"].values()):
        want = sum(1 for r in s["expected"].values() if r == reason)
        assert stats["dropped"].get(reason) == want, (reason, stats["dropped"])
    assert build_steps.VISIBILITY_UNKNOWN not in stats["dropped"]
    kept = {r.post_id for r in all_records(out)}
    assert kept == {f"ok{i}" for i in range(6)}

    # Nothing outside the root was opened, and no device, FIFO or oversized file either.
    secret = str(s["secret"].resolve())
    forbidden = {
        "/dev/zero",
        *(str((s["data"] / "img" / n).resolve()) for n in ("fifo.jpg", "big.jpg")),
    }
    assert not [p for p in opened_paths if p.startswith(secret + os.sep) or p in forbidden]
    # ... nor did its content reach the shards,
    canary = phash_of(s["canary"])
    assert all(dedup.hamming(phash_of(r.image), canary) > 8 for r in all_records(out))
    blob = b"".join(p.read_bytes() for p in out.iterdir() if p.is_file())
    assert b"CANARY" not in blob
    # ... and nothing was written outside the output folder.
    assert {p for p in tree(s["root"]) - before if out not in p.parents and p != out} == set()

    # drops.jsonl: one line per dropped post, its id and reason only.
    drops = [json.loads(x) for x in (out / build_steps.DROPS_FILE).read_text().splitlines()]
    assert all(set(d) == {"id", "reason"} for d in drops)
    assert {d["id"]: d["reason"] for d in drops} == s["expected"]
    assert build_steps.DROPS_FILE in records.load_manifest(out).build["files"]


def test_image_root_admits_another_folder_and_dev_is_not_a_file(hostile_set):
    s = hostile_set
    cfg = config(
        s["data"] / "posts.jsonl",
        s["root"] / "out",
        assume_public=True,
        image_roots=(str(s["secret"]), "/dev"),
        dedup=dedup.DedupOptions(exact=False, near_threshold=-1),  # the canary, four times
    )
    stats = build.build(cfg)
    # /dev/zero (by path and by symlink), the FIFO, a folder
    assert stats["dropped"][posts.NOT_A_REGULAR_FILE] == 4
    assert posts.ABSOLUTE_PATH_OUTSIDE_ROOTS not in stats["dropped"]
    kept = {r.post_id for r in all_records(s["root"] / "out")}
    # The canary is inside an allowed root now: by '..', absolute path and symlink alike.
    assert {"dotdot", "deepdotdot", "absolute", "symlink"} <= kept
    assert "zerolink" not in kept


def test_folder_reader_refuses_fifos_devices_and_oversized_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(picture(1))
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    (tmp_path / "huge.jpg").write_bytes(b"\xff\xd8\xff" + bytes(5000))
    (tmp_path / "b.jpg").write_bytes(picture(2))
    os.mkfifo(tmp_path / "b.json")  # a FIFO sidecar must not hang the reader either
    got = {p.post_id: p for p in posts.read_folder(str(tmp_path), max_bytes=4000)}
    assert got["a"].problem is None and got["a"].image_path
    assert got["pipe"].problem == posts.NOT_A_REGULAR_FILE
    assert got["zero"].problem == posts.SYMLINK_ESCAPES_ROOT
    assert got["huge"].problem == posts.FILE_TOO_LARGE
    assert got["b"].problem == posts.NOT_A_REGULAR_FILE


def test_load_refuses_a_file_swapped_for_a_fifo_or_grown_past_the_cap(tmp_path):
    """The reader's check and the worker's read are apart in time: the read checks again."""
    path = tmp_path / "x.jpg"
    path.write_bytes(picture(3))
    checked, problem = posts.ImageRoots.of([tmp_path]).check("x.jpg", tmp_path, 1 << 20)
    assert problem is None
    post = posts.Post(post_id="x", image_path=checked)
    path.unlink()
    os.mkfifo(path)  # opened non-blocking, then refused by fstat: no hang
    with pytest.raises(images.ImageSkip) as e:
        posts.load_image_bytes(post, 32)
    assert e.value.reason == posts.NOT_A_REGULAR_FILE
    path.unlink()
    path.write_bytes(bytes(3000))
    with pytest.raises(images.ImageSkip) as e:
        posts.load_image_bytes(post, 32, max_bytes=2000)
    assert e.value.reason == posts.FILE_TOO_LARGE


def test_oversized_manifest_line_is_skipped_unread(tmp_path):
    (tmp_path / "a.jpg").write_bytes(picture(1))
    long_line = json.dumps({"id": "long", "image": "a.jpg", "caption": "x" * 10_000})
    good = json.dumps({"id": "good", "image": "a.jpg", "tags": ["dog"]})
    (tmp_path / "p.jsonl").write_text(f"{long_line}\n{good}\n")
    got = list(posts.read_jsonl(str(tmp_path / "p.jsonl"), max_bytes=5000))
    assert [(p.post_id, p.problem) for p in got] == [
        ("p.jsonl:1", posts.METADATA_TOO_LARGE),
        ("good", None),
    ]


BOMB_READER = textwrap.dedent(
    """
    import json, resource, sys
    from tagjax import posts
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = [(p.post_id, p.problem, len(p.image_bytes or b""))
           for p in posts.read_webdataset(sys.argv[1], max_bytes=int(sys.argv[2]))]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"posts": got, "growth_kb": peak - before}))
    """
)


class _Zeros(io.RawIOBase):
    """n zero bytes as a stream, so the bomb is compressed without ever being in memory."""

    def __init__(self, n: int):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_tar_bomb_is_read_as_a_stream_in_bounded_memory(tmp_path):
    """A 200 MB member compressed into a small .tar.gz: skipped unread by its stated size, with the
    reader's peak memory growing by far less than the member (measured in a fresh process)."""
    bomb = tmp_path / "bomb.tar.gz"
    size = 200 * 2**20
    with tarfile.open(bomb, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("00000.jpg")
        info.size = size
        tar.addfile(info, io.BufferedReader(_Zeros(size), buffer_size=1 << 20))
        for name, data in (("00001.jpg", picture(1)), ("00001.json", b'{"tags": ["dog"]}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert bomb.stat().st_size < 2**20
    run = subprocess.run(
        [sys.executable, "-c", BOMB_READER, str(bomb), str(50 * 2**20)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(run.stdout)
    assert result["posts"] == [["00000", posts.FILE_TOO_LARGE, 0], ["00001", None, len(picture(1))]]
    assert result["growth_kb"] < 48 * 1024, result  # the member is 200 MB


def single_user_manifest(tmp_path: Path, n: int = 24) -> Path:
    """One uploader, every post tagged #dog, three in four #beach too: a topic, or a habit?"""
    (tmp_path / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(picture(100 + i))
        tags = ["dog"] if i % 4 == 0 else ["dog", "beach"]
        lines.append({"id": f"p{i}", "image": f"img/{i}.jpg", "tags": tags, "user": "only"})
    (tmp_path / "posts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return tmp_path / "posts.jsonl"


def test_all_habit_single_user_build_fails_with_its_reasons(tmp_path, capsys):
    manifest = single_user_manifest(tmp_path)
    out = tmp_path / "out"
    before = tree(tmp_path)
    argv = ["build", f"jsonl:{manifest}", "-o", str(out), "--no-progress", "--workers", "1"]
    argv += ["--assume-public", "--max-side", "32", "--raster-cache", "", "--vocab-min-count", "1"]
    assert cli_main([*argv, "--habit-min-users", "1"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "kept no training records" in err and "habitual_hashtags_only 24" in err
    assert "--habit-action keep" in err
    assert not out.exists() and tree(tmp_path) == before  # no output folder, no staging left

    # With the default minimum of uploaders the filter stays off and says why.
    assert cli_main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["posts_written"] == 24
    assert "uploader-habit filter off: 1 uploaders" in stats["habits"]["skipped"]
    assert "uploader-habit filter off" in (out / "report.txt").read_text()


def test_habit_filter_explains_itself_when_it_removes_most_tags(tmp_path):
    (tmp_path / "img").mkdir()
    lines = []
    for u in range(5):
        for i in range(4):
            pid = f"u{u}p{i}"
            (tmp_path / "img" / f"{pid}.jpg").write_bytes(picture(200 + 10 * u + i))
            tags = ["computer", "icon", ANIMALS[i]]  # two habitual tags per post, one real one
            lines.append({"id": pid, "image": f"img/{pid}.jpg", "tags": tags, "user": f"u{u}"})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    stats = build.build(
        config(tmp_path / "p.jsonl", tmp_path / "out", assume_public=True, habit_min_posts=4)
    )
    h = stats["habits"]
    assert h["users_with_habits"] == 5 and h["hashtags_removed"] == 40
    assert "removed 40 of 60 hashtag uses (67%)" in h["explanation"]
    assert (
        "note: the uploader-habit filter removed" in (tmp_path / "out" / "report.txt").read_text()
    )


def test_wrong_input_kind_is_one_line_and_leaves_nothing(tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    out = tmp_path / "out"
    assert cli_main(["build", f"jsonl:{folder}", "-o", str(out), "--no-progress"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is a folder" in err and "JSONL manifest" in err
    assert not out.exists()
    os.mkfifo(tmp_path / "pipe.jsonl")
    assert cli_main(["build", f"jsonl:{tmp_path / 'pipe.jsonl'}", "-o", str(out)]) == 3
    assert "not a regular file" in capsys.readouterr().err
    assert not out.exists()


def test_failed_and_interrupted_builds_leave_no_staging(tmp_path, monkeypatch):
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
        lines.append({"id": f"p{i}", "image": f"img/{i}.jpg", "tags": [ANIMALS[i]]})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="images are broken"):
        build.build(config(tmp_path / "p.jsonl", out, assume_public=True))
    assert not out.exists()

    for i in range(4):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(picture(i))
    out.mkdir()  # an existing (empty) folder stays, but empty

    def interrupt(post):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_steps, "worker_process_image", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build.build(config(tmp_path / "p.jsonl", out, assume_public=True))
    assert out.is_dir() and list(out.iterdir()) == []


def test_overwrite_deletes_only_what_a_previous_build_listed(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("vocab.json", "train-00000-of-00001.array_record", "stats.json"):
        (foreign / name).write_text("somebody else's")
    with (
        pytest.raises(UserError, match="not a tagjax dataset"),
        build_steps.output_folder(foreign, overwrite=True),
    ):
        pass
    assert all((foreign / n).read_text() == "somebody else's" for n in os.listdir(foreign))

    # A previous build: its listed files go, a file the user put beside them stays.
    manifest = single_user_manifest(tmp_path / "in")
    out = tmp_path / "out"
    build.build(config(manifest, out, assume_public=True))
    (out / "notes.txt").write_text("mine")
    (tmp_path / "outside.txt").write_text("keep")
    m = json.loads((out / records.MANIFEST).read_text())
    m["build"]["files"] = [*m["build"]["files"], "../outside.txt", "/etc/hostname"]
    (out / records.MANIFEST).write_text(json.dumps(m))  # a hostile manifest
    build.build(config(manifest, out, assume_public=True, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert records.load_manifest(out).splits["train"]["num_records"] == 24


def test_a_rebuild_that_fails_or_is_stopped_keeps_the_previous_dataset(tmp_path, monkeypatch):
    # --overwrite used to delete the previous build before building: a rebuild whose posts were all
    # private (or whose images were all missing, or that was stopped) left an empty folder.
    manifest = single_user_manifest(tmp_path / "in")
    out = tmp_path / "out"
    build.build(config(manifest, out, assume_public=True))
    before = {n: (out / n).read_bytes() for n in sorted(os.listdir(out))}
    with pytest.raises(UserError, match="kept no training records"):
        build.build(config(manifest, out, overwrite=True))  # not public: every post dropped

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C in the middle of the rebuild

    monkeypatch.setattr(build, "_build_stages", stopped)
    with pytest.raises(KeyboardInterrupt):
        build.build(config(manifest, out, assume_public=True, overwrite=True))
    assert {n: (out / n).read_bytes() for n in sorted(os.listdir(out))} == before
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]  # no hidden rebuild folder left
    monkeypatch.undo()
    # A rebuild that finishes replaces it, and records the folder it ends up in.
    summary = build.build(config(manifest, out, assume_public=True, overwrite=True, split_seed="x"))
    assert records.load_manifest(out).splits["train"]["num_records"] == 24
    assert summary["config"]["output"] == str(out) and sorted(os.listdir(tmp_path)) == [
        "in",
        "out",
    ]


def test_removal_after_the_fact_recomputes_label_counts(tmp_path):
    manifest = single_user_manifest(tmp_path / "in")
    out = tmp_path / "out"
    before = build.build(config(manifest, out, assume_public=True))
    counts = dict(map(tuple, before["labels"]["most_frequent_train"]))
    optout = tmp_path / "optout.txt"
    optout.write_text("p1\np4\n")  # p1 is #dog #beach, p4 #dog
    build.apply_optout(str(out), build_steps.OptOut.load(str(optout), None), progress=False)
    after = json.loads((out / "stats.json").read_text())
    new_counts = dict(map(tuple, after["labels"]["most_frequent_train"]))
    dog = next(k for k in counts if "dog" in k)
    beach = next(k for k in counts if "beach" in k)
    assert new_counts[dog] == counts[dog] - 2 and new_counts[beach] == counts[beach] - 1
    assert f"#{dog:<26} {new_counts[dog]:>8,}" in (out / "report.txt").read_text()
    drops = [json.loads(x) for x in (out / build_steps.DROPS_FILE).read_text().splitlines()]
    assert sorted(d["id"] for d in drops if d["reason"] == build_steps.OPTOUT_AFTER_BUILD) == [
        "p1",
        "p4",
    ]


def test_yfcc_rows_cannot_name_photos_outside_the_images_folder(tmp_path):
    from tests.test_posts import yfcc_row

    (tmp_path / "photos").mkdir()
    (tmp_path / "secret.jpg").write_bytes(picture(5))
    rows = yfcc_row("../secret", "u@N00", "dog") + yfcc_row(
        "7", "u@N00", "dog", photo_hash="../../../../secret"
    )
    (tmp_path / "meta.tsv").write_text(rows)
    got = list(posts.read_yfcc(str(tmp_path / "meta.tsv"), str(tmp_path / "photos")))
    assert [p.problem for p in got] == [posts.PATH_ESCAPES_ROOT, posts.PATH_ESCAPES_ROOT]
    assert all(p.image_path is None for p in got)


def test_tar_reader_keeps_no_header_list(tmp_path, monkeypatch):
    """A stream-mode TarFile appends every header to ``members``: ~500 bytes per member, 5 GB for a
    hostile tar of 10M empty members. The reader drops them as it goes."""
    shard = tmp_path / "many.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        for i in range(300):
            info = tarfile.TarInfo(f"{i:05d}.json")
            tar.addfile(info, io.BytesIO(b""))
    opened = []
    real_open = tarfile.open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(posts.tarfile, "open", spy)
    got = list(posts.read_webdataset(str(shard)))
    assert len(got) == 300 and all(p.problem == posts.BAD_METADATA for p in got)
    assert len(opened[0].members) <= 1


def test_fields_of_the_wrong_json_type_are_bad_metadata_not_crashes(tmp_path):
    (tmp_path / "x.jpg").write_bytes(picture(1))
    lines = [
        {"id": "a", "image": "x.jpg", "tags": 5},
        {"id": "b", "image": "x.jpg", "tags": {"x": 1}},
        {"id": "c", "image": "x.jpg", "tags": ["dog", None, {"a": 2}]},
        {"id": {"z": 1}, "image": "x.jpg", "tags": ["dog"]},
        {"id": "e", "image": ["x.jpg"], "tags": ["dog"]},
        {"id": "g", "image": "x\u0000.jpg", "tags": ["dog"]},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n"
    text += json.dumps({"id": "ok", "image": "x.jpg", "tags": "dog, cat", "caption": 12}) + "\n"
    (tmp_path / "m.jsonl").write_text(text)
    got = list(posts.read_jsonl(str(tmp_path / "m.jsonl")))
    assert [p.problem for p in got] == [posts.BAD_METADATA] * 7 + [None]
    assert got[-1].tags == ("dog", "cat") and got[-1].caption == "12"


def test_an_evaluation_set_with_no_readable_image_stops_the_build(tmp_path):
    # A mistyped or not yet synced folder decontaminates nothing; it used to pass as "0 near-duplicates".
    manifest = single_user_manifest(tmp_path / "in")
    empty, junk = tmp_path / "eval_empty", tmp_path / "eval_junk"
    empty.mkdir()
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"\xff\xd8 cut short")
    for folder, message in [(empty, "no readable image"), (junk, r"1 image files found")]:
        with pytest.raises(UserError, match=message):
            build.build(
                config(manifest, tmp_path / "out", assume_public=True, eval_sets=(str(folder),))
            )
    assert not (tmp_path / "out").exists()  # stopped before writing anything

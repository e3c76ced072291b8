"""tagjax.build_beam: the Beam pipeline writes what the local builder writes, in process, with several
worker processes (DirectRunner multi_processing) and through the portable runner path."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagjax import build, build_steps, images, records

pytest.importorskip("apache_beam")
from tagjax import build_beam
from tests.test_build import KEPT, corpus_config, drawing, jpeg, read_split, write_corpus

pytestmark = pytest.mark.beam


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    base = tmp_path_factory.mktemp("beam")
    paths = write_corpus(base / "in")
    local = build.build(corpus_config(paths, base / "local"))
    beam = build_beam.build(corpus_config(paths, base / "beam"), ["--runner=DirectRunner"])
    return base, local, beam


def test_beam_and_local_builds_write_the_same_records(both):
    base, _, _ = both
    for split in records.SPLITS:
        a = read_split(base / "local", split)
        b = read_split(base / "beam", split)
        assert a == b  # same records, same order, same shards
    assert {r.post_id for s in records.SPLITS for r in read_split(base / "beam", s)} == KEPT
    for name in sorted(p.name for p in (base / "local").glob("*.array_record")):
        assert (base / "beam" / name).read_bytes() == (base / "local" / name).read_bytes()
    for split in records.SPLITS:
        a = records.LabelStore(base / "local", split).load()
        b = records.LabelStore(base / "beam", split).load()
        assert a.offsets.tolist() == b.offsets.tolist() and a.labels.tolist() == b.labels.tolist()
    assert (base / "beam" / "vocab.json").read_text() == (base / "local" / "vocab.json").read_text()


def test_beam_statistics_match_the_local_builder(both):
    _, local, beam = both
    for key in (
        "posts_read",
        "posts_written",
        "records",
        "dropped",
        "per_source",
        "images",
        "hashtags_dropped",
        "labels",
        "habits",
    ):
        assert beam[key] == local[key], key
    for key in ("exact_removed", "near_removed", "eval_removed", "eval_matches", "removal_rate"):
        assert beam["dedup"][key] == local["dedup"][key], key


def test_beam_writes_the_same_drops_file(both):
    base, local, _ = both

    def drops(name):
        lines = (base / name / build_steps.DROPS_FILE).read_text().splitlines()
        return sorted((d["id"], d["reason"]) for d in map(json.loads, lines))

    assert drops("beam") == drops("local")
    assert len(drops("local")) == sum(local["dropped"].values())


def test_beam_manifest_and_refusals(both, tmp_path):
    base, _, _ = both
    manifest = json.loads((base / "beam" / records.MANIFEST).read_text())
    assert manifest["vocab_fingerprint"] == records.load_manifest(base / "local").vocab_fingerprint
    from tagjax.errors import UserError

    with pytest.raises(UserError, match="--limit"):
        build_beam.build(
            build_steps.BuildConfig(inputs=("x",), output=str(tmp_path / "o"), limit=5)
        )


def test_beam_habits_and_user_cap_match_local(tmp_path):
    """The per-user stages (habit table, cap) group by user in Beam; the result must not differ."""
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(9):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(drawing(500 + i)))
        user = "theme" if i < 7 else None
        tags = [
            "computer",
            ["dog", "cat", "horse", "bird", "boat", "car", "tree", "lake", "flower"][i],
        ]
        lines.append(
            {"id": f"q{i}", "image": f"img/{i}.jpg", "tags": tags, "user": user, "public": True}
        )
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))

    def cfg(out):
        return build_steps.BuildConfig(
            inputs=(str(tmp_path / "p.jsonl"),),
            output=str(tmp_path / out),
            vocab_min_count=1,
            images=images.ImageOptions(max_side=32),
            habit_min_posts=5,
            habit_min_users=3,
            max_posts_per_user=3,
            heldout_fraction=0.3,
            workers=1,
            raster_cache="",
            progress=False,
        )

    local = build.build(cfg("local"))
    beam = build_beam.build(cfg("beam"))
    assert local["dropped"] == beam["dropped"] and local["habits"] == beam["habits"]
    assert local["dropped"][build_steps.USER_CAP] == 4
    for split in records.SPLITS:
        assert read_split(tmp_path / "local", split) == read_split(tmp_path / "beam", split)


MULTI_PROCESS = [
    "--runner=DirectRunner",
    "--direct_num_workers=2",
    "--direct_running_mode=multi_processing",
]


def test_multi_process_direct_runner_writes_the_local_builders_shards(both):
    """Two worker processes (the DirectRunner's multi_processing mode, what the docs recommend for one
    machine; stages pickled into them as a cluster runner does) write byte-identical shards, label
    stores and statistics. The work ran outside this process: the per-process caches the element
    functions fill (vocabulary canonicalizer, raster caches) stay empty here, while the in-process run
    of the fixture filled them."""
    base, local, _ = both
    assert build_beam._CANON  # filled by the fixture's in-process run
    build_beam._CANON.clear()
    build_beam._CACHES.clear()
    paths = write_corpus(base / "in-mp")
    stats = build_beam.build(corpus_config(paths, base / "beam-mp"), MULTI_PROCESS)
    assert not build_beam._CANON and not build_beam._CACHES
    assert stats["records"] == local["records"] and stats["dropped"] == local["dropped"]
    written = sorted(
        p.name for p in (base / "local").iterdir() if p.suffix in (".array_record", ".npy")
    )
    assert any(name.endswith(".labels.ids.npy") for name in written)
    assert written == sorted(
        p.name for p in (base / "beam-mp").iterdir() if p.suffix in (".array_record", ".npy")
    )
    for name in [*written, "vocab.json"]:
        assert (base / "beam-mp" / name).read_bytes() == (base / "local" / name).read_bytes(), name


@pytest.fixture
def worker_pool():
    """A Beam worker pool (what runs beside each Flink/Spark worker in docs/dataset.md's recipe) in
    this virtual environment: its SDK workers start `python` from PATH."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    pool = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "apache_beam.runners.worker.worker_pool_main",
            f"--service_port={port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120  # the pool imports Beam first: slow on a loaded machine
        while True:
            assert pool.poll() is None, "the Beam worker pool exited at start"
            try:
                socket.create_connection(("localhost", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Beam worker pool did not start listening"
                time.sleep(0.2)
        yield f"localhost:{port}"
    finally:
        pool.terminate()
        pool.wait(timeout=30)


def test_portable_runner_with_an_external_worker_pool_writes_the_same_shards(both, worker_pool):
    """The portable path the Flink and Spark runners take: a job service (here the embedded one)
    hands the stages to an EXTERNAL worker pool, whose processes do all the work."""
    base, local, _ = both
    build_beam._CANON.clear()
    paths = write_corpus(base / "in-ext")
    options = [
        "--runner=PortableRunner",
        "--job_endpoint=embed",
        "--environment_type=EXTERNAL",
        f"--environment_config={worker_pool}",
    ]
    stats = build_beam.build(corpus_config(paths, base / "beam-ext"), options)
    assert not build_beam._CANON
    assert stats["posts_written"] == local["posts_written"]
    for split in records.SPLITS:
        assert read_split(base / "beam-ext", split) == read_split(base / "local", split)


def test_beam_build_that_keeps_nothing_fails_and_leaves_nothing(tmp_path):
    from tagjax.errors import UserError

    (tmp_path / "img").mkdir()
    lines = []
    for i in range(3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(jpeg(drawing(400 + i)))
        lines.append({"id": f"p{i}", "image": f"img/{i}.jpg", "tags": ["dog"], "public": False})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "out"
    cfg = build_steps.BuildConfig(
        inputs=(str(tmp_path / "p.jsonl"),), output=str(out), workers=1, progress=False
    )
    with pytest.raises(UserError, match=r"kept no training records: 3 posts read.*private 3"):
        build_beam.build(cfg, ["--runner=DirectRunner"])
    assert not out.exists()

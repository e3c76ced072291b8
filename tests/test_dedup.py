"""tagjax.dedup: hashes match copies, pair search is exact, the keep rule is deterministic."""

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tagjax import dedup, eval_sets, images

OPTS = images.ImageOptions(max_side=64, min_side=8)


def drawing(seed: int, size: int = 64) -> np.ndarray:
    """A small picture with structure (a gradient and a few shapes), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = a * x[..., None] + b * (1 - y[..., None])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 16, 2)
        w, h = rng.integers(10, size // 2, 2)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
        else:
            draw.rectangle([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=color)
    return np.asarray(img)


def resized_recompressed(pixels: np.ndarray, scale=0.7, quality=70) -> bytes:
    h, w = pixels.shape[:2]
    small = Image.fromarray(pixels).resize(
        (round(w * scale), round(h * scale)), Image.Resampling.BILINEAR
    )
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_phash_matches_copies_and_separates_different_pictures():
    t = dedup.DedupOptions().near_threshold
    hashes = [dedup.phash(drawing(s)) for s in range(30)]
    for s in range(30):
        copy = images.process(resized_recompressed(drawing(s)), OPTS).pixels
        assert dedup.hamming(hashes[s], dedup.phash(copy)) <= t
    distinct = [dedup.hamming(hashes[i], hashes[j]) for i in range(30) for j in range(i + 1, 30)]
    assert min(distinct) > t
    assert 0 <= hashes[0] < 2**64


def test_content_hash_is_about_pixels_not_files():
    px = drawing(1)
    png = io.BytesIO()
    Image.fromarray(px).save(png, "PNG")
    bmp = io.BytesIO()
    Image.fromarray(px).save(bmp, "BMP")
    a = images.process(png.getvalue(), OPTS)
    b = images.process(bmp.getvalue(), OPTS)
    assert a.jpeg == b.jpeg and dedup.content_hash(a.jpeg) == dedup.content_hash(b.jpeg)
    png2 = io.BytesIO()
    Image.fromarray(drawing(2)).save(png2, "PNG")
    other = images.process(png2.getvalue(), OPTS)
    assert dedup.content_hash(a.jpeg) != dedup.content_hash(other.jpeg)


@pytest.mark.parametrize("threshold", [0, 3, 4, 8])
def test_near_pairs_equals_brute_force(threshold):
    rng = random.Random(threshold)
    hashes = [rng.getrandbits(64) for _ in range(300)]
    for _ in range(80):  # planted near duplicates at distances 0..threshold+2
        h = rng.choice(hashes)
        for bit in rng.sample(range(64), rng.randint(0, threshold + 2)):
            h ^= 1 << bit
        hashes.append(h)
    got = {(int(a), int(b), int(d)) for a, b, d in dedup.near_pairs(hashes, threshold)}
    want = {
        (i, j, dedup.hamming(hashes[i], hashes[j]))
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if dedup.hamming(hashes[i], hashes[j]) <= threshold
    }
    assert got == want and len(want) > 20


def test_chunk_keys_pigeonhole():
    rng = random.Random(0)
    for t in (0, 2, 6, 10):
        assert sum(w for _, w in dedup.chunk_layout(t)) == 64
        for _ in range(200):
            a = rng.getrandbits(64)
            b = a
            for bit in rng.sample(range(64), t):
                b ^= 1 << bit
            assert set(dedup.chunk_keys(a, t)) & set(dedup.chunk_keys(b, t))


def test_cross_pairs():
    refs = [0, 2**64 - 1]
    queries = [1, 3, 2**63 + 2**62 + 1, 2**64 - 2]  # distances to 0: 1, 2, 3, 63
    got = {(int(q), int(r), int(d)) for q, r, d in dedup.cross_pairs(queries, refs, 2)}
    assert got == {(0, 0, 1), (1, 0, 2), (3, 1, 1)}


def test_resolve_keeps_best_first_and_is_order_independent():
    ranks = {
        x: dedup.rank_key(x, px, 1)
        for x, px in [("a", 100), ("b", 400), ("c", 100), ("d", 100), ("e", 50)]
    }
    edges = [("a", "b", 2), ("b", "c", 4), ("c", "d", 2), ("d", "e", 2)]
    r1 = dedup.resolve(ranks, edges)
    r2 = dedup.resolve(ranks, list(reversed([(b, a, d) for a, b, d in edges])))
    assert r1.dropped == r2.dropped and r1.root == r2.root
    # b (largest source) is kept, its neighbours a and c go; d's only kept-neighbour candidate c is gone,
    # so d stays, and e (next to kept d) goes.
    assert set(r1.dropped) == {"a", "c", "e"}
    assert r1.dropped["a"] == ("b", 2)
    # One group, one root: the best member. The split is keyed on it, so b and d stay together.
    assert set(r1.root.values()) == {"b"}


def test_best_of_groups_and_rank_rule():
    ranks = {
        "x": dedup.rank_key("x", 100, 1),
        "y": dedup.rank_key("y", 100, 2),
        "z": dedup.rank_key("z", 100, 2),
        "w": dedup.rank_key("w", 5, 9),
    }
    best = dedup.best_of_groups({"x": "h1", "y": "h1", "z": "h1", "w": "h2"}, ranks)
    assert best == {"x": "y", "y": "y", "z": "y"}  # more labels beat fewer; then the smaller id


def test_eval_hashes_from_a_folder(tmp_path):
    for i in range(3):
        Image.fromarray(drawing(100 + i)).save(tmp_path / f"e{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff nope")
    got = eval_sets.hashes_of_set(str(tmp_path), OPTS)
    assert [name for name, _ in got] == ["e0.png", "e1.png", "e2.png"]
    assert got[0][1] == dedup.phash(images.process((tmp_path / "e0.png").read_bytes(), OPTS).pixels)


def test_eval_hashes_from_a_tfds_split():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        got = eval_sets.hashes_of_set(
            "tfds:mnist/test", images.ImageOptions(max_side=32, min_side=1)
        )
    assert [name for name, _ in got] == [f"mnist/test/{i}" for i in range(4)]
    assert len({h for _, h in got}) == 4
    from tagjax.errors import UserError

    with pytest.raises(UserError, match="tfds:NAME/SPLIT"):
        eval_sets.hashes_of_set("tfds:mnist", OPTS)


def test_phash_of_stored_size_images_matches_copies_and_smaller_copies():
    """At the size a build stores (256 px) the hash area-reduces to 64 px before its Lanczos step: copies,
    and the same picture stored at 64 px, stay within the threshold; different pictures do not."""
    t = dedup.DedupOptions().near_threshold
    opts = images.ImageOptions(max_side=256, min_side=8)
    big = [
        np.asarray(Image.fromarray(drawing(s)).resize((256, 256), Image.Resampling.BICUBIC))
        for s in range(20)
    ]
    hashes = [dedup.phash(p) for p in big]
    for s, p in enumerate(big):
        copy = images.process(resized_recompressed(p, scale=0.6), opts).pixels
        assert dedup.hamming(hashes[s], dedup.phash(copy)) <= t
        assert dedup.hamming(hashes[s], dedup.phash(drawing(s))) <= t
    distinct = [dedup.hamming(hashes[i], hashes[j]) for i in range(20) for j in range(i + 1, 20)]
    assert min(distinct) > t

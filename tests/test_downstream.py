"""Downstream datasets: our emoji TFDS builder, stock TFDS datasets (mocked), class folders, decontamination."""

import collections
import io
from pathlib import Path

import numpy as np
import pytest

from tagjax import build_steps, decontaminate, downstream, emoji_dataset, posts
from tagjax.errors import UserError

HAVE_EMOJI = Path(emoji_dataset.EMOJI_FONT).is_file() and Path(emoji_dataset.EMOJI_TEST).is_file()
needs_emoji = pytest.mark.skipif(
    not HAVE_EMOJI, reason="needs Debian fonts-noto-color-emoji and unicode-data"
)


@needs_emoji
def test_emoji_variant_groups_merge_skin_tones_and_genders():
    emoji = {e.name: e for e in emoji_dataset.parse_emoji_test()}
    assert len(emoji) > 3000  # Unicode 15.0 lists 3,655 fully-qualified emoji
    wave = emoji["waving hand"]
    assert emoji["waving hand: medium skin tone"].variant_group == wave.variant_group
    assert emoji["waving hand"].subgroup == "hand-fingers-open"
    runner = emoji["person running"].variant_group
    assert emoji["woman running: dark skin tone"].variant_group == runner
    assert emoji["man running"].variant_group == runner
    assert (
        emoji["man technologist"].variant_group
        == emoji["woman technologist: light skin tone"].variant_group
    )
    assert (
        emoji["grinning face"].variant_group
        != emoji["beaming face with smiling eyes"].variant_group
    )


@needs_emoji
def test_emoji_split_is_stratified_and_never_separates_variants():
    emoji = emoji_dataset.parse_emoji_test()
    classes = emoji_dataset.emoji_classes(emoji, 5)
    side = emoji_dataset.emoji_split(emoji, classes, 0.25, seed=0)
    assert side == emoji_dataset.emoji_split(emoji, classes, 0.25, seed=0)  # deterministic
    per_class = collections.defaultdict(set)
    for e in emoji:
        if e.subgroup in classes:
            per_class[e.subgroup].add(side[e.variant_group])
    assert all(sides == {"train", "test"} for sides in per_class.values())


@needs_emoji
def test_emoji_builder_prepares_offline_and_reads_back_with_tfds_data_source(tmp_path, monkeypatch):
    """The real path: our builder writes ArrayRecord (no TensorFlow), tfds.data_source reads it."""
    import sys

    import tensorflow_datasets as tfds

    directory = emoji_dataset.prepare_own("emoji_subgroups/32px", str(tmp_path))
    assert (directory / "dataset_info.json").is_file()
    assert any(directory.glob("emoji_subgroups-train.array_record-*"))
    sources = tfds.data_source("emoji_subgroups/32px", data_dir=str(tmp_path), download=False)
    train, test = sources["train"], sources["test"]
    assert len(train) > 2000 and len(test) > 500
    ex = train[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["image"].std() > 5  # a drawn emoji, not a blank canvas
    names = (
        tfds.builder("emoji_subgroups/32px", data_dir=str(tmp_path)).info.features["label"].names
    )
    assert "face-smiling" in names and "country-flag" in names
    groups = {split: {s[i]["group"] for i in range(len(s))} for split, s in sources.items()}
    assert not groups["train"] & groups["test"]
    assert "tensorflow" not in sys.modules

    # open_split reads the same files, in tagjax's example format.
    ds = downstream.open_split("emoji_subgroups/32px", "test", str(tmp_path))
    assert len(ds.source) == len(test) and ds.class_names == list(names)
    first = ds.source[0]
    assert set(first) == {"image", "label", "group"} and isinstance(first["group"], str)
    # A prepared copy reads on a machine without the font and emoji-test.txt.
    monkeypatch.setenv("TAGJAX_EMOJI_TEST", str(tmp_path / "missing.txt"))
    monkeypatch.setenv("TAGJAX_EMOJI_FONT", str(tmp_path / "missing.ttf"))
    again = downstream.open_split("emoji_subgroups/32px", "train", str(tmp_path))
    assert len(again.source) == len(train) and again.num_classes == len(names)
    with pytest.raises(UserError, match="unicode-data"):
        emoji_dataset.prepare_own("emoji_subgroups/128px", str(tmp_path))


def test_stock_dataset_through_mock_data():
    import grain
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        ds = downstream.open_split("cifar10", "test", "/nonexistent")
        assert ds.num_classes == 10 and len(ds.source) == 6
        ex = ds.source[3]
        assert ex["image"].shape == (32, 32, 3) and 0 <= ex["label"] < 10 and ex["group"] == ""
        batch = next(iter(grain.MapDataset.source(ds.source).map(lambda e: e["image"]).batch(3)))
        assert batch.shape == (3, 32, 32, 3)


def test_unprepared_stock_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(
        UserError, match=r"not prepared.*download_and_prepare\(file_format='array_record'\)"
    ):
        downstream.open_split("oxford_iiit_pet", "train", str(tmp_path))
    with pytest.raises(UserError, match="unknown dataset"):
        downstream.open_split("no_such_dataset_xyz", "train", str(tmp_path))


def _png(color, alpha=255) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (20, 16), (*color, alpha)).save(buf, format="PNG")
    return buf.getvalue()


def test_class_folders_with_train_and_test_dirs(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("zebra", "apple"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / cls / f"{i}.png").write_bytes(_png((200, 10, 10)))
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    train = downstream.open_split(str(tmp_path), "train")
    test = downstream.open_split(f"folder:{tmp_path}", "test")
    assert (
        train.class_names == ["apple", "zebra"] and len(train.source) == 6 and len(test.source) == 4
    )
    assert [train.source[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_test_classes_without_training_images_are_named(tmp_path, caplog):
    for split, cls in (("train", "apple"), ("test", "apple"), ("test", "zebra")):
        (tmp_path / split / cls).mkdir(parents=True)
        (tmp_path / split / cls / "0.png").write_bytes(_png((200, 10, 10)))
    test = downstream.open_split(str(tmp_path), "test")
    assert len(test.source) == 1  # zebra cannot be scored by a classifier that never saw it
    assert "1 test class folder(s) with no training folder are left out: zebra" in caplog.text


def test_single_level_folders_split_by_path_hash(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(50):
            (tmp_path / cls / f"{i}.png").write_bytes(_png((0, 0, 0)))
    train = downstream.open_split(str(tmp_path), "train", folder_test_fraction=0.3)
    test = downstream.open_split(str(tmp_path), "test", folder_test_fraction=0.3)
    train_files = {f for f, _ in train.source.files}
    test_files = {f for f, _ in test.source.files}
    assert not train_files & test_files and len(train_files | test_files) == 100
    assert 15 <= len(test_files) <= 45
    again = downstream.open_split(str(tmp_path), "test", folder_test_fraction=0.3)
    assert {f for f, _ in again.source.files} == test_files


def test_read_image_composites_transparency_on_white_and_rasterizes_svg():
    transparent = downstream.read_image(_png((255, 0, 0), alpha=0))
    assert isinstance(transparent, np.ndarray) and (transparent == 255).all()
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="20"><rect width="10" height="20" fill="#00f"/></svg>'
    pixels = downstream.read_image(svg, svg_size=40)
    assert pixels.shape == (80, 40, 3) and tuple(pixels[40, 20]) == (0, 0, 255)
    jpeg_magic = b"\xff\xd8\xff" + b"x" * 10
    assert downstream.read_image(jpeg_magic) == jpeg_magic  # left for the reduced-size JPEG decoder
    with pytest.raises(downstream.BadImage):
        downstream.read_image(b"garbage bytes")


def test_nearest_neighbours_match_brute_force_across_chunks():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(37, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    sims, idx = decontaminate.nearest_neighbours(queries, keys, 3, chunk=10)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    full = qn @ kn.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :3])
    np.testing.assert_allclose(sims, np.sort(full, axis=1)[:, ::-1][:, :3], rtol=1e-5)


def test_near_duplicates_become_an_exclude_list(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.normal(size=(100, 16)).astype(np.float32)
    evals = np.stack([train[7] + 0.01 * rng.normal(size=16), train[42] * 3.0, rng.normal(size=16)])
    ids = [f"post-{i}" for i in range(100)]
    result = decontaminate.find_near_duplicates(
        evals, train, ids, threshold=0.95, k=3, eval_names=["a", "b", "c"], center=False
    )
    assert set(result.train_ids) == {"post-7", "post-42"}  # scale does not matter (cosine)
    assert result.nearest.shape == (3,) and result.nearest[2] < 0.95
    centred = decontaminate.find_near_duplicates(evals[:1], train, ids, threshold=0.95, k=3)
    assert centred.train_ids == ["post-7"]
    assert {p["eval_name"] for p in result.pairs} == {"a", "b"}
    path = decontaminate.write_exclude_list(result, tmp_path / "exclude.txt")
    assert posts.read_id_list(path) == result.train_ids
    # the contract: `tagjax build --optout-posts` reads this file as it is
    assert build_steps.OptOut.load(str(path), None).posts == frozenset(result.train_ids)
    assert path.read_text().startswith("# tagjax decontamination")
    assert len(Path(f"{path}.pairs.jsonl").read_text().splitlines()) == 2


def test_decontaminate_command_lists_training_copies_of_evaluation_images(tmp_path, capsys):
    """`tagjax decontaminate`: a built training set holding a re-encoded copy of an evaluation image."""
    from PIL import Image

    from tagjax import cli, config, records, transfer
    from tagjax import images as images_lib

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (40, 40, 3)).astype(np.uint8) for _ in range(12)]
    for p in pictures:  # distinct blocky pictures (random trunks see little in pixel noise)
        p[:] = np.kron(rng.integers(0, 256, (5, 5, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    root = tmp_path / "dataset"
    root.mkdir()
    encoded = [
        records.encode(records.Record(f"post{i}", images_lib.encode_jpeg(p, 95), (0,)))
        for i, p in enumerate(pictures)
    ]
    name = records.shard_name("train", 0, 1)
    records.write_shard(root / name, encoded)
    records.Manifest(records.SCHEMA_VERSION, {"train": {"shards": [name], "num_records": 12}}).save(
        root
    )
    evals = tmp_path / "eval"
    evals.mkdir()
    Image.fromarray(pictures[4]).save(evals / "copy_of_post4.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3)).astype(np.uint8)).save(
        evals / "unrelated.png"
    )

    ckpt = transfer.write_random_init_checkpoint(config.load("tiny"), tmp_path / "ckpt")
    out = tmp_path / "exclude.txt"
    assert (
        cli.main(
            [
                "decontaminate",
                "--checkpoint",
                str(ckpt),
                "--train",
                str(root),
                "--eval",
                str(evals),
                "--threshold",
                "0.99",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert posts.read_id_list(out) == ["post4"]
    assert "1 of 12 training images" in capsys.readouterr().out

"""`tagjax predict` (vocabulary hashtags with probabilities) and `tagjax embed` (.npy + index, resumable)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tagjax import cli, config, emoji_dataset, records, transfer
from tagjax import inference as inference_lib

CLIPART = Path("/usr/share/openclipart/svg/science/provetta_plasma_sangue_a_01.svg")


@pytest.fixture(scope="module")
def vocab():
    from tagjax import vocab as vocab_lib

    return vocab_lib.build_vocabulary(
        {"dog": 10, "dogs": 3, "cat": 5, "smile": 3, "flag": 4, "car": 2, "heart": 6, "face": 7},
        mode="nouns",
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, vocab):
    """A randomly initialized tiny checkpoint whose head predicts ``vocab``, laid out like a training workdir
    (``WORKDIR/vocab.json`` beside ``WORKDIR/checkpoints/0``)."""
    root = tmp_path_factory.mktemp("predict")
    cfg = config.load("tiny")
    transfer.write_random_init_checkpoint(
        cfg,
        root / "checkpoints" / "0",
        num_classes=vocab.num_labels,
        metadata={"vocab_fingerprint": vocab.fingerprint()},
    )
    vocab.save(root / "vocab.json")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real images: rendered color emoji (PNG) and, where Debian's openclipart-svg is installed, a clipart."""
    from PIL import Image, ImageFont

    root = tmp_path_factory.mktemp("images")
    font = ImageFont.truetype(
        emoji_dataset.EMOJI_FONT, emoji_dataset.EMOJI_STRIKE, layout_engine=ImageFont.Layout.RAQM
    )
    paths = []
    for name, text in [("dog", "\U0001f415"), ("smile", "\U0001f600"), ("car", "\U0001f697")]:
        path = root / f"{name}.png"
        Image.fromarray(emoji_dataset.render_emoji(text, font, 64)).save(path)
        paths.append(path)
    jpeg = root / "car.jpg"
    Image.open(paths[-1]).save(jpeg, quality=90)
    paths.append(jpeg)
    if CLIPART.is_file():
        paths.append(root / CLIPART.name)
        shutil.copy(CLIPART, paths[-1])
    return paths


def test_predict_returns_vocabulary_hashtags_with_probabilities(workdir, vocab, images, capsys):
    assert (
        cli.main(
            [
                "predict",
                "--checkpoint",
                str(workdir),
                "--top-k",
                str(vocab.num_labels),
                "--json",
                *map(str, images),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == [str(p) for p in images]
    names = {vocab.name_of(i) for i in range(vocab.num_labels)}
    for item in out:
        tags = item["hashtags"]
        assert len(tags) == vocab.num_labels
        assert {t["hashtag"] for t in tags} == names  # every hashtag comes from the vocabulary
        probs = [t["probability"] for t in tags]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # softmax over the whole vocabulary
        for t in tags:
            assert t["synsets"] == vocab.synsets_of(t["id"]) and t["hashtag"] == vocab.name_of(
                t["id"]
            )
            assert set(t["aliases"]) <= set(vocab.aliases_of(t["id"]))
    dog = vocab.id_of("dog")
    entry = next(t for t in out[0]["hashtags"] if t["id"] == dog)
    assert "dogs" in entry["aliases"] and "dog.n.01" in entry["synsets"]


def test_predict_table_and_bad_images(workdir, images, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = cli.main(
        [
            "predict",
            "--checkpoint",
            str(workdir / "checkpoints"),
            "--top-k",
            "3",
            str(images[0]),
            str(broken),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1  # one image could not be read; the other was still predicted
    assert "1. #" in captured.out and "3. #" in captured.out and "error:" in captured.out
    assert "1 of 2 images could not be read" in captured.err


def test_predict_refuses_a_vocabulary_of_another_run(workdir, vocab, images, tmp_path, capsys):
    from tagjax import vocab as vocab_lib

    other = vocab_lib.build_vocabulary(
        {
            "tree": 9,
            "house": 8,
            "boat": 7,
            "road": 6,
            "bird": 5,
            "shoe": 4,
            "lamp": 3,
            "rock": 2,
            "cloud": 1,
        },
        mode="nouns",
        top_k=vocab.num_labels,
    )
    assert (
        other.num_labels == vocab.num_labels
    )  # same head size: only the fingerprint tells them apart
    other.save(tmp_path / "other.json")
    assert (
        cli.main(
            [
                "predict",
                "--checkpoint",
                str(workdir),
                "--vocab",
                str(tmp_path / "other.json"),
                str(images[0]),
            ]
        )
        == 3
    )
    assert "not the vocabulary this checkpoint was trained on" in capsys.readouterr().err


def test_embed_folder_matches_features_and_resumes(workdir, images, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    for p in images:
        shutil.copy(p, folder / p.name)
    prefix = tmp_path / "emb" / "folder"
    assert (
        cli.main(
            [
                "embed",
                "--checkpoint",
                str(workdir),
                "--input",
                str(folder),
                "--output",
                str(prefix),
                "--batch-size",
                "2",
            ]
        )
        == 0
    )
    emb = np.load(f"{prefix}.npy")
    index = inference_lib.read_index(f"{prefix}.index.jsonl")
    assert emb.shape[0] == len(images) == len(index) and all(r["valid"] for r in index)
    inference = inference_lib.Inference(workdir, head=False)
    from tagjax import downstream

    for row in index:
        image = downstream.read_image_file(folder / row["id"])
        want = inference.features(inference.preprocess(image)[None])[0]
        np.testing.assert_allclose(emb[row["row"]], want, rtol=1e-4, atol=1e-5)

    # An interrupted run: rows from 2 on never written, the partial marker says 2 are done.
    ident = None
    partial = Path(f"{prefix}.partial.json")
    src = inference_lib.folder_input(folder)
    emb_rw = np.load(f"{prefix}.npy", mmap_mode="r+")
    emb_rw[2:] = 0
    emb_rw.flush()
    del emb_rw
    lines = Path(f"{prefix}.index.jsonl").read_text().splitlines()
    Path(f"{prefix}.index.jsonl").write_text(
        "\n".join(lines[:3]) + "\n"
    )  # a line past the marker survives
    ident = {
        "checkpoint": inference.path,
        "input": src.description,
        "rows": src.length,
        "dim": inference.feature_dim,
        "image_size": inference.image_size,
        "l2_normalize": False,
        "dtype": "float32",
    }
    partial.write_text(json.dumps({"identity": ident, "done": 2}))
    summary = inference_lib.embed(inference, src, prefix, batch_size=2, progress=False)
    assert summary["rows"] == len(images) and not partial.exists()
    np.testing.assert_allclose(np.load(f"{prefix}.npy"), emb, rtol=1e-5, atol=1e-6)
    rows = [json.loads(x)["row"] for x in Path(f"{prefix}.index.jsonl").read_text().splitlines()]
    assert sorted(rows) == list(range(len(images)))  # no duplicate rows after the resume


def test_embed_built_dataset_records_post_ids(workdir, images, tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    encoded = []
    for i, p in enumerate(images[:3]):
        from PIL import Image

        from tagjax import images as images_lib

        pixels = np.asarray(Image.open(p).convert("RGB"))
        encoded.append(
            records.encode(records.Record(f"post{i}", images_lib.encode_jpeg(pixels, 90), (i,)))
        )
    # One record per shard: the ids come back in manifest order across shards, and reading the whole
    # split keeps at most two shard readers open (their chunk indexes are what memory grows with).
    names = [records.shard_name("train", i, 3) for i in range(3)]
    for name, rec in zip(names, encoded):
        records.write_shard(root / name, [rec])
    records.Manifest(records.SCHEMA_VERSION, {"train": {"shards": names, "num_records": 3}}).save(
        root
    )
    source = inference_lib.records_input(root, "train")
    assert [source.load(i)[1]["id"] for i in range(3)] == ["post0", "post1", "post2"]
    reader = next(
        c.cell_contents
        for c in source.load.__closure__
        if isinstance(c.cell_contents, records.BoundedShardReader)
    )
    assert reader.open_shards == 2
    prefix = tmp_path / "shards"
    assert (
        cli.main(
            ["embed", "--checkpoint", str(workdir), "--input", str(root), "--output", str(prefix)]
        )
        == 0
    )
    index = inference_lib.read_index(f"{prefix}.index.jsonl")
    assert [r["id"] for r in index] == ["post0", "post1", "post2"]
    assert [r["labels"] for r in index] == [[0], [1], [2]]
    assert np.load(f"{prefix}.npy").shape == (
        3,
        inference_lib.Inference(workdir, head=False).feature_dim,
    )


def test_predict_streams_a_folder_in_fixed_batches_with_unchanged_results(
    workdir, vocab, images, tmp_path, monkeypatch, capsys
):
    """A folder is predicted in batches of --batch-size (the last padded), one compile for all, with
    the same hashtags as one forward pass over every image."""
    from tagjax.predict import read_user_image, top_hashtags

    folder = tmp_path / "folder"
    folder.mkdir()
    for p in images:  # 4-5 images: batches of 3, the last one partly padding
        shutil.copy(p, folder / p.name)
    files = inference_lib.image_files(folder)
    inference = inference_lib.Inference(workdir, head=True)
    crops = np.stack([inference.preprocess(read_user_image(str(f))) for f in files])
    want = top_hashtags(inference, vocab, crops, top_k=3)

    passes = []
    run = inference_lib.Inference._run

    def recording(self, what, batch):
        out = run(self, what, batch)
        passes.append((batch.shape, self._fns[what]._cache_size()))
        return out

    monkeypatch.setattr(inference_lib.Inference, "_run", recording)
    argv = ["predict", "--checkpoint", str(workdir), "--json", "--top-k", "3", "--batch-size", "3"]
    assert cli.main([*argv, str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    size = inference.image_size
    assert len(files) % 3 and len(passes) == -(-len(files) // 3)
    assert all(shape == (3, size, size, 3) and compiles == 1 for shape, compiles in passes), passes
    assert [o["image"] for o in out] == [str(f) for f in files]
    for got, expected in zip(out, want):
        assert [t["id"] for t in got["hashtags"]] == [t["id"] for t in expected]
        np.testing.assert_allclose(
            [t["probability"] for t in got["hashtags"]],
            [t["probability"] for t in expected],
            rtol=1e-5,
        )


def test_images_one_pixel_wide_or_tall_get_a_center_crop(workdir, images, tmp_path, capsys):
    from PIL import Image

    from tagjax import augment

    transform = augment.EvalTransform(resize=36, size=32)
    for shape in ((10000, 1, 3), (1, 10000, 3), (3, 1, 3)):
        image = np.zeros(shape, np.uint8)
        image[..., 0] = 200  # red everywhere: the crop is red whichever pixel it keeps
        out = np.zeros((32, 32, 3), np.uint8)
        augment.eval_image(image, out, transform)
        assert (out[..., 0] == 200).all() and not out[..., 1:].any(), shape

    Image.new("RGB", (1, 10000), "red").save(tmp_path / "tall.png")
    Image.new("RGB", (10000, 1), "blue").save(tmp_path / "wide.png")
    paths = [str(images[0]), str(tmp_path / "tall.png"), str(tmp_path / "wide.png")]
    assert cli.main(["predict", "--checkpoint", str(workdir), "--json", *paths]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == paths and all(o["hashtags"] for o in out)


@pytest.mark.parametrize("command", ["predict", "embed"])
@pytest.mark.parametrize("size", ["0", "-4"])
def test_image_size_below_one_is_refused(workdir, images, tmp_path, capsys, command, size):
    argv = [command, "--checkpoint", str(workdir), "--image-size", size]
    if command == "predict":
        argv.append(str(images[0]))
    else:
        argv += ["--input", str(images[0].parent), "-o", str(tmp_path / "e")]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert err == f"tagjax {command}: error: --image-size must be at least 1.", err

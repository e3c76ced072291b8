"""tagjax.posts: readers report what each input format says; hashtags come out of captions correctly."""

import bz2
import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagjax import build_steps, decontaminate, images, posts
from tagjax.errors import UserError


def png_bytes(color=(200, 30, 30), size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sunset at the #beach with #Dogs!", ["beach", "Dogs"]),
        ("#sun#sea #sand,#surf.", ["sun", "sea", "sand", "surf"]),
        ("C# and page#anchor and &#38; are not tags", []),
        ("#2024 is a number, #2024vibes is a tag", ["2024vibes"]),
        ("東京 #日本 #नमस्ते #café #ゲーム・センター", ["日本", "नमस्ते", "café", "ゲーム・センター"]),
        ("full-width ＃ハッシュタグ works", ["ハッシュタグ"]),
        ("#my_dog_rex\n#", ["my_dog_rex"]),
        ("", []),
    ],
)
def test_extract_hashtags(text, expected):
    assert posts.extract_hashtags(text) == expected


def test_extract_keeps_combining_marks_and_normalizes_nfc():
    decomposed = "#cafe\u0301"  # e + combining acute
    assert posts.extract_hashtags(decomposed) == ["caf\u00e9"]


def test_hashtags_of_merges_tags_and_caption_without_repeats():
    post = posts.Post(post_id="1", tags=("#dog", "beach", " "), caption="A #dog at the #park")
    assert posts.hashtags_of(post) == ["dog", "beach", "park"]


def test_jsonl_reader(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes())
    lines = [
        {"id": "a", "image": "img/a.png", "tags": ["dog"], "user": "u1", "public": True},
        {"id": "b", "image": "img/b.png", "caption": "#cat", "visibility": "private"},
        {"id": "c", "image": "img/c.png", "hashtags": "tree, house"},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n"
    (tmp_path / "posts.jsonl").write_text(text)
    got = list(posts.read_jsonl(str(tmp_path / "posts.jsonl"), source="s"))
    assert [p.post_id for p in got] == ["a", "b", "c", "posts.jsonl:4"]
    a, b, c, bad = got
    assert a.tags == ("dog",) and a.user == "u1" and a.public is True
    assert Path(a.image_path) == tmp_path / "img" / "a.png"
    assert b.public is False and b.caption == "#cat"
    assert c.public is None and c.tags == ("tree", "house")
    assert bad.problem == posts.BAD_METADATA


def make_tar(path: Path, members: dict) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:  # a symlink member
                info.type = tarfile.SYMTYPE
                info.linkname = "/etc/passwd"
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_reader_groups_members_and_refuses_unsafe_paths(tmp_path):
    shard = tmp_path / "00000.tar"
    make_tar(
        shard,
        {
            "000000001.jpg": png_bytes(),
            "000000001.txt": b"a #dog on the beach",
            "000000001.json": json.dumps({"key": "000000001", "url": "http://x/1.jpg"}).encode(),
            "000000002.png": png_bytes((0, 0, 255)),
            "000000002.json": json.dumps({"tags": ["cat"], "public": False}).encode(),
            "../escape.jpg": png_bytes(),
            "/abs/path.jpg": png_bytes(),
            "000000003.jpg": None,  # a symlink
            "000000004.txt": b"caption without an image",
        },
    )
    got = {p.post_id: p for p in posts.read_webdataset(str(shard))}
    assert got["000000001"].caption == "a #dog on the beach" and got["000000001"].public is True
    assert got["000000001"].image_bytes == png_bytes()
    assert got["000000002"].tags == ("cat",) and got["000000002"].public is False
    assert got["../escape"].problem == posts.UNSAFE_ARCHIVE_MEMBER
    assert got["/abs/path"].problem == posts.UNSAFE_ARCHIVE_MEMBER
    assert got["000000003"].problem == posts.UNSAFE_ARCHIVE_MEMBER
    assert got["000000004"].problem == posts.NO_IMAGE_MEMBER
    assert not (tmp_path / "escape.jpg").exists()


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("a/b.jpg", True),
        ("000.jpg", True),
        ("../x.jpg", False),
        ("a/../../x", False),
        ("/etc/passwd", False),
        ("C:\\x.jpg", False),
        ("a\\..\\..\\x", False),
        ("", False),
    ],
)
def test_safe_member_name(name, safe):
    assert posts.safe_member_name(name) is safe


def test_folder_reader_with_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(png_bytes())
    (tmp_path / "sub" / "x.txt").write_text("my #cat sleeps")
    (tmp_path / "y.jpg").write_bytes(png_bytes())
    (tmp_path / "y.json").write_text(json.dumps({"tags": ["dog"], "user": "u9", "public": True}))
    (tmp_path / "notes.md").write_text("ignored")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(png_bytes())
    os.symlink(outside, tmp_path / "link.png")
    got = {p.post_id: p for p in posts.read_folder(str(tmp_path))}
    assert set(got) == {"sub/x", "y", "link"}
    assert posts.hashtags_of(got["sub/x"]) == ["cat"] and got["sub/x"].public is None
    assert got["y"].tags == ("dog",) and got["y"].user == "u9" and got["y"].public is True
    assert got["link"].problem == posts.SYMLINK_ESCAPES_ROOT


SVG = """<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
     xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="{w}" height="{h}">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:subject><rdf:Bag>{tags}<rdf:li></rdf:li></rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <circle cx="{cx}" cy="{cy}" r="{r}" fill="{fill}"/>
</svg>"""


def write_svg(path: Path, tags, creator="Ann", w=100, h=50, fill="red"):
    li = "".join(f"<rdf:li>{t}</rdf:li>" for t in tags)
    path.write_text(
        SVG.format(
            w=w, h=h, tags=li, creator=creator, cx=w / 2, cy=h / 2, r=min(w, h) / 3, fill=fill
        )
    )


def test_openclipart_reader_metadata_symlinks_and_rasterization(tmp_path, monkeypatch):
    root = tmp_path / "svg"
    (root / "animals").mkdir(parents=True)
    write_svg(root / "animals" / "cat.svg", ["cat", "hash", "animal"], creator="Ann")
    write_svg(root / "animals" / "dog.svg", ["dog"], creator="Bob", w=40, h=80)
    os.symlink("cat.svg", root / "animals" / "cat_alias.svg")
    got = {p.post_id: p for p in posts.read_openclipart(str(root), source="oc")}
    assert set(got) == {"animals/cat", "animals/dog", "animals/cat_alias"}
    assert got["animals/cat_alias"].problem == posts.DUPLICATE_PATH
    cat = got["animals/cat"]
    assert cat.tags == ("cat", "animal")  # the 'hash' artifact and the empty keyword are gone
    assert cat.user == "Ann" and cat.public is True and cat.image_kind == "svg"

    cache = posts.RasterCache(tmp_path / "cache")
    png = posts.load_image_bytes(cat, 32, cache)
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert min(img.size) == 32 and img.size == (64, 32)  # shorter side = requested, aspect kept
    assert img.getpixel((1, 1)) == (255, 255, 255)  # white background
    assert img.getpixel((32, 16))[0] > 200 and img.getpixel((32, 16))[1] < 60
    dog = posts.load_image_bytes(got["animals/dog"], 32, cache)
    assert Image.open(io.BytesIO(dog)).size == (32, 64)

    def fail(*a, **k):
        raise AssertionError("rasterized again despite the cache")

    monkeypatch.setattr(posts, "rasterize_svg", fail)
    assert posts.load_image_bytes(cat, 32, cache) == png  # served from the cache


def test_unrenderable_svg_and_missing_file_are_reasons(tmp_path):
    bad = tmp_path / "bad.svg"
    bad.write_text('<svg xmlns="http://www.w3.org/2000/svg"><!DOCTYPE x [<!ENTITY a "b">]></svg>')
    post = posts.Post(post_id="bad", image_path=str(bad), image_kind="svg")
    with pytest.raises(images.ImageSkip) as e:
        posts.load_image_bytes(post, 32, None)
    assert e.value.reason == posts.SVG_UNRENDERABLE
    with pytest.raises(images.ImageSkip) as e:
        posts.load_image_bytes(posts.Post(post_id="m", image_path=str(tmp_path / "nope.jpg")), 32)
    assert e.value.reason == posts.MISSING_IMAGE


def yfcc_row(photo_id, user, tags, marker="0", photo_hash=None):
    fields = [
        photo_id,
        user,
        "nick",
        "2010-01-01",
        "1262304000",
        "Canon",
        "My+Title",
        "a+%23sunset",
        tags,
        "",
        "",
        "",
        "",
        "page",
        "dl",
        "CC",
        "url",
        "1",
        "2",
        "s",
        "so",
        "jpg",
        marker,
    ]
    if photo_hash is not None:
        fields = ["7", fields[0], photo_hash, *fields[1:]]
    return "\t".join(fields) + "\n"


def test_yfcc_reader_both_layouts(tmp_path):
    images_dir = tmp_path / "photos"
    h = "abcdef0123456789"
    (images_dir / h[:3] / h[3:6]).mkdir(parents=True)
    (images_dir / h[:3] / h[3:6] / f"{h}.jpg").write_bytes(png_bytes())
    meta = tmp_path / "yfcc100m_dataset.bz2"
    rows = (
        yfcc_row("100", "u@N00", "new+york,golden%20retriever", photo_hash=h)
        + yfcc_row("101", "u@N01", "beach")
        + yfcc_row("102", "u@N01", "video", marker="1")
        + "broken\trow\n"
    )
    meta.write_bytes(bz2.compress(rows.encode()))
    got = list(posts.read_yfcc(str(meta), str(images_dir), source="y"))
    assert [p.post_id for p in got[:3]] == ["100", "101", "102"]
    first = got[0]
    assert first.tags == ("new york", "golden retriever") and first.user == "u@N00"
    assert "#sunset" in first.caption and first.public is True
    assert Path(first.image_path).is_file()
    assert got[1].image_path == str(images_dir / "101.jpg")
    assert got[2].problem == posts.NOT_AN_IMAGE
    assert got[3].problem == posts.BAD_METADATA


def test_parse_source_kinds_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    assert posts.parse_source(str(tmp_path / "a.jsonl"))[0].kind == "jsonl"
    make_tar(tmp_path / "0.tar", {"1.jpg": png_bytes()})
    make_tar(tmp_path / "1.tar", {"2.jpg": png_bytes()})
    assert [u.kind for u in posts.parse_source(f"wds:{tmp_path}")] == ["wds", "wds"]
    # img2dataset can gzip its shards: a folder of *.tar.gz is a webdataset too, and none is skipped.
    gz = tmp_path / "gz"
    gz.mkdir()
    for name in ("0.tar", "1.tar"):
        make_tar(tmp_path / name, {f"{name}.jpg": png_bytes()})
        (gz / f"{name}.gz").write_bytes(gzip.compress((tmp_path / name).read_bytes()))
    assert [Path(u.path).name for u in posts.parse_source(str(gz))] == ["0.tar.gz", "1.tar.gz"]
    assert [p.post_id for u in posts.parse_source(f"wds:{gz}") for p in posts.read_unit(u)] == [
        "0",
        "1",
    ]
    with pytest.raises(UserError, match="does not exist"):
        posts.parse_source(f"folder:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="--yfcc-images"):
        posts.parse_source(f"yfcc:{tmp_path / 'a.jsonl'}")


@pytest.mark.skipif(
    not Path(posts.OPENCLIPART_ROOT).is_dir(), reason="openclipart-svg not installed"
)
def test_real_openclipart_has_tags_and_creators():
    first = []
    for post in posts.read_openclipart(posts.OPENCLIPART_ROOT):
        if post.problem is None:
            first.append(post)
        if len(first) == 50:
            break
    assert sum(bool(p.tags) for p in first) > 40
    assert all(p.user for p in first)


# ---- hostile text encodings, visibility values and id lists (review_hostile #2-#5, #16) ----------

BOM = b"\xef\xbb\xbf"


def test_id_list_strips_a_bom_and_refuses_text_that_is_not_utf8(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(BOM + b"p3\r\np4\n")  # Notepad / Excel "UTF-8", Windows line ends
    assert posts.read_id_list(bom) == ["p3", "p4"]
    for name, data in [("utf16.txt", b"\xff\xfep\x007\x00\n\x00"), ("latin1.txt", b"caf\xe9\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"opt-out list .*{name} is not UTF-8 text") as e:
            posts.read_id_list(tmp_path / name, "opt-out list")
        assert "\n" not in str(e.value)


def test_id_list_comments_cannot_swallow_an_id(tmp_path):
    f = tmp_path / "ids.txt"
    lines = ["# a comment", "#", "   #\tindented comment", "#p0", "  p1  ", '" p2 "', '"# x"', ""]
    f.write_text("\n".join([*lines, r'"p5\np6"', "#"]))
    assert posts.read_id_list(f) == ["#p0", "p1", " p2 ", "# x", "p5\np6"]
    f.write_text('p1\n"unclosed\n')
    with pytest.raises(UserError, match=r"line 2.*JSON string"):
        posts.read_id_list(f)


def test_exclude_list_reads_back_exactly_the_ids_it_wrote(tmp_path):
    ids = ["plain", "#p0", "p1\np2", " p3 ", "# x", "#", '"q"', "a\rb", "tab\t", "x\u2028y"]
    ids += ["caf\udce9", "東京", "\ufeffbom"]
    result = decontaminate.NearDuplicates(ids, [], 0.9, 40, 3, np.zeros(3))
    path = decontaminate.write_exclude_list(result, tmp_path / "exclude.txt")
    assert posts.read_id_list(path) == ids
    written = path.read_text(encoding="utf-8").split("\n")
    assert written[0].startswith("# tagjax decontamination")
    assert written[1:3] == ["plain", "#p0"]  # ids the format carries as they are stay readable


@pytest.mark.parametrize(
    ("meta", "public"),
    [
        ({"public": True}, True),
        ({"public": 1}, True),
        ({"public": " Yes "}, True),
        ({"public": "public"}, True),
        ({"visibility": "Public"}, True),
        ({"private": False}, True),
        ({"private": 0}, True),
        ({"public": False}, False),
        ({"public": float("nan")}, False),  # what json.dumps writes for a missing pandas value
        ({"public": [False]}, False),
        ({"public": [True]}, False),
        ({"public": {"value": False}}, False),
        ({"public": 2}, False),
        ({"public": None}, False),
        ({"public": "no"}, False),
        ({"visibility": ["public"]}, False),
        ({"visibility": True}, False),
        ({"private": float("nan")}, False),
        ({"private": None}, False),
        ({"private": []}, False),
        ({"private": ""}, False),
        ({}, None),
    ],
)
def test_only_real_public_values_pass_the_privacy_gate(tmp_path, meta, public):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "posts.jsonl").write_text(json.dumps({"id": "a", "image": "a.png", **meta}) + "\n")
    (post,) = posts.read_jsonl(str(tmp_path / "posts.jsonl"))
    assert post.public is public
    if public is False:  # never admitted, not even with --assume-public
        assert build_steps.admit(post, build_steps.OptOut(), assume_public=True) == "private"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_jsonl_line_that_is_not_utf8_is_bad_metadata(tmp_path, suffix):
    (tmp_path / "a.png").write_bytes(png_bytes())
    lines = [{"id": "caf\xe9", "image": "a.png"}, {"id": "caf\xe8", "image": "a.png"}]
    lines.append({"id": "café", "image": "a.png"})
    data = b"".join(json.dumps(x, ensure_ascii=False).encode("latin-1") + b"\n" for x in lines[:2])
    data += json.dumps(lines[2], ensure_ascii=False).encode("utf-8") + b"\n"
    path = tmp_path / f"posts{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    got = list(posts.read_jsonl(str(path)))
    assert [(p.post_id, p.problem) for p in got] == [
        (f"{path.name}:1", posts.BAD_METADATA),
        (f"{path.name}:2", posts.BAD_METADATA),
        ("café", None),
    ]


def test_bom_prefixed_manifest_and_sidecars_keep_their_first_post(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    line = json.dumps({"id": "first", "image": "a.png", "tags": ["dog"], "public": True})
    data = BOM + f"{line}\n".encode()
    for name, blob in [("bom.jsonl", data), ("bom.jsonl.gz", gzip.compress(data))]:
        (tmp_path / name).write_bytes(blob)
        (post,) = posts.read_jsonl(str(tmp_path / name))
        assert post.post_id == "first" and post.problem is None and post.public is True

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.png").write_bytes(png_bytes())
    (folder / "x.json").write_bytes(BOM + json.dumps({"tags": ["cat"], "public": True}).encode())
    (post,) = posts.read_folder(str(folder))
    assert post.problem is None and post.tags == ("cat",) and post.public is True

    (folder / "x.json").write_bytes(b'{"id": "caf\xe9", "public": true}')  # not UTF-8
    (post,) = posts.read_folder(str(folder))
    assert post.problem == posts.BAD_METADATA

    tar = tmp_path / "0.tar"
    make_tar(tar, {"k.jpg": png_bytes(), "k.json": BOM + b'{"tags": ["owl"], "public": true}'})
    (post,) = posts.read_webdataset(str(tar))
    assert post.problem is None and post.tags == ("owl",)


def test_an_svg_named_by_a_manifest_is_rasterized_like_openclipart(tmp_path):
    # A jsonl post whose image is an .svg was counted as a corrupt image (only openclipart drew SVGs),
    # though predict and embed read the same file.
    write_svg(tmp_path / "logo.svg", ["logo"])
    post = posts.Post("p1", tags=("logo",), image_path=str(tmp_path / "logo.svg"))
    png = posts.load_image_bytes(post, side=32)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(png)).size == (64, 32)  # shorter side 32, aspect kept

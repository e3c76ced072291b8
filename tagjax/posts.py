"""Tagged posts as users really have them -> :class:`Post` records, one reader per input format.

A *post* is one image with the hashtags its uploader gave it, the uploader's id and whether the post is
public. Readers never decide what enters a dataset; they report what the input says, and a reader that
meets something it must refuse (an archive member with an absolute or ``..`` path, a manifest line that is
not JSON, a video) yields the post with ``problem`` set so the builder counts it by reason.

Input kinds (``SOURCE_KINDS``; the builder takes them as ``KIND:PATH``):

``jsonl``
    One JSON object per line: ``{"id", "image", "tags" | "hashtags", "caption" | "text", "user",
    "public" | "visibility"}``. Relative image paths are relative to the manifest's folder.
``wds``
    webdataset tar shards as img2dataset writes them (``KEY.jpg`` + ``KEY.txt`` caption + ``KEY.json``
    metadata). A folder of ``*.tar`` or one tar. Samples are read straight from the archive stream:
    nothing is ever extracted to disk.
``folder``
    A folder tree of images, each optionally with a sidecar ``NAME.txt`` (caption; its #hashtags are
    the tags) and/or ``NAME.json`` (same keys as a jsonl line).
``openclipart``
    Debian's ``openclipart-svg`` (``/usr/share/openclipart/svg``): public-domain SVG cliparts whose RDF
    ``dc:subject`` keywords are tags written by the artists; the creator is the "user" (one artist's
    icon theme puts the same tags on ~900 files, which is exactly the uploader habit the builder
    handles). Files reached through symlinks are read once. The keyword ``hash`` is dropped: it is an
    artifact of the corpus' metadata conversion (a literal "#" keyword became the word, on ~1.8k files,
    followed by an empty keyword), not a tag anyone wrote. SVGs are rasterized by cairosvg onto white in
    the worker that needs the image (:func:`load_image_bytes`), with a cache.
``yfcc``
    YFCC100M's metadata file (tab-separated; the 23-field Webscope file or the 25-field one with a line
    number and photo hash; plain, ``.bz2`` or ``.gz``); user tags are the tags, the user NSID the user.
    Images are looked up under an images folder as ``<hash[:3]>/<hash[3:6]>/<hash>.jpg`` (the AWS
    multimedia-commons layout) or ``<photo id>.jpg``.

Visibility: formats with a visibility field report it; where the format has none, the reader says so
(``public=None``) and the builder drops the post unless told ``--assume-public``, except for sources that
are public by construction (openclipart is public domain; YFCC100M is public Creative Commons photos;
img2dataset shards are crawled from the public web).

Hashtags in free text (:func:`extract_hashtags`) follow what social networks link as hashtags: a ``#``
(or full-width ``＃``) not preceded by a letter or digit, then letters, combining marks, digits, ``_``,
and the joiners scripts need (ZWNJ/ZWJ, middle dots), with at least one letter; ``C#``, ``page#anchor``,
``&#38;`` and ``#2024`` are not hashtags; ``#sun#beach`` is two.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from tagjax.errors import UserError
from tagjax.images import ImageSkip

SOURCE_KINDS = ("jsonl", "wds", "folder", "openclipart", "yfcc")
OPENCLIPART_ROOT = "/usr/share/openclipart/svg"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")

# Problems a reader reports (the builder counts them as drop reasons).
UNSAFE_ARCHIVE_MEMBER = "unsafe_archive_member"  # absolute or ../ path, link or device in a tar
BAD_METADATA = "bad_metadata"  # a manifest line / sidecar / metadata row that cannot be parsed
NO_IMAGE_MEMBER = "no_image_in_sample"  # a webdataset sample without an image member
DUPLICATE_PATH = "duplicate_path"  # the same file reached through a symlink
UNSAFE_PATH = "unsafe_path"  # a folder entry whose real path leaves the folder
NOT_AN_IMAGE = "not_an_image"  # a video row in YFCC100M
MISSING_IMAGE = (
    "missing_image"  # raised at load time: the image file does not exist / cannot be read
)
SVG_UNRENDERABLE = "svg_unrenderable"  # cairosvg refused or failed to draw the SVG


@dataclasses.dataclass(frozen=True)
class Post:
    """One tagged image as its source describes it. Exactly one of image_path / image_bytes is set
    (or neither, when ``problem`` says why)."""

    post_id: str
    tags: tuple[str, ...] = ()  # explicit tags, as written (with or without '#')
    caption: str = ""  # free text; its #hashtags are tags too
    user: str | None = None
    public: bool | None = None  # None: the source does not say
    image_path: str | None = None
    image_bytes: bytes | None = None
    image_kind: str = "raster"  # "raster" (any format PIL/libjpeg reads) or "svg"
    source: str = ""  # the input it came from, for per-source statistics
    problem: str | None = None  # set by the reader when the post must be refused


def hashtags_of(post: Post) -> list[str]:
    """The post's hashtags: explicit tags then caption #tags, '#' stripped, NFC, first spelling kept."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in (*post.tags, *extract_hashtags(post.caption)):
        tag = unicodedata.normalize("NFC", str(raw).strip().lstrip("#＃").strip())
        if tag and tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


# ---- hashtag extraction -------------------------------------------------------------------------

_HASH_MARKS = "#＃"
_JOINERS = frozenset("\u200c\u200d\u00b7\u30fb")  # ZWNJ, ZWJ, middle dot, katakana middle dot


def _is_tag_char(ch: str) -> bool:
    if ch == "_" or ch in _JOINERS:
        return True
    return unicodedata.category(ch)[0] in "LMN"


def extract_hashtags(text: str) -> list[str]:
    """Unicode-aware ``#tag`` extraction from caption text (rules in the module docstring)."""
    if not text:
        return []
    tags = []
    n = len(text)
    i = 0
    chained = False  # directly after a hashtag: "#sun#beach" is two
    while i < n:
        ch = text[i]
        if ch in _HASH_MARKS:
            prev = text[i - 1] if i > 0 else " "
            if chained or not (_is_tag_char(prev) or prev == "&"):
                j = i + 1
                while j < n and _is_tag_char(text[j]):
                    j += 1
                tag = text[i + 1 : j]
                if any(unicodedata.category(c)[0] == "L" for c in tag):
                    tags.append(unicodedata.normalize("NFC", tag))
                    chained = j < n and text[j] in _HASH_MARKS
                    i = j
                    continue
        chained = False
        i += 1
    return tags


# ---- visibility ---------------------------------------------------------------------------------


def _visibility(meta: dict) -> bool | None:
    """``public``: bool / "true"; ``visibility``: "public" vs anything else; None if neither is given."""
    if "public" in meta:
        v = meta["public"]
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "public")
        return bool(v)
    if "visibility" in meta:
        return str(meta["visibility"]).strip().lower() == "public"
    if "private" in meta:
        return not bool(meta["private"])
    return None


def _first(meta: dict, *keys, default=None):
    for k in keys:
        if k in meta and meta[k] is not None:
            return meta[k]
    return default


def _tags_field(meta: dict) -> tuple[str, ...]:
    tags = _first(meta, "tags", "hashtags", default=())
    if isinstance(tags, str):  # "dog, beach" or "#dog #beach"
        tags = [t for t in tags.replace(",", " ").split()]
    return tuple(str(t) for t in tags)


def _post_from_meta(meta: dict, post_id: str, source: str, **kw) -> Post:
    user = _first(meta, "user", "user_id", "owner", "uploader")
    return Post(
        post_id=str(_first(meta, "id", "post_id", default=post_id)),
        tags=_tags_field(meta),
        caption=str(_first(meta, "caption", "text", "description", default="")),
        user=None if user is None else str(user),
        public=_visibility(meta),
        source=source,
        **kw,
    )


# ---- sources and units ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """The smallest piece of input one reader call handles (one tar, one manifest, one folder): the unit
    of parallelism in the Beam pipeline and of progress in the local builder."""

    kind: str
    path: str
    source: str  # the user's spec, for statistics
    images_dir: str | None = None  # yfcc: where the photos are


def parse_source(spec: str, yfcc_images: str | None = None) -> list[Unit]:
    """``KIND:PATH`` (or a bare path whose kind is evident, or ``openclipart``) -> its units."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        kind, path = _guess_kind(spec), spec
    if kind == "openclipart" and path in ("", "openclipart"):
        path = OPENCLIPART_ROOT
    p = Path(path).expanduser()
    if not p.exists():
        hint = " (install Debian's openclipart-svg package)" if kind == "openclipart" else ""
        raise UserError(f"input {spec!r}: {p} does not exist{hint}.")
    if kind == "wds":
        tars = [p] if p.is_file() else sorted(p.glob("*.tar"))
        if not tars:
            raise UserError(f"input {spec!r}: no *.tar shards in {p}.")
        return [Unit("wds", str(t), spec) for t in tars]
    if kind == "yfcc":
        if not yfcc_images:
            raise UserError(
                f"input {spec!r}: YFCC100M metadata needs --yfcc-images DIR (the photos)."
            )
        return [Unit("yfcc", str(p), spec, images_dir=str(Path(yfcc_images).expanduser()))]
    if kind in ("folder", "openclipart") and not p.is_dir():
        raise UserError(f"input {spec!r}: {p} is not a folder.")
    return [Unit(kind, str(p), spec)]


def _guess_kind(spec: str) -> str:
    if spec == "openclipart":
        return "openclipart"
    p = Path(spec).expanduser()
    if p.suffix == ".jsonl" or p.name.endswith(".jsonl.gz"):
        return "jsonl"
    if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return "wds"
    if p.is_dir():
        return "openclipart" if any(p.glob("*/*.svg")) and not any(p.glob("*.jpg")) else "folder"
    raise UserError(
        f"cannot tell what kind of input {spec!r} is; write KIND:PATH with KIND one of {SOURCE_KINDS}."
    )


def read_unit(unit: Unit) -> Iterator[Post]:
    """All posts of one unit, in a deterministic order."""
    readers = {
        "jsonl": read_jsonl,
        "wds": read_webdataset,
        "folder": read_folder,
        "openclipart": read_openclipart,
        "yfcc": lambda path, source: read_yfcc(path, unit.images_dir, source),
    }
    yield from readers[unit.kind](unit.path, source=unit.source)


def _open_text(path: str):
    if path.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8", errors="replace")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


# ---- jsonl manifest -------------------------------------------------------------------------------


def read_jsonl(path: str, source: str = "") -> Iterator[Post]:
    base = Path(path).parent
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fallback_id = f"{Path(path).name}:{lineno}"
            try:
                meta = json.loads(line)
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except ValueError:
                yield Post(post_id=fallback_id, source=source, problem=BAD_METADATA)
                continue
            image = _first(meta, "image", "image_path", "path", "file")
            image_path = None if image is None else str(base / str(image))
            yield _post_from_meta(meta, fallback_id, source, image_path=image_path)


# ---- webdataset / img2dataset tars --------------------------------------------------------------


def safe_member_name(name: str) -> bool:
    """A tar member name that stays inside wherever it would be extracted: relative, no '..', no drive."""
    if not name or name.startswith(("/", "\\")) or "\x00" in name:
        return False
    if len(name) > 1 and name[1] == ":":  # C:\...
        return False
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." not in parts


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first '.' of the basename."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def read_webdataset(path: str, source: str = "") -> Iterator[Post]:
    """Samples of one tar, read from the archive stream; unsafe members are refused, never extracted."""
    try:
        tar = tarfile.open(path, mode="r|*")  # noqa: SIM115 (closed by the `with tar` below)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path} is not a readable tar archive ({e}).") from None
    current: str | None = None
    files: dict[str, bytes] = {}
    unsafe = False

    def emit(key: str) -> Post:
        if unsafe:
            return Post(post_id=key, source=source, problem=UNSAFE_ARCHIVE_MEMBER)
        meta: dict = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except ValueError:
                return Post(post_id=key, source=source, problem=BAD_METADATA)
        if "txt" in files and "caption" not in meta:
            meta["caption"] = files["txt"].decode("utf-8", errors="replace")
        # img2dataset crawls the public web; a shard that records visibility says so itself.
        if _visibility(meta) is None:
            meta["public"] = True
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        post_id = str(_first(meta, "id", "post_id", "key", default=key))
        if image_ext is None:
            return Post(post_id=post_id, source=source, problem=NO_IMAGE_MEMBER)
        return _post_from_meta(meta, key, source, image_bytes=files[image_ext])

    try:
        with tar:
            for member in tar:
                name = member.name
                key, ext = _split_key(name.replace("\\", "/"))
                if key != current:
                    if current is not None:
                        yield emit(current)
                    current, files, unsafe = key, {}, False
                if not safe_member_name(name) or not (member.isfile() or member.isdir()):
                    unsafe = True  # the whole sample is refused: one bad member taints its siblings
                    continue
                if member.isdir():
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    files[ext] = handle.read()
            if current is not None:
                yield emit(current)
    except tarfile.TarError as e:
        raise UserError(
            f"{path} is a damaged tar archive ({e}); re-download or remove it."
        ) from None


# ---- folder with sidecars -------------------------------------------------------------------------


def read_folder(path: str, source: str = "") -> Iterator[Post]:
    root = Path(path).resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = p.relative_to(root).with_suffix("").as_posix()
            real = p.resolve()
            if real != p and not real.is_relative_to(root):
                yield Post(post_id=rel, source=source, problem=UNSAFE_PATH)
                continue
            meta: dict = {}
            sidecar_json = p.with_suffix(".json")
            if sidecar_json.is_file():
                try:
                    meta = json.loads(sidecar_json.read_text(encoding="utf-8"))
                    if not isinstance(meta, dict):
                        raise ValueError("not an object")
                except ValueError:
                    yield Post(post_id=rel, source=source, problem=BAD_METADATA)
                    continue
            sidecar_txt = p.with_suffix(".txt")
            if sidecar_txt.is_file() and "caption" not in meta:
                meta["caption"] = sidecar_txt.read_text(encoding="utf-8", errors="replace")
            yield _post_from_meta(meta, rel, source, image_path=str(p))


# ---- openclipart ----------------------------------------------------------------------------------

_DC = "{http://purl.org/dc/elements/1.1/}"
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_CC = "{http://web.resource.org/cc/}"


def openclipart_metadata(path: str) -> tuple[list[str], str | None]:
    """(dc:subject keywords, creator) of one SVG, parsing only up to the end of its <metadata>."""
    subjects: list[str] = []
    creator = publisher = None
    try:
        for _, el in ET.iterparse(path, events=("end",)):
            tag = el.tag
            if tag == _DC + "subject":
                subjects = [
                    li.text.strip() for li in el.iter(_RDF + "li") if li.text and li.text.strip()
                ]
                if not subjects and el.text and el.text.strip():
                    subjects = [s.strip() for s in el.text.split(",") if s.strip()]
            elif tag in (_DC + "creator", _DC + "publisher"):
                title = el.find(f".//{_DC}title")
                name = title.text.strip() if title is not None and title.text else None
                if tag == _DC + "creator":
                    creator = name
                else:
                    publisher = name
            elif tag.endswith("}metadata"):
                break
    except ET.ParseError:
        pass  # keywords are optional; a file cairosvg cannot draw is counted when it is rasterized
    return subjects, creator or publisher


_OPENCLIPART_ARTIFACTS = frozenset({"hash"})


def _stable_order_key(rel: str) -> bytes:
    return hashlib.blake2b(rel.encode(), digest_size=8).digest()


def read_openclipart(path: str, source: str = "") -> Iterator[Post]:
    """Every distinct SVG once, in a fixed pseudo-random order so that ``--limit N`` takes a sample of
    the whole corpus rather than its first folders (animals, buildings, ...)."""
    root = Path(path).resolve()
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".svg"):
                p = Path(dirpath) / name
                entries.append((p.relative_to(root).with_suffix("").as_posix(), p))
    entries.sort(key=lambda e: (_stable_order_key(e[0]), e[0]))
    seen: set[Path] = set()
    # A symlink and its target are one clipart: the target's own entry (or the first alias) is read.
    canonical = {}
    for rel, p in sorted(entries, key=lambda e: (e[1].is_symlink(), e[0])):
        canonical.setdefault(p.resolve(), rel)
    for rel, p in entries:
        real = p.resolve()
        if canonical.get(real) != rel or real in seen:
            yield Post(post_id=rel, source=source, problem=DUPLICATE_PATH)
            continue
        if not real.is_relative_to(root):
            yield Post(post_id=rel, source=source, problem=UNSAFE_PATH)
            continue
        seen.add(real)
        subjects, creator = openclipart_metadata(str(real))
        yield Post(
            post_id=rel,
            tags=tuple(s for s in subjects if s.lower() not in _OPENCLIPART_ARTIFACTS),
            user=creator or "unknown",
            public=True,  # public-domain cliparts
            image_path=str(real),
            image_kind="svg",
            source=source,
        )


# ---- YFCC100M -------------------------------------------------------------------------------------


def read_yfcc(path: str, images_dir: str | None, source: str = "") -> Iterator[Post]:
    """YFCC100M metadata rows (23 fields, or 25 with line number and photo hash first)."""
    images = Path(images_dir) if images_dir else None
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 25:
                photo_hash, fields = fields[2], [fields[1], *fields[3:]]
            elif len(fields) == 23:
                photo_hash = None
            else:
                yield Post(
                    post_id=f"{Path(path).name}:{lineno}", source=source, problem=BAD_METADATA
                )
                continue
            photo_id, user = fields[0], fields[1]
            title, description, user_tags = fields[6], fields[7], fields[8]
            if fields[22].strip() == "1":
                yield Post(post_id=photo_id, source=source, problem=NOT_AN_IMAGE)
                continue
            tags = tuple(urllib.parse.unquote_plus(t) for t in user_tags.split(",") if t)
            caption = " ".join(urllib.parse.unquote_plus(x) for x in (title, description) if x)
            image_path = None
            if images is not None:
                candidates = []
                if photo_hash:
                    candidates.append(
                        images / photo_hash[:3] / photo_hash[3:6] / f"{photo_hash}.jpg"
                    )
                candidates.append(images / f"{photo_id}.jpg")
                image_path = str(next((c for c in candidates if c.is_file()), candidates[-1]))
            yield Post(
                post_id=photo_id,
                tags=tags,
                caption=caption,
                user=user,
                public=True,
                image_path=image_path,
                source=source,
            )


# ---- image loading (in worker processes) ----------------------------------------------------------


class RasterCache:
    """Rasterized SVGs on disk, keyed by the SVG's content and the raster size, so a re-run (or a
    second build at the same size) skips cairosvg entirely. Writes are atomic (temp file + rename), so
    concurrent workers and crashed runs never leave a half-written PNG under a final name."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = Path(directory).expanduser() if directory else None

    def path_for(self, svg: bytes, side: int) -> Path | None:
        if self.directory is None:
            return None
        import cairosvg

        key = hashlib.blake2b(svg, digest_size=16, person=b"tagjax-svg").hexdigest()
        return self.directory / key[:2] / f"{key}-s{side}-c{cairosvg.__version__}.png"

    def get(self, svg: bytes, side: int) -> bytes | None:
        p = self.path_for(svg, side)
        if p is not None and p.is_file():
            return p.read_bytes()
        return None

    def put(self, svg: bytes, side: int, png: bytes) -> None:
        p = self.path_for(svg, side)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        tmp.write_bytes(png)
        os.replace(tmp, p)


def default_raster_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tagjax" / "raster"


def rasterize_svg(svg: bytes, side: int) -> bytes:
    """SVG -> PNG on white with the shorter side ``side`` px (cairosvg in safe mode: no external files,
    no XML entities)."""
    from cairosvg.helpers import node_format
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface

    try:
        tree = Tree(bytestring=svg, unsafe=False)
        width, height, _ = node_format(None, tree)

        def render(**size) -> tuple[bytes, int, int]:
            out = io.BytesIO()
            surface = PNGSurface(tree, out, 96, background_color="white", **size)
            surface.finish()
            return out.getvalue(), surface.width, surface.height

        portrait = not (width and height) or width <= height
        png, w, h = render(**({"output_width": side} if portrait else {"output_height": side}))
        if min(w, h) < side and portrait and w > h:  # intrinsic size unknown and it came out wide
            png, w, h = render(output_height=side)
        return png
    except ImageSkip:
        raise
    except Exception as e:  # cairosvg raises anything from ParseError to ZeroDivisionError
        raise ImageSkip(SVG_UNRENDERABLE, f"{type(e).__name__}: {e}") from None


def load_image_bytes(post: Post, side: int, cache: RasterCache | None = None) -> bytes:
    """The post's image as encoded raster bytes; SVGs are rasterized (shorter side ``side``) via cache.

    Raises :class:`tagjax.images.ImageSkip` (missing_image, svg_unrenderable).
    """

    if post.image_bytes is not None:
        return post.image_bytes
    if post.image_path is None:
        raise ImageSkip(MISSING_IMAGE, "no image given")
    try:
        data = Path(post.image_path).read_bytes()
    except OSError as e:
        raise ImageSkip(MISSING_IMAGE, f"{post.image_path}: {e.strerror}") from None
    if post.image_kind != "svg":
        return data
    cached = cache.get(data, side) if cache else None
    if cached is not None:
        return cached
    png = rasterize_svg(data, side)
    if cache:
        cache.put(data, side, png)
    return png


def read_id_list(path: str | os.PathLike, what: str = "id list") -> list[str]:
    """The ids of an id-list file, in file order: one id per line; blank lines and lines starting with
    ``#`` are ignored. Opt-out lists (tagjax build --optout-posts/--optout-users) and exclude lists
    (tagjax.decontaminate.write_exclude_list) are such files; ``what`` names the file in the error."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist.")
    with p.open(encoding="utf-8") as f:
        return [s for line in f if (s := line.strip()) and not s.startswith("#")]

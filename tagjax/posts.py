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

Inputs are hostile until checked (see docs/dataset.md, "Untrusted input"). An image path a manifest,
sidecar or metadata row names must resolve inside an allowed root (:class:`ImageRoots`: the input's own
folder plus any ``--image-root``): a relative path whose ``..`` leaves the roots, an absolute path outside
them, a symlink whose target leaves them, and anything that is not a regular file (a device such as
``/dev/zero``, a FIFO, a socket) are refused by ``stat`` before anything is opened, each under its own
reason. Every file and archive member is read with a size cap (``max_bytes``), checked against the size
the file system or the tar header states before reading and enforced again by a bounded read, and files
are opened non-blocking, so a path swapped for a FIFO after the check cannot hang a worker. Tars are
read as streams (compressed ones too), never whole into memory.

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
import gc
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from tagjax.errors import UserError
from tagjax.images import DEFAULT_MAX_FILE_BYTES, ImageSkip

SOURCE_KINDS = ("jsonl", "wds", "folder", "openclipart", "yfcc")
OPENCLIPART_ROOT = "/usr/share/openclipart/svg"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")

# Problems a reader reports (the builder counts them as drop reasons).
UNSAFE_ARCHIVE_MEMBER = "unsafe_archive_member"  # absolute or ../ path, link or device in a tar
BAD_METADATA = "bad_metadata"  # a manifest line / sidecar / metadata row that cannot be parsed
NO_IMAGE_MEMBER = "no_image_in_sample"  # a webdataset sample without an image member
DUPLICATE_PATH = "duplicate_path"  # the same file reached through a symlink
NO_IMAGE = "no_image"  # a manifest line that names no image at all
PATH_ESCAPES_ROOT = "path_escapes_root"  # a relative image path whose '..' leaves the allowed roots
ABSOLUTE_PATH_OUTSIDE_ROOTS = "absolute_path_outside_roots"  # an absolute path outside the roots
SYMLINK_ESCAPES_ROOT = "symlink_escapes_root"  # the path is inside, the symlink's target is not
NOT_A_REGULAR_FILE = (
    "not_a_regular_file"  # a device, FIFO, socket or folder where an image should be
)
FILE_TOO_LARGE = "file_too_large"  # an image file or tar member above the size cap
METADATA_TOO_LARGE = (
    "metadata_too_large"  # a manifest line, sidecar or metadata member above the cap
)
NOT_AN_IMAGE = "not_an_image"  # a video row in YFCC100M
MISSING_IMAGE = (
    "missing_image"  # raised at load time: the image file does not exist / cannot be read
)
SVG_UNRENDERABLE = "svg_unrenderable"  # cairosvg refused or failed to draw the SVG
# Reasons for refusing to open a path or read a file, checked before any byte of it is read.
UNSAFE_FILE_REASONS = (
    PATH_ESCAPES_ROOT,
    ABSOLUTE_PATH_OUTSIDE_ROOTS,
    SYMLINK_ESCAPES_ROOT,
    NOT_A_REGULAR_FILE,
    FILE_TOO_LARGE,
)
DEFAULT_MAX_BYTES = DEFAULT_MAX_FILE_BYTES  # size cap of one file / archive member / manifest line


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
    """Whether the post is public: True only for a value that says so (``public``: true, 1, or the
    strings "true"/"yes"/"1"/"public" in any case; ``visibility``: "public"; ``private``: false or
    0); any other value (NaN, a list, an object, 2, null) is False, so an odd value never admits a
    post, not even with ``--assume-public``. None if none of the three keys is given."""
    if "public" in meta:
        v = meta["public"]
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "public")
        return v is True or (_is_number(v) and v == 1)
    if "visibility" in meta:
        v = meta["visibility"]
        return isinstance(v, str) and v.strip().lower() == "public"
    if "private" in meta:
        v = meta["private"]
        return v is False or (_is_number(v) and v == 0)
    return None


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _first(meta: dict, *keys, default=None):
    for k in keys:
        if k in meta and meta[k] is not None:
            return meta[k]
    return default


_SCALARS = (str, int, float)


def _tags_field(meta: dict) -> tuple[str, ...]:
    tags = _first(meta, "tags", "hashtags", default=())
    if isinstance(tags, str):  # "dog, beach" or "#dog #beach"
        tags = [t for t in tags.replace(",", " ").split()]
    if not isinstance(tags, list | tuple) or not all(isinstance(t, _SCALARS) for t in tags):
        raise ValueError("tags must be a string or a list of strings")
    return tuple(str(t) for t in tags)


def _scalar(value, what: str) -> str | None:
    if value is None or (isinstance(value, _SCALARS) and not isinstance(value, bool)):
        return None if value is None else str(value)
    raise ValueError(f"{what} must be a string or a number")


def _post_from_meta(meta: dict, post_id: str, source: str, **kw) -> Post:
    """A Post from a metadata object (a manifest line, a sidecar, a tar's json member); a field of the
    wrong JSON type (a tags number, an id object) makes it a ``bad_metadata`` post."""
    try:
        return Post(
            post_id=_scalar(_first(meta, "id", "post_id", default=post_id), "id") or post_id,
            tags=_tags_field(meta),
            caption=_scalar(_first(meta, "caption", "text", "description", default=""), "caption")
            or "",
            user=_scalar(_first(meta, "user", "user_id", "owner", "uploader"), "user"),
            public=_visibility(meta),
            source=source,
            **kw,
        )
    except ValueError:
        return Post(post_id=post_id, source=source, problem=BAD_METADATA)


# ---- paths and files from untrusted inputs ----------------------------------------------------------


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r if r.endswith(os.sep) else r + os.sep) for r in roots)


@dataclasses.dataclass(frozen=True)
class ImageRoots:
    """The folders an input's image paths may resolve into, each both as written (``lexical``, for
    ``..`` and absolute paths) and with its symlinks resolved (``real``, for symlinked files)."""

    lexical: tuple[str, ...]
    real: tuple[str, ...]

    @classmethod
    def of(cls, roots: Sequence[str | os.PathLike]) -> ImageRoots:
        lexical = tuple(os.path.normpath(os.path.abspath(os.fspath(r))) for r in roots)
        return cls(lexical, tuple(os.path.realpath(r) for r in lexical))

    def check(
        self, raw: str, base: str | os.PathLike, max_bytes: int
    ) -> tuple[str | None, str | None]:
        """An image path as an input wrote it -> (its real path, None), or (None, the reason it is
        refused). Decided by path arithmetic and ``stat`` alone: nothing is opened. A path that does not
        exist is returned as is (loading it is counted as ``missing_image``)."""
        absolute = os.path.isabs(raw)
        candidate = os.path.normpath(raw if absolute else os.path.join(os.fspath(base), raw))
        if not _inside(candidate, self.lexical):
            return None, ABSOLUTE_PATH_OUTSIDE_ROOTS if absolute else PATH_ESCAPES_ROOT
        try:
            real = os.path.realpath(candidate)
            if not _inside(real, self.real):
                return None, SYMLINK_ESCAPES_ROOT
            st = os.stat(real)  # `real` has no symlink left: this is lstat of the file itself
        except FileNotFoundError:
            return candidate, None
        except (OSError, ValueError):  # NUL bytes, too long, loops, no permission
            return None, BAD_METADATA
        if not stat.S_ISREG(st.st_mode):
            return None, NOT_A_REGULAR_FILE
        if st.st_size > max_bytes:
            return None, FILE_TOO_LARGE
        return real, None


def read_regular_file(path: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, else :class:`ImageSkip` with the reason.

    Opened non-blocking (a FIFO swapped in after the reader's check cannot block), checked with fstat on
    the open descriptor (what is read is what was checked), and read with a bound, so a file growing
    while it is read cannot exceed the cap either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as e:
        raise ImageSkip(MISSING_IMAGE, f"{path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageSkip(NOT_A_REGULAR_FILE, path)
        if st.st_size > max_bytes:
            raise ImageSkip(FILE_TOO_LARGE, f"{path}: {st.st_size} bytes > {max_bytes}")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(max_bytes + 1 - total, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise ImageSkip(FILE_TOO_LARGE, f"{path}: grew past {max_bytes} bytes while read")
        return b"".join(chunks)
    except OSError as e:
        raise ImageSkip(MISSING_IMAGE, f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _read_sidecar(path: Path, max_bytes: int) -> bytes:
    """A small file next to an image; ValueError (counted as bad/oversized metadata) otherwise."""
    try:
        return read_regular_file(str(path), max_bytes)
    except ImageSkip as e:
        raise ValueError(
            METADATA_TOO_LARGE if e.reason == FILE_TOO_LARGE else BAD_METADATA
        ) from None


def _bounded_lines(f, max_chars: int) -> Iterator[str | None]:
    """The lines of a text stream; a line longer than ``max_chars`` is skipped without ever being held
    whole in memory and yields None in its place (so line numbers stay right)."""
    while True:
        line = f.readline(max_chars + 1)
        if not line:
            return
        if len(line) > max_chars and not line.endswith("\n"):
            while line and not line.endswith("\n"):
                line = f.readline(1 << 20)
            yield None
            continue
        yield line


# ---- sources and units ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """The smallest piece of input one reader call handles (one tar, one manifest, one folder): the unit
    of parallelism in the Beam pipeline and of progress in the local builder."""

    kind: str
    path: str
    source: str  # the user's spec, for statistics
    images_dir: str | None = None  # yfcc: where the photos are
    image_roots: tuple[str, ...] = ()  # folders image paths may point into besides the input's own
    max_bytes: int = DEFAULT_MAX_BYTES  # size cap of one file, archive member or manifest line


_FILE_KINDS = {"jsonl": "a JSONL manifest file", "yfcc": "a YFCC100M metadata file"}


def _require_regular_file(spec: str, p: Path, what: str) -> None:
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise UserError(f"input {spec!r}: cannot read {p} ({e.strerror}).") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"input {spec!r}: {p} is a folder, but this input kind needs {what}.")
    if not stat.S_ISREG(mode):
        raise UserError(f"input {spec!r}: {p} is not a regular file (a device, FIFO or socket).")


def parse_source(
    spec: str,
    yfcc_images: str | None = None,
    image_roots: Sequence[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Unit]:
    """``KIND:PATH`` (or a bare path whose kind is evident, or ``openclipart``) -> its units.

    A wrong kind of path (a folder for ``jsonl:``, a FIFO, no tars in a ``wds:`` folder) is a one-line
    :class:`UserError` here, before any output exists."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in SOURCE_KINDS:
        kind, path = _guess_kind(spec), spec
    if kind == "openclipart" and path in ("", "openclipart"):
        path = OPENCLIPART_ROOT
    p = Path(path).expanduser()
    if not p.exists():
        hint = " (install Debian's openclipart-svg package)" if kind == "openclipart" else ""
        raise UserError(f"input {spec!r}: {p} does not exist{hint}.")
    roots = tuple(str(Path(r).expanduser()) for r in image_roots)
    for r in roots:
        if not Path(r).is_dir():
            raise UserError(f"--image-root {r} is not a folder.")
    common = {"image_roots": roots, "max_bytes": max_bytes}
    if kind == "wds":
        tars = [p] if not p.is_dir() else _wds_shards(p)
        if not tars:
            raise UserError(f"input {spec!r}: no *.tar (or *.tar.gz) shards in {p}.")
        for t in tars:
            _require_regular_file(spec, t, "a tar file or a folder of *.tar shards")
        return [Unit("wds", str(t), spec, **common) for t in tars]
    if kind in _FILE_KINDS:
        _require_regular_file(spec, p, _FILE_KINDS[kind])
    if kind == "yfcc":
        if not yfcc_images:
            raise UserError(
                f"input {spec!r}: YFCC100M metadata needs --yfcc-images DIR (the photos)."
            )
        images_dir = Path(yfcc_images).expanduser()
        if not images_dir.is_dir():
            raise UserError(f"--yfcc-images {images_dir} is not a folder.")
        return [Unit("yfcc", str(p), spec, images_dir=str(images_dir), **common)]
    if kind in ("folder", "openclipart") and not p.is_dir():
        raise UserError(f"input {spec!r}: {p} is not a folder.")
    return [Unit(kind, str(p), spec, **common)]


def _wds_shards(folder: Path) -> list[Path]:
    """A webdataset folder's shards: ``*.tar`` and gzipped ``*.tar.gz`` (img2dataset writes either)."""
    return sorted([*folder.glob("*.tar"), *folder.glob("*.tar.gz")])


def _guess_kind(spec: str) -> str:
    if spec == "openclipart":
        return "openclipart"
    p = Path(spec).expanduser()
    if p.suffix == ".jsonl" or p.name.endswith(".jsonl.gz"):
        return "jsonl"
    if p.suffix == ".tar" or p.name.endswith(".tar.gz") or (p.is_dir() and _wds_shards(p)):
        return "wds"
    if p.is_dir():
        return "openclipart" if any(p.glob("*/*.svg")) and not any(p.glob("*.jpg")) else "folder"
    raise UserError(
        f"cannot tell what kind of input {spec!r} is; write KIND:PATH with KIND one of {SOURCE_KINDS}."
    )


def read_unit(unit: Unit) -> Iterator[Post]:
    """All posts of one unit, in a deterministic order."""
    kw = {"source": unit.source, "max_bytes": unit.max_bytes}
    if unit.kind == "wds":
        yield from read_webdataset(unit.path, **kw)
    elif unit.kind == "jsonl":
        yield from read_jsonl(unit.path, roots=unit.image_roots, **kw)
    elif unit.kind == "folder":
        yield from read_folder(unit.path, roots=unit.image_roots, **kw)
    elif unit.kind == "openclipart":
        yield from read_openclipart(unit.path, roots=unit.image_roots, **kw)
    else:
        yield from read_yfcc(unit.path, unit.images_dir, roots=unit.image_roots, **kw)


def _open_text(path: str):
    """A manifest or metadata file as lines of text. A leading byte-order mark is dropped. Bytes that
    are not UTF-8 are kept, escaped as lone surrogates (``surrogateescape``), so that
    :func:`_not_utf8` can refuse their line: decoding them as U+FFFD would make two ids that differ
    only there one id (one post dropped as a duplicate under an id nobody wrote)."""
    if path.endswith(".bz2"):
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8-sig", errors="surrogateescape")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8-sig", errors="surrogateescape")
    return open(path, encoding="utf-8-sig", errors="surrogateescape")


def _not_utf8(line: str) -> bool:
    """Whether a line from :func:`_open_text` held bytes that are not UTF-8. Such a line is
    ``bad_metadata`` rather than decoded losslessly: its id would carry lone surrogates into records,
    vocabularies and reports that must be UTF-8, and it could still never match an opt-out list
    (which must be UTF-8)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ---- jsonl manifest -------------------------------------------------------------------------------


def read_jsonl(
    path: str, source: str = "", roots: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[Post]:
    """Posts of a JSONL manifest. Image paths must resolve inside the manifest's folder or ``roots``;
    a line longer than ``max_bytes`` characters is skipped unread (``metadata_too_large``), a line
    naming no image is ``no_image``, a line that is not UTF-8 is ``bad_metadata`` (:func:`_not_utf8`)."""
    base = os.path.dirname(os.path.abspath(path))
    allowed = ImageRoots.of((base, *roots))
    with _open_text(path) as f:
        for lineno, line in enumerate(_bounded_lines(f, max_bytes), 1):
            fallback_id = f"{Path(path).name}:{lineno}"
            if line is None:
                yield Post(post_id=fallback_id, source=source, problem=METADATA_TOO_LARGE)
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if _not_utf8(line):
                    raise ValueError("not UTF-8")
                meta = json.loads(line)
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
                yield Post(post_id=fallback_id, source=source, problem=BAD_METADATA)
                continue
            image = _first(meta, "image", "image_path", "path", "file")
            if image is None or not isinstance(image, str) or not image:
                post = _post_from_meta(meta, fallback_id, source)
                yield dataclasses.replace(post, problem=BAD_METADATA if image else NO_IMAGE)
                continue
            image_path, problem = allowed.check(image, base, max_bytes)
            yield _post_from_meta(meta, fallback_id, source, image_path=image_path, problem=problem)


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


def read_webdataset(
    path: str, source: str = "", max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[Post]:
    """Samples of one tar, read from the archive stream (mode ``r|*``: plain or compressed, one pass,
    bounded memory); unsafe members are refused, never extracted. A member whose header states more
    than ``max_bytes`` is skipped unread (the stream moves past it in small blocks) and refuses its
    sample as ``file_too_large``; others are read with that bound."""
    try:
        tar = tarfile.open(path, mode="r|*")  # noqa: SIM115 (closed by the `with tar` below)
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"{path} is not a readable tar archive ({e}).") from None
    current: str | None = None
    files: dict[str, bytes] = {}
    unsafe = False
    too_large: str | None = None  # the reason, when a member of the sample exceeded the cap

    def emit(key: str) -> Post:
        if unsafe:
            return Post(post_id=key, source=source, problem=UNSAFE_ARCHIVE_MEMBER)
        if too_large:
            return Post(post_id=key, source=source, problem=too_large)
        meta: dict = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8-sig"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (ValueError, RecursionError):
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
            # tar.next() rather than iterating: a stream-mode TarFile would keep every header it read
            # (tar.members), so memory would grow with the member count of a hostile archive.
            while (member := tar.next()) is not None:
                tar.members = []
                name = member.name
                key, ext = _split_key(name.replace("\\", "/"))
                if key != current:
                    if current is not None:
                        yield emit(current)
                    current, files, unsafe, too_large = key, {}, False, None
                if not safe_member_name(name) or not (member.isfile() or member.isdir()):
                    unsafe = True  # the whole sample is refused: one bad member taints its siblings
                    continue
                if member.isdir():
                    continue
                if member.size > max_bytes:
                    is_image = ext in ("jpg", "jpeg", "png", "webp")
                    too_large = FILE_TOO_LARGE if is_image else METADATA_TOO_LARGE
                    continue
                handle = tar.extractfile(member)
                if handle is not None:
                    data = handle.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        too_large = FILE_TOO_LARGE
                        continue
                    files[ext] = data
            if current is not None:
                yield emit(current)
    except tarfile.TarError as e:
        raise UserError(
            f"{path} is a damaged tar archive ({e}); re-download or remove it."
        ) from None


# ---- folder with sidecars -------------------------------------------------------------------------


def read_folder(
    path: str, source: str = "", roots: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[Post]:
    """Images of a folder tree with their sidecars; an image (or sidecar) symlinked out of the folder
    and ``roots`` is refused, as are FIFOs and devices named like images."""
    root = Path(path).resolve()
    allowed = ImageRoots.of((root, *roots))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = p.relative_to(root).with_suffix("").as_posix()
            image_path, problem = allowed.check(str(p), root, max_bytes)
            if problem:
                yield Post(post_id=rel, source=source, problem=problem)
                continue
            meta: dict = {}
            sidecar_json = p.with_suffix(".json")
            try:
                if os.path.lexists(sidecar_json):
                    raw = _read_confined(allowed, sidecar_json, root, max_bytes)
                    meta = json.loads(raw.decode("utf-8-sig"))  # not UTF-8: bad_metadata
                    if not isinstance(meta, dict):
                        raise ValueError(BAD_METADATA)
                sidecar_txt = p.with_suffix(".txt")
                if os.path.lexists(sidecar_txt) and "caption" not in meta:
                    raw = _read_confined(allowed, sidecar_txt, root, max_bytes)
                    meta["caption"] = raw.decode("utf-8", errors="replace")
            except (ValueError, RecursionError) as e:
                reason = str(e) if str(e) in _SIDECAR_REASONS else BAD_METADATA
                yield Post(post_id=rel, source=source, problem=reason)
                continue
            yield _post_from_meta(meta, rel, source, image_path=image_path)


def _read_confined(allowed: ImageRoots, path: Path, base: Path, max_bytes: int) -> bytes:
    """A sidecar's bytes, under the same path rules as images (ValueError: why it is refused)."""
    real, problem = allowed.check(str(path), base, max_bytes)
    if problem:
        raise ValueError(METADATA_TOO_LARGE if problem == FILE_TOO_LARGE else problem)
    return _read_sidecar(Path(real), max_bytes)


_SIDECAR_REASONS = frozenset({METADATA_TOO_LARGE, BAD_METADATA, *UNSAFE_FILE_REASONS})


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


def read_openclipart(
    path: str, source: str = "", roots: Sequence[str] = (), max_bytes: int = DEFAULT_MAX_BYTES
) -> Iterator[Post]:
    """Every distinct SVG once, in a fixed pseudo-random order so that ``--limit N`` takes a sample of
    the whole corpus rather than its first folders (animals, buildings, ...)."""
    root = Path(path).resolve()
    allowed = ImageRoots.of((root, *roots))
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
        image_path, problem = allowed.check(str(p), root, max_bytes)
        if problem:
            yield Post(post_id=rel, source=source, problem=problem)
            continue
        seen.add(real)
        subjects, creator = openclipart_metadata(str(real))
        yield Post(
            post_id=rel,
            tags=tuple(s for s in subjects if s.lower() not in _OPENCLIPART_ARTIFACTS),
            user=creator or "unknown",
            public=True,  # public-domain cliparts
            image_path=image_path,
            image_kind="svg",
            source=source,
        )


# ---- YFCC100M -------------------------------------------------------------------------------------


def read_yfcc(
    path: str,
    images_dir: str | None,
    source: str = "",
    roots: Sequence[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Iterator[Post]:
    """YFCC100M metadata rows (23 fields, or 25 with line number and photo hash first). Photos must
    resolve inside ``images_dir`` (or ``roots``): a hash or id with ``..`` or ``/`` in it is refused.
    A row that is not UTF-8 is ``bad_metadata``, as in a jsonl manifest."""
    images = Path(images_dir) if images_dir else None
    allowed = ImageRoots.of((images, *roots)) if images is not None else None
    with _open_text(path) as f:
        for lineno, line in enumerate(_bounded_lines(f, max_bytes), 1):
            if line is None:
                yield Post(
                    post_id=f"{Path(path).name}:{lineno}", source=source, problem=METADATA_TOO_LARGE
                )
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 25:
                photo_hash, fields = fields[2], [fields[1], *fields[3:]]
            else:
                photo_hash = None
            if len(fields) != 23 or _not_utf8(line):
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
            image_path = problem = None
            if images is not None and allowed is not None:
                candidates = []  # relative to the images folder, as the row spells them
                if photo_hash:
                    candidates.append(f"{photo_hash[:3]}/{photo_hash[3:6]}/{photo_hash}.jpg")
                candidates.append(f"{photo_id}.jpg")
                checked = [allowed.check(c, images, max_bytes) for c in candidates]
                problem = next((reason for _, reason in checked if reason), None)
                if problem is None:  # the first that exists (else the last: missing_image later)
                    found = (p for p, _ in checked if p is not None and os.path.isfile(p))
                    image_path = next(found, checked[-1][0])
            yield Post(
                post_id=photo_id,
                tags=tags,
                caption=caption,
                user=user,
                public=True,
                image_path=image_path,
                source=source,
                problem=problem,
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
        key = hashlib.blake2b(svg, digest_size=16, person=b"tagjax-svg").hexdigest()
        return self.directory / key[:2] / f"{key}-s{side}-{renderer_version()}.png"

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


# Bumped whenever rasterize_svg draws differently, so raster caches never serve older pixels.
# 2: text drawn from cairo's initial font state (see rasterize_svg).
RASTER_VERSION = 2


def renderer_version() -> str:
    """What an SVG's pixels depend on besides its bytes and size: rasterize_svg's own version, cairosvg's
    and the system cairo library's (part of every raster cache key)."""
    import cairocffi
    import cairosvg

    return f"r{RASTER_VERSION}-c{cairosvg.__version__}-cairo{cairocffi.cairo_version_string()}"


def rasterize_svg(svg: bytes, side: int) -> bytes:
    """SVG -> PNG on white with the shorter side ``side`` px (cairosvg in safe mode: no external files,
    no XML entities).

    The pixels depend on the SVG alone, never on what the process drew before: cairo keeps fonts it has
    used in process-wide caches, and a text drawn after another SVG's text can come out differently
    (hinting and metrics of the cached font), so the corpus would change with the thread count and the
    order in which workers meet the files. Before an SVG with text, cairo's static state is reset to
    its state at startup (after a collection, so no cairo object from an earlier drawing is alive).
    """
    import cairocffi
    from cairosvg.helpers import node_format
    from cairosvg.parser import Tree
    from cairosvg.surface import PNGSurface

    if b"<text" in svg or b":text" in svg:
        gc.collect()
        cairocffi.cairo.cairo_debug_reset_static_data()
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


def load_image_bytes(
    post: Post, side: int, cache: RasterCache | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """The post's image as encoded raster bytes; SVGs are rasterized (shorter side ``side``) via cache.
    Files are read by :func:`read_regular_file` (non-blocking, regular files only, ``max_bytes`` cap).

    Raises :class:`tagjax.images.ImageSkip` (missing_image, not_a_regular_file, file_too_large,
    svg_unrenderable).
    """

    if post.image_bytes is not None:
        return post.image_bytes
    if post.image_path is None:
        raise ImageSkip(MISSING_IMAGE, "no image given")
    data = read_regular_file(post.image_path, max_bytes)
    # An .svg from any source is drawn like openclipart's (predict and embed read them too).
    if post.image_kind != "svg" and not post.image_path.lower().endswith(".svg"):
        return data
    cached = cache.get(data, side) if cache else None
    if cached is not None:
        return cached
    png = rasterize_svg(data, side)
    if cache:
        cache.put(data, side, png)
    return png


def read_id_list(path: str | os.PathLike, what: str = "id list") -> list[str]:
    """The ids of an id-list file, in file order. Opt-out lists (tagjax build --optout-posts /
    --optout-users) and exclude lists (tagjax.decontaminate.write_exclude_list) are such files;
    ``what`` names the file in errors.

    The format (docs/dataset.md, "Privacy"): UTF-8 text, a leading byte-order mark ignored (other
    encodings are refused: a mis-decoded id would silently stay in the dataset), one id per line,
    spaces around a line ignored. Blank lines are skipped, and so are comments: a line that is ``#``
    alone or ``#`` then a space, so ``#tag`` is an id. A line that starts with ``"`` is one JSON
    string: the way to write an id with spaces at either end, a line break, a leading ``"`` or a
    comment's look (:func:`id_list_line` writes any id so)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} {p} does not exist.")
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{what} {p} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}: "
            f"{e.reason}); save it as UTF-8."
        ) from None
    ids = []
    for lineno, raw in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        line = raw.strip()
        if not line or _is_id_list_comment(line):
            continue
        if line.startswith('"'):
            try:
                line = json.loads(line)
                if not isinstance(line, str):
                    raise ValueError("not a string")
            except ValueError:
                raise UserError(
                    f"{what} {p}, line {lineno}: a line that starts with '\"' must be one JSON "
                    f'string, such as "# id" (got {raw.strip()[:80]!r}).'
                ) from None
        ids.append(line)
    return ids


def id_list_line(item_id: str) -> str:
    """One line of an id list that :func:`read_id_list` reads back as exactly ``item_id``: the id as
    it is where that is unambiguous, else as an (ASCII) JSON string."""
    plain = (
        item_id.isprintable()  # no line breaks, control characters or lone surrogates
        and item_id == item_id.strip()
        and not item_id.startswith('"')
        and not _is_id_list_comment(item_id)
    )
    return f"{item_id if plain and item_id else json.dumps(item_id)}\n"


def _is_id_list_comment(line: str) -> bool:
    return line.startswith("#") and (len(line) == 1 or line[1].isspace())

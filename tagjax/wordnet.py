"""WordNet 3.0 for nltk, without the internet.

tagjax labels are sets of WordNet 3.0 noun synsets, so every stage needs a WordNet reader. nltk normally
gets WordNet with ``nltk.download('wordnet')``, which needs the internet. Debian's ``wordnet-base`` package
ships the same WordNet 3.0 database in ``/usr/share/wordnet``, but nltk 3.10 cannot read it as it is:

* the ``lexnames`` file (the 45 lexicographer file names) is missing;
* nltk's path sandbox refuses corpus roots outside ``nltk.data.path`` and symlinks that leave the root,
  so the files are *copied* into a cache directory that is added to ``nltk.data.path``;
* the reader maps "version 3.0" onto itself by loading ``corpora/wordnet`` at construction; for a reader
  that *is* WordNet 3.0 that mapping is the identity, so :class:`_Wordnet30Reader` skips it.

:func:`load` returns one reader per process (loading takes ~1.5 s; the prepared copy is reused across
processes). Search order: an nltk-installed WordNet, then a previously prepared copy, then Debian's files.
:func:`rebuild_package_data` rebuilds tagjax/data from it (``tagjax vocab rebuild-data``).
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

import nltk
import tensorflow_datasets as tfds
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from tagjax import hashtags as H
from tagjax import vocab as vocab_lib
from tagjax.hashtags import LEXNAMES

DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

# The database files nltk's reader opens; `lexnames` is generated, not copied.
_DATABASE_FILES = (
    "data.adj",
    "data.adv",
    "data.noun",
    "data.verb",
    "index.adj",
    "index.adv",
    "index.noun",
    "index.verb",
    "adj.exc",
    "adv.exc",
    "noun.exc",
    "verb.exc",
)
_OPTIONAL_FILES = ("cntlist.rev", "index.sense")


INSTALL_HINT = (
    "WordNet 3.0 was not found. Install it with `sudo apt-get install wordnet-base` (Debian/Ubuntu; "
    "tagjax prepares a copy nltk can read) or with `python -m nltk.downloader wordnet` (needs the "
    "internet), or point TAGJAX_WORDNET_DIR at a directory holding WordNet 3.0's dict files."
)


class WordNetNotFoundError(RuntimeError):
    """No readable WordNet 3.0 exists on this machine."""


class _Wordnet30Reader(WordNetCorpusReader):
    """An nltk WordNet reader for a WordNet 3.0 directory that is not nltk's own download.

    nltk maps "version 3.0" onto the loaded version by opening ``corpora/wordnet``; for WordNet 3.0
    itself the map is the identity, so it is skipped (and nltk's own download is never needed).
    """

    def map_wn(self, version="wordnet"):
        return None


def default_cache_dir() -> Path:
    """Where the prepared copy lives: $TAGJAX_CACHE_DIR, else $XDG_CACHE_HOME/tagjax, else ~/.cache/tagjax."""
    if os.environ.get("TAGJAX_CACHE_DIR"):
        return Path(os.environ["TAGJAX_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tagjax"


def _is_wordnet_dict(path: Path) -> bool:
    return all((path / name).is_file() for name in _DATABASE_FILES)


def prepare_copy(source_dir: Path, nltk_data_dir: Path) -> Path:
    """Copies a WordNet 3.0 dict directory into ``<nltk_data_dir>/corpora/wordnet`` and adds `lexnames`.

    The copy is written to a temporary directory and renamed into place, so a crash never leaves a copy
    that looks complete. Returns the corpus root.
    """
    source_dir = Path(source_dir)
    if not _is_wordnet_dict(source_dir):
        missing = [n for n in _DATABASE_FILES if not (source_dir / n).is_file()]
        raise WordNetNotFoundError(
            f"{source_dir} is not a WordNet 3.0 dict directory (missing {', '.join(missing)}). "
            + INSTALL_HINT
        )
    root = Path(nltk_data_dir) / "corpora" / "wordnet"
    if _is_wordnet_dict(root) and (root / "lexnames").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".wordnet.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name in _DATABASE_FILES + _OPTIONAL_FILES:
        if (source_dir / name).is_file():
            # Real copies: nltk refuses symlinks that point outside its data path.
            shutil.copyfile(source_dir / name, tmp / name)
    if (source_dir / "lexnames").is_file():
        shutil.copyfile(source_dir / "lexnames", tmp / "lexnames")
    else:
        (tmp / "lexnames").write_text(
            "".join(f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(LEXNAMES))
        )
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return root


def _nltk_installed_root() -> Path | None:
    """The directory of an nltk-downloaded WordNet, unzipped, if nltk can find one."""

    try:
        found = nltk.data.find("corpora/wordnet")
    except LookupError:
        return None
    path = Path(str(found))
    return path if path.is_dir() and _is_wordnet_dict(path) else None


def find_or_prepare(cache_dir: Path | None = None, debian_dir: Path | None = None) -> Path:
    """Returns a WordNet corpus root nltk can read, preparing one from Debian's files if needed.

    Order: $TAGJAX_WORDNET_DIR (a dict directory to prepare from), nltk's own data path, a copy already
    prepared in ``cache_dir``, Debian's ``/usr/share/wordnet``. Raises WordNetNotFoundError with both
    install routes when none exists.
    """

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    nltk_data_dir = cache_dir / "nltk_data"
    if str(nltk_data_dir) not in nltk.data.path:
        nltk.data.path.insert(0, str(nltk_data_dir))
    override = os.environ.get("TAGJAX_WORDNET_DIR")
    if debian_dir is None and override:
        return prepare_copy(Path(override), nltk_data_dir)
    if debian_dir is None:
        installed = _nltk_installed_root()
        if installed is not None:
            return installed
    prepared = nltk_data_dir / "corpora" / "wordnet"
    if _is_wordnet_dict(prepared) and (prepared / "lexnames").is_file():
        return prepared
    source = Path(debian_dir) if debian_dir is not None else DEBIAN_WORDNET_DIR
    if not _is_wordnet_dict(source):
        raise WordNetNotFoundError(INSTALL_HINT)
    return prepare_copy(source, nltk_data_dir)


def open_reader(root: Path) -> WordNetCorpusReader:
    """Opens a WordNet 3.0 corpus root with nltk (about 1.5 s)."""

    parent = str(Path(root).parent.parent)
    if parent not in nltk.data.path:
        nltk.data.path.insert(0, parent)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions")
        reader = _Wordnet30Reader(str(root), None)
    version = reader.get_version()
    if version != "3.0":
        raise WordNetNotFoundError(
            f"WordNet at {root} is version {version}; tagjax labels are WordNet 3.0 synsets "
            "(ImageNet wnids are 3.0 offsets). " + INSTALL_HINT
        )
    return reader


@functools.cache
def load() -> WordNetCorpusReader:
    """The process-wide WordNet 3.0 reader (loaded once; see the module docstring for the search order)."""
    return open_reader(find_or_prepare())


def synset_from_wnid(wnid: str, wn: WordNetCorpusReader | None = None):
    """ImageNet-style ``nXXXXXXXX`` (a WordNet 3.0 noun offset) -> its Synset."""
    wn = wn or load()
    if len(wnid) != 9 or wnid[0] != "n" or not wnid[1:].isdigit():
        raise ValueError(
            f"{wnid!r} is not a wnid: expected 'n' followed by 8 digits, e.g. n02084071."
        )
    return wn.synset_from_pos_and_offset("n", int(wnid[1:]))


def wnid_of(synset) -> str:
    """Synset -> ImageNet-style wnid ``nXXXXXXXX``."""
    return f"{synset.pos()}{synset.offset():08d}"


def rebuild_package_data(out_dir: Path | None = None, wn=None) -> dict:
    """Rebuilds every derived file in tagjax/data from WordNet 3.0 (the one command:
    ``tagjax vocab rebuild-data``): the noun table, its glosses and the in1k vocabulary."""

    out_dir = Path(out_dir) if out_dir is not None else H.DATA_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    wn = wn or load()
    table = H.NounTable.from_wordnet(wn)
    table.save(out_dir / H.NOUN_TABLE_FILE, out_dir / H.GLOSS_FILE)
    v = vocab_lib.build_vocabulary(None, mode="in1k", table=table, source="wordnet")
    v.save(out_dir / vocab_lib.IN1K_VOCAB_FILE)
    return {
        "synsets": len(table),
        "forms": len(table.keys),
        "in1k_labels": v.num_labels,
        "files": {
            p: (out_dir / p).stat().st_size
            for p in (H.NOUN_TABLE_FILE, H.GLOSS_FILE, vocab_lib.IN1K_VOCAB_FILE)
        },
    }


def imagenet1k_classes_from_sources(wn=None) -> list[tuple[str, str, str]]:
    """(wnid, synset name, display name) for the 1000 ImageNet-1k classes, from their sources.

    The wnids are tensorflow-datasets' packaged ``imagenet2012/labels.txt`` (sorted: the order torchvision's
    ImageFolder and every released model use); the names are each synset's first WordNet 3.0 lemma.
    Loading nltk's WordNet takes 10-30 s, so import-weights reads the packaged copy
    (:data:`tagjax.vocab.IMAGENET1K_CLASSES_FILE`, written by :func:`write_imagenet1k_classes`) instead; a test checks
    that the two agree.
    """
    labels = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    wnids = labels.read_text().split()
    wn = wn or load()
    synsets = [synset_from_wnid(wnid, wn) for wnid in wnids]
    names = [s.lemmas()[0].name().replace("_", " ") for s in synsets]
    # Two first lemmas repeat ("crane": the bird and the machine; "maillot"): the synset disambiguates.
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{n} ({s.name()})" if n in repeated else n for n, s in zip(names, synsets)]
    return [(wnid, s.name(), n) for wnid, s, n in zip(wnids, synsets, names)]


def write_imagenet1k_classes(path: str | Path = vocab_lib.IMAGENET1K_CLASSES_FILE) -> Path:
    """(Re)writes the packaged class list: ``wnid<TAB>synset<TAB>name``, one line per class."""
    p = Path(path)
    lines = ["\t".join(row) for row in imagenet1k_classes_from_sources()]
    p.write_text("\n".join(lines) + "\n")
    return p

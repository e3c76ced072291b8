"""WordNet 3.0 for nltk without the internet: prepare a copy from Debian's files, or fail clearly."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tagjax import wordnet

DEBIAN = wordnet.DEBIAN_WORDNET_DIR


def _debian_style_dir(tmp_path: Path) -> Path:
    """A copy of Debian's dict directory as the package lays it out: no `lexnames` file."""
    src = tmp_path / "debian-wordnet"
    src.mkdir()
    for name in wordnet._DATABASE_FILES:
        shutil.copyfile(DEBIAN / name, src / name)
    return src


@pytest.mark.skipif(
    not (DEBIAN / "data.noun").is_file(), reason="Debian wordnet-base not installed"
)
def test_prepares_readable_copy_from_debian_dir(tmp_path):
    empty_nltk_data = tmp_path / "nltk_data_empty"
    empty_nltk_data.mkdir()
    source = _debian_style_dir(tmp_path)
    assert not (source / "lexnames").exists()
    cache = tmp_path / "cache"
    root = wordnet.find_or_prepare(cache_dir=cache, debian_dir=source)
    assert root == cache / "nltk_data" / "corpora" / "wordnet"
    lexnames = (root / "lexnames").read_text().splitlines()
    assert (
        len(lexnames) == 45
        and lexnames[1] == "01\tadj.pert\t3"
        and lexnames[44] == "44\tadj.ppl\t3"
    )
    reader = wordnet.open_reader(root)
    dog = wordnet.synset_from_wnid("n02084071", reader)
    assert dog.name() == "dog.n.01"
    assert dog.lexname() == "noun.animal"
    assert wordnet.wnid_of(dog) == "n02084071"
    # Prepared once: a second call reuses the copy instead of copying again.
    mtime = (root / "data.noun").stat().st_mtime_ns
    assert wordnet.find_or_prepare(cache_dir=cache, debian_dir=source) == root
    assert (root / "data.noun").stat().st_mtime_ns == mtime


def test_clear_error_when_no_wordnet_exists(tmp_path):
    # A fresh process whose nltk data path and Debian directory are both empty.
    code = f"""
import nltk
nltk.data.path[:] = [{str(tmp_path / "nltk_data")!r}]
from tagjax import wordnet
try:
    wordnet.find_or_prepare(cache_dir={str(tmp_path / "cache")!r}, debian_dir={str(tmp_path / "nowhere")!r})
except wordnet.WordNetNotFoundError as e:
    print(e)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "apt-get install wordnet-base" in out
    assert "nltk.downloader wordnet" in out
    assert len(out.strip().splitlines()) == 1


def test_rejects_a_directory_that_is_not_wordnet(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(wordnet.WordNetNotFoundError, match=r"not a WordNet 3\.0 dict directory"):
        wordnet.prepare_copy(tmp_path / "junk", tmp_path / "nltk_data")


def test_wnid_parsing_errors(wn):
    with pytest.raises(ValueError, match="not a wnid"):
        wordnet.synset_from_wnid("dog", wn)
    assert wordnet.synset_from_wnid("n02099601", wn).name() == "golden_retriever.n.01"

"""Hashtag vocabularies: canonical hashtags (sets of WordNet noun synsets), their ids, and the fast
hashtag -> label-id mapping every post goes through.

A *label* is a canonical hashtag: one set of noun synsets (see :mod:`tagjax.hashtags`). Every hashtag
form with that meaning is an *alias* of the label (#dog, #dogs, #Dog), and the label's name is its most
frequent alias. Three modes select labels (:func:`build_vocabulary`):

* ``in1k``: every canonical hashtag whose synset set contains one of the 1,000 ImageNet-1k synsets (the
  wnids of tensorflow-datasets' ``datasets/imagenet2012/labels.txt``): the paper's ImageNet-aligned set
  ("1.5k"). More labels than synsets, because a polysemous hashtag is its own label: #brownbear and
  #ursusarctos name exactly {brown_bear.n.01} and merge, but #bruin = {bruin.n.01, brown_bear.n.01} is a
  label of its own, as are #tiger = {tiger.n.01 person, tiger.n.02 animal} and #pantheratigris =
  {tiger.n.02}. From WordNet 3.0 alone this gives 1,312 labels, not ~1.5k: docs/paper_fidelity.md
  explains the difference. The visual filter does not apply: an ImageNet synset is visual by construction.
* ``nouns_paper``: the paper's 17k/8.5k definition and nothing more: every canonical hashtag of a WordNet
  noun synset, the top ``top_k`` by corpus count with at least ``min_count``. No visual filter, no
  meta-hashtag list, no compound splitting, every sense kept (these settings are forced).
* ``nouns``: tagjax's filtered variant of ``nouns_paper``: hashtags must also pass the visual filter and
  not be on the meta-hashtag list (both tagjax's own additions, configurable).

Ids are stable: assigned once at build time in order of decreasing corpus count, ties broken by name
(so id 0 is the most frequent label), then frozen in the saved file; loading never reorders, and
:meth:`Vocabulary.fingerprint` hashes the id -> (name, synsets) list so checkpoints and datasets can check
they refer to the same labels.

File format (``vocab.json``, human-readable JSON, ``"format": "tagjax-vocabulary"``, ``"version": 1``)::

    {"format": "tagjax-vocabulary", "version": 1, "fingerprint": "...",
     "settings": {"mode": "in1k", "top_k": null, "min_count": 1, "hashtags": {sense policy, visual rule,
                  meta list, splitting}, "wordnet": "3.0", "source": ..., "tagjax": "0.1.0"},
     "stats": {"input_forms": ..., "dropped": {reason: {"forms": n, "count": n}}, ...},
     "labels": [{"id": 0, "name": "dog", "count": 120,
                 "synsets": [{"wnid": "n02084071", "name": "dog.n.01", "gloss": "a member of ..."}, ...],
                 "aliases": {"dog": 100, "dogs": 20}, "ancestors": [17, 230]}, ...]}

``ancestors`` lists the ids of labels that are WordNet ancestors of this one, for the specificity option
(#dog beside #goldenretriever keeps golden retriever). Ancestry is decided on every sense that carries the
label (``ANCESTOR_RULE``): A is an ancestor of B when *each* synset of B is a proper hyponym of some synset
of A. Any-sense ancestry over-triggers on polysemous hashtags: #woman would drop beside #cat (cat.n.03
is "a spiteful woman gossip"), #vehicle beside #cat (caterpillar.n.02, a tracked vehicle), #speaker beside
#magpie (chatterer.n.01); under the every-sense rule none of them does, while #dog beside
#goldenretriever and #bird beside #goldfinch still do.

The hot path (:class:`Canonicalizer`) never loads WordNet: a per-process cache maps each raw hashtag
string to its label id (or drop reason); first-seen strings go through the precomputed noun table.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import sys
from collections import _count_elements  # the C loop behind Counter.update
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

import tagjax
from tagjax import hashtags as H
from tagjax.errors import UserError
from tagjax.progress import progress_bar

FORMAT = "tagjax-vocabulary"
VERSION = 1
MODES = ("in1k", "nouns", "nouns_paper")
# How label ancestry is decided (stored in a vocabulary's settings; files built under another rule get
# their ancestors recomputed on load). "every_sense": label A is an ancestor of label B when every synset
# of B is a proper hyponym of some synset of A.
ANCESTOR_RULE = "every_sense"
IN1K_VOCAB_FILE = "vocab_in1k.json.gz"
# wnid<TAB>synset<TAB>name of the 1000 ImageNet-1k classes (tagjax.wordnet.write_imagenet1k_classes).
IMAGENET1K_CLASSES_FILE = H.DATA_DIR / "imagenet1k_classes.tsv"
BUILTIN = {"in1k": IN1K_VOCAB_FILE}  # names Vocabulary.load accepts besides paths


# -- ImageNet-1k ------------------------------------------------------------------------------------


def imagenet1k_wnids() -> list[str]:
    """The 1,000 ImageNet-1k wnids in class-index order, from tensorflow-datasets' package file.

    Read as a plain file (importing tensorflow_datasets takes seconds and is not needed for this).
    """
    spec = importlib.util.find_spec("tensorflow_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "tensorflow-datasets is not installed; install tagjax's dependencies "
            "(`pip install tensorflow-datasets`) to build the in1k vocabulary."
        )
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "datasets"
        / "imagenet2012"
        / "labels.txt"
    )
    if not path.is_file():
        raise UserError(
            f"{path} is missing from tensorflow-datasets; reinstall tensorflow-datasets."
        )
    wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    if len(wnids) != 1000:
        raise UserError(
            f"{path} lists {len(wnids)} wnids, not 1,000; reinstall tensorflow-datasets."
        )
    return wnids


# -- the vocabulary ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Label:
    """One canonical hashtag. ``synsets`` are noun-table indices in sense order (the name's senses
    first); ``aliases`` maps each hashtag form seen with this meaning to its corpus count."""

    name: str
    synsets: tuple[int, ...]
    aliases: dict[str, int]
    count: int
    ancestors: tuple[int, ...] = ()


def _set_key(synsets: Iterable[int]) -> tuple[int, ...]:
    """A label's identity: its synsets' table indices, sorted (table order is offset order)."""
    return tuple(sorted(synsets))


class Vocabulary:
    """An ordered list of labels; ids are list positions. See the module docstring for the file format."""

    def __init__(
        self,
        labels: Sequence[Label],
        settings: Mapping,
        stats: Mapping | None = None,
        table: H.NounTable | None = None,
        glosses: Mapping[int, str] | None = None,
    ):
        self.table = table or H.NounTable.load()
        self.labels = list(labels)
        self.settings = dict(settings)
        self.stats = dict(stats or {})
        self._glosses = dict(glosses or {})
        self._alias_to_id: dict[str, int] = {}
        self._set_to_id: dict[tuple[int, ...], int] = {}
        for i, label in enumerate(self.labels):
            key = _set_key(label.synsets)
            if key in self._set_to_id:
                raise UserError(
                    f"vocabulary labels {self._set_to_id[key]} and {i} have the same synsets; "
                    "the file is corrupt, rebuild it with `tagjax vocab build`."
                )
            self._set_to_id[key] = i
            for alias in label.aliases:
                self._alias_to_id[alias] = i
        self._ancestor_sets = [frozenset(label.ancestors) for label in self.labels]
        self._canon: Canonicalizer | None = None
        self._mask: np.ndarray | None = None

    # -- the API the rest of tagjax codes against ------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def hashtag_options(self) -> H.HashtagOptions:
        return H.HashtagOptions.from_dict(self.settings.get("hashtags"))

    def name_of(self, i: int) -> str:
        return self.labels[i].name

    def names(self) -> list[str]:
        return [label.name for label in self.labels]

    def synsets_of(self, i: int) -> list[str]:
        """Synset names (``dog.n.01``), in sense order."""
        return [self.table.names[s] for s in self.labels[i].synsets]

    def wnids_of(self, i: int) -> list[str]:
        return [self.table.wnid(s) for s in self.labels[i].synsets]

    def aliases_of(self, i: int) -> dict[str, int]:
        return dict(self.labels[i].aliases)

    def count_of(self, i: int) -> int:
        return self.labels[i].count

    def id_of(self, hashtag: str) -> int | None:
        """The label a hashtag string canonicalizes to (any spelling or inflection), or None."""
        got = self._alias_to_id.get(H.normalize(hashtag))
        if got is not None:
            return got
        return self.canonicalizer().label_of(hashtag)

    def id_of_synsets(self, synsets: Iterable[str]) -> int | None:
        """The label whose synset set is exactly these (names like ``dog.n.01`` or wnids)."""
        idxs = []
        for s in synsets:
            if len(s) == 9 and s[0] == "n" and s[1:].isdigit():
                try:
                    idxs.append(self.table.index_of_offset(int(s[1:])))
                except KeyError:
                    return None
            else:
                idxs.append(self.table.index_of_name(s))
        return self._set_to_id.get(_set_key(idxs))

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of the id-ordered (name, wnids) list: equal iff same labels."""
        payload = json.dumps(
            [[label.name, [self.table.wnid(s) for s in label.synsets]] for label in self.labels],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def ancestors_of(self, i: int) -> tuple[int, ...]:
        """Ids of labels that are WordNet ancestors of label i (sorted)."""
        return self.labels[i].ancestors

    def is_ancestor(self, i: int, j: int) -> bool:
        """True when label i is a WordNet ancestor of label j (so j is the more specific tag)."""
        return i in self._ancestor_sets[j]

    @property
    def ancestors_mask(self) -> np.ndarray:
        """bool [num_labels, num_labels], ``mask[i, j]`` = label i is an ancestor of label j.

        Dense, built on first use: num_labels**2 bytes (2.3 MB at 1.5k labels, 289 MB at 17k; prefer
        :meth:`ancestor_pairs` or :meth:`drop_ancestors` for large vocabularies).
        """
        if self._mask is None:
            n = self.num_labels
            mask = np.zeros((n, n), dtype=bool)
            for j, label in enumerate(self.labels):
                if label.ancestors:
                    mask[list(label.ancestors), j] = True
            self._mask = mask
        return self._mask

    def ancestor_pairs(self) -> np.ndarray:
        """int32 [P, 2] rows (ancestor, descendant): the sparse form of :attr:`ancestors_mask`."""
        rows = [(a, j) for j, label in enumerate(self.labels) for a in label.ancestors]
        return np.asarray(rows, dtype=np.int32).reshape(-1, 2)

    def drop_ancestors(self, label_ids: Iterable[int]) -> tuple[int, ...]:
        """Sorted ids without those that are an ancestor of another id in the same set."""
        ids = set(label_ids)
        if len(ids) < 2:
            return tuple(sorted(ids))
        anc = self._ancestor_sets
        drop = {a for j in ids for a in anc[j] if a in ids}
        return tuple(sorted(ids - drop))

    def canonicalizer(self) -> Canonicalizer:
        """A shared Canonicalizer with the vocabulary's own settings (for id_of and quick lookups)."""
        if self._canon is None:
            self._canon = Canonicalizer(self)
        return self._canon

    # -- persistence ----------------------------------------------------------------------------------
    def gloss_of_synset(self, s: int) -> str:
        g = self._glosses.get(s)
        if g is None:
            g = self.table.glosses()[s]
            self._glosses[s] = g
        return g

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint(),
            "num_labels": self.num_labels,
            "settings": self.settings,
            "stats": self.stats,
            "labels": [
                {
                    "id": i,
                    "name": label.name,
                    "count": label.count,
                    "synsets": [
                        {
                            "wnid": self.table.wnid(s),
                            "name": self.table.names[s],
                            "gloss": self.gloss_of_synset(s),
                        }
                        for s in label.synsets
                    ],
                    "aliases": label.aliases,
                    "ancestors": list(label.ancestors),
                }
                for i, label in enumerate(self.labels)
            ],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the JSON file (gzip when the name ends in .gz), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_json()
        if path.suffix == ".gz":
            H._write_json_gz(path, d)
            return
        text = _dump_readable(d)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def from_json(
        cls, d: Mapping, table: H.NounTable | None = None, source: str = "<json>"
    ) -> Vocabulary:
        if d.get("format") != FORMAT:
            raise UserError(
                f'{source} is not a tagjax vocabulary (no "format": "{FORMAT}"); build one '
                "with `tagjax vocab build`."
            )
        if d.get("version") != VERSION:
            raise UserError(
                f"{source} is vocabulary format version {d.get('version')}, this tagjax reads "
                f"version {VERSION}; rebuild it with `tagjax vocab build`."
            )
        table = table or H.NounTable.load()
        labels, glosses = [], {}
        for i, entry in enumerate(d["labels"]):
            if entry.get("id", i) != i:
                raise UserError(
                    f"{source}: label {i} has id {entry.get('id')}; ids must be 0..N-1 in order."
                )
            idxs = []
            for syn in entry["synsets"]:
                try:
                    s = table.index_of_offset(int(syn["wnid"][1:]))
                except (KeyError, ValueError):
                    raise UserError(
                        f"{source}: {syn.get('wnid')!r} (label {entry['name']!r}) is not a "
                        "WordNet 3.0 noun wnid."
                    ) from None
                idxs.append(s)
                if "gloss" in syn:
                    glosses[s] = syn["gloss"]
            labels.append(
                Label(
                    name=entry["name"],
                    synsets=tuple(idxs),
                    aliases={k: int(v) for k, v in entry.get("aliases", {}).items()},
                    count=int(entry.get("count", 0)),
                    ancestors=tuple(entry.get("ancestors", ())),
                )
            )
        settings = dict(d.get("settings", {}))
        if settings.get("ancestor_rule") != ANCESTOR_RULE:  # built under an older rule: recompute
            labels = _with_ancestors(labels, table)
            settings["ancestor_rule"] = ANCESTOR_RULE
        v = cls(labels, settings, d.get("stats", {}), table=table, glosses=glosses)
        stored = d.get("fingerprint")
        if stored and stored != v.fingerprint():
            raise UserError(
                f"{source}: its fingerprint {stored} does not match its labels "
                f"({v.fingerprint()}); the file was edited or is corrupt; rebuild it."
            )
        return v

    @classmethod
    def load(cls, path: str | os.PathLike, table: H.NounTable | None = None) -> Vocabulary:
        """Reads a vocabulary file (.json or .json.gz), or a built-in one by name (``"in1k"``)."""
        if str(path) in BUILTIN:
            path = H.DATA_DIR / BUILTIN[str(path)]
        path = Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        if not path.is_file():
            raise UserError(
                f"vocabulary file {path} does not exist; build one with `tagjax vocab build` "
                f"or use a built-in one ({', '.join(BUILTIN)})."
            )
        try:
            if path.suffix == ".gz":
                d = H._read_json_gz(path)
            else:
                d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(
                f"{path} is not readable JSON ({e}); rebuild it with `tagjax vocab build`."
            ) from e
        return cls.from_json(d, table=table, source=str(path))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Vocabulary):
            return NotImplemented
        return (
            self.labels == other.labels
            and self.settings == other.settings
            and self.stats == other.stats
        )

    def __repr__(self) -> str:
        return (
            f"Vocabulary({self.num_labels} labels, mode={self.settings.get('mode')!r}, "
            f"fingerprint={self.fingerprint()})"
        )


def _dump_readable(d: Mapping) -> str:
    """Indented JSON with one line per synset and per alias map, so a 17k-label file stays skimmable."""
    head = {k: v for k, v in d.items() if k != "labels"}
    lines = [json.dumps(head, indent=1, ensure_ascii=False)[:-2].rstrip() + ',\n "labels": [']
    for n, label in enumerate(d["labels"]):
        syn = ",\n    ".join(json.dumps(s, ensure_ascii=False) for s in label["synsets"])
        lines.append(
            "  {"
            + f'"id": {label["id"]}, "name": {json.dumps(label["name"], ensure_ascii=False)}, '
            f'"count": {label["count"]},\n   "synsets": [\n    {syn}],\n'
            f'   "aliases": {json.dumps(label["aliases"], ensure_ascii=False)},\n'
            f'   "ancestors": {json.dumps(label["ancestors"])}'
            + "}"
            + ("," if n + 1 < len(d["labels"]) else "")
        )
    lines.append(" ]\n}\n")
    return "\n".join(lines)


# -- the hot path -----------------------------------------------------------------------------------


class CanonResult(NamedTuple):
    """A post's labels (sorted unique ids) and its dropped hashtags counted by reason."""

    label_ids: tuple[int, ...]
    dropped: collections.Counter


class _Cache(dict):
    """raw hashtag -> int code; a miss resolves the tag through the canonicalizer (``__missing__``), so
    the hot loop is one C-level ``map(cache.__getitem__, tags)``."""

    __slots__ = ("resolve",)

    def __missing__(self, tag):
        return self.resolve(tag)


# Cache codes: label id (>= 0); a drop reason (-1 - index in _REASONS); a split compound, several labels
# (<= _SPLIT_BASE, an index into Canonicalizer._splits).
_REASONS = (H.EMPTY, H.META, H.NOT_A_NOUN, H.NON_VISUAL, H.NOT_IN_VOCAB)
_REASON_CODE = {r: -1 - k for k, r in enumerate(_REASONS)}
_SPLIT_BASE = -1000


class Canonicalizer:
    """Raw hashtags of one post -> :class:`CanonResult`. Fast: a dict cache from the raw string to an int
    code (label id or drop reason) serves repeated tags (hashtags are Zipfian, so nearly all of them);
    a miss normalizes the string and resolves it through the vocabulary's aliases, then the precomputed
    noun table, never WordNet itself.

    ``drop_ancestors`` is the specificity option: on one post, a label is dropped when another label of
    the post is its WordNet descendant (#dog beside #goldenretriever keeps golden retriever); each such
    drop is counted as ``ancestor``. ``split_compounds`` overrides the vocabulary's setting. The cache is
    cleared when it reaches ``cache_size`` entries (bounded memory on corpora with millions of distinct
    strings; the cost is a brief run of misses).

    Which tags a vocabulary keeps follows its build exactly: a ``nouns`` vocabulary applies the visual
    rule (a refused form is ``non_visual`` even if its synsets are a label); ``in1k`` (an ImageNet synset
    is visual by construction) and ``nouns_paper`` (the paper's definition) vocabularies do not.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        drop_ancestors: bool = False,
        *,
        split_compounds: bool | None = None,
        cache_size: int = 1 << 21,
    ):
        self.vocab = vocab
        self.drop_ancestors = drop_ancestors
        options = vocab.hashtag_options
        if split_compounds is not None:
            options = dataclasses.replace(options, split_compounds=split_compounds)
        self.options = options
        self.analyzer = H.HashtagAnalyzer(options, vocab.table)
        self.cache_size = cache_size
        self._cache = _Cache()
        self._cache.resolve = self._resolve
        self._get = self._cache.__getitem__
        self._splits: list[tuple[int, ...]] = []
        self._split_index: dict[tuple[int, ...], int] = {}
        self._ancestors = vocab._ancestor_sets
        self._apply_visual = vocab.settings.get("mode") != "in1k" and options.visual.enabled

    # -- lookups ----------------------------------------------------------------------------------------
    def _decode(self, code: int) -> int | str | tuple[int, ...]:
        if code >= 0:
            return code
        if code > _SPLIT_BASE:
            return _REASONS[-1 - code]
        return self._splits[_SPLIT_BASE - code]

    def lookup(self, tag: str) -> int | str | tuple[int, ...]:
        """One hashtag -> label id, a drop reason (str), or a tuple of ids (a split compound)."""
        return self._decode(self._get(tag))

    def label_of(self, tag: str) -> int | None:
        r = self.lookup(tag)
        return r if isinstance(r, int) else None

    def _resolve(self, tag: str) -> int:
        cache = self._cache
        if len(cache) >= self.cache_size:
            cache.clear()
        r = self._resolve_uncached(tag)
        if isinstance(r, str):
            code = _REASON_CODE[r]
        elif isinstance(r, tuple):
            k = self._split_index.get(r)
            if k is None:
                k = self._split_index[r] = len(self._splits)
                self._splits.append(r)
            code = _SPLIT_BASE - k
        else:
            code = r
        cache[tag] = code
        return code

    def _meaning_label(self, form: str) -> int | str:
        """Label id of a whole form, or why it has none (the first-seen path; no dataclasses here)."""
        table, judge = self.vocab.table, self.analyzer.judge
        senses, counts = table.senses_and_counts(form)
        if not senses:
            return H.NOT_A_NOUN
        if self.options.sense_policy == "first":
            senses, counts = senses[:1], counts[:1]
        if self._apply_visual and judge.share(senses, counts) < self.options.visual.threshold:
            return H.NON_VISUAL
        got = self.vocab._set_to_id.get(_set_key(senses))
        return H.NOT_IN_VOCAB if got is None else got

    def _resolve_uncached(self, tag: str) -> int | str | tuple[int, ...]:
        v = self.vocab
        form = H.normalize(tag)
        if not form:
            return H.EMPTY
        meta = self.analyzer.meta
        if form in meta:
            return H.META
        got = v._alias_to_id.get(form)
        if got is not None:
            return got
        r = self._meaning_label(form)
        if r != H.NOT_A_NOUN or not self.options.split_compounds:
            return r
        parts = self.analyzer.split(form)
        if not parts:
            return H.NOT_A_NOUN
        found = [self._meaning_label(p) for p in parts if p not in meta]
        ids = tuple(sorted({i for i in found if isinstance(i, int)}))
        if ids:
            return ids[0] if len(ids) == 1 else ids
        return H.NON_VISUAL if H.NON_VISUAL in found else H.NOT_IN_VOCAB

    # -- posts ------------------------------------------------------------------------------------------
    def __call__(self, tags: Iterable[str]) -> CanonResult:
        # Everything per tag runs in C: the cache lookups (map), a sort that puts drop codes (< 0) before
        # label ids, a bisect to split them, dict.fromkeys to deduplicate the already sorted ids, and
        # Counter's C helper to count drop codes. Python-level work is per post and per drop *reason*.
        codes = list(map(self._get, tags))
        codes.sort()
        dropped = _new_counter()
        k = _bisect_left(codes, 0) if codes and codes[0] < 0 else 0
        labels = codes[k:] if k else codes
        if k:
            per_code: dict[int, int] = {}
            _count_elements(per_code, codes[:k])
            parts: list[int] = []
            for c, n in per_code.items():
                if c > _SPLIT_BASE:
                    dropped[_REASONS[-1 - c]] = n
                else:  # a split compound: each part is a label occurrence
                    parts.extend(self._splits[_SPLIT_BASE - c] * n)
            if parts:  # one sort for all compounds (a sort per compound was quadratic)
                labels = sorted(labels + parts)
        ids = dict.fromkeys(labels)
        if len(ids) < len(labels):
            dropped[H.DUPLICATE] = len(labels) - len(ids)
        if self.drop_ancestors and len(ids) > 1:
            anc = self._ancestors
            drop = {a for j in ids for a in anc[j] if a in ids}
            if drop:
                dropped[H.ANCESTOR] = len(drop)
                return CanonResult(tuple(i for i in ids if i not in drop), dropped)
        return CanonResult(tuple(ids), dropped)

    def explain(self, tag: str) -> dict:
        """What happens to one hashtag, for humans (`tagjax vocab lookup`)."""
        v, t = self.vocab, self.vocab.table
        a = self.analyzer.analyze(tag)
        r = self.lookup(tag)
        out = {"tag": tag, "form": a.form}
        ids = [r] if isinstance(r, int) else list(r) if isinstance(r, tuple) else []
        if ids:
            out["labels"] = [
                {
                    "id": i,
                    "name": v.name_of(i),
                    "synsets": v.synsets_of(i),
                    "wnids": v.wnids_of(i),
                    "count": v.count_of(i),
                }
                for i in ids
            ]
        else:
            out["dropped"] = r
        out["meanings"] = [
            {
                "form": m.form,
                "synsets": [t.names[s] for s in m.synsets],
                "lexnames": [t.lexname(s) for s in m.synsets],
                "visual_share": round(m.visual_share, 3),
            }
            for m in a.meanings
        ]
        return out


# An empty Counter without running Counter.__init__ in Python (it would only call update(None)): this
# is made once per post on the hot path.
_new_counter = functools.partial(collections.Counter.__new__, collections.Counter)
_bisect_left = bisect.bisect_left


# -- building ---------------------------------------------------------------------------------------


def _default_name(aliases: Mapping[str, int], first_lemma_form: str | None) -> str:
    """Most frequent alias; ties -> the form of the first synset's first lemma, then shortest, then a-z."""
    return min(aliases, key=lambda a: (-aliases[a], a != first_lemma_form, len(a), a))


def build_vocabulary(
    tag_counts: Mapping[str, int] | None,
    mode: str = "nouns",
    top_k: int | None = None,
    min_count: int = 1,
    *,
    sense_policy: str = "all",
    visual: H.VisualRule | Mapping | None = None,
    meta_hashtags: str = "default",
    split_compounds: bool = False,
    in1k_wnids: Sequence[str] | None = None,
    table: H.NounTable | None = None,
    source: str = "",
    progress: bool | None = None,
) -> Vocabulary:
    """Hashtag counts -> a :class:`Vocabulary` (see the module docstring for the modes).

    ``tag_counts`` maps raw hashtags to how many posts carry them; spellings with the same form are
    summed. ``None`` or empty builds from WordNet alone: every WordNet noun form is a candidate with
    count 0 (min_count is then ignored), which is how the package's in1k vocabulary is made.
    Every candidate that does not become a label is counted by reason in ``stats["dropped"]``.
    """
    if mode not in MODES:
        raise UserError(f"unknown vocabulary mode {mode!r}; use one of {MODES}.")
    if top_k is not None and top_k < 1:
        raise UserError(
            f"top_k must be a positive number of labels (got {top_k}); omit it for no limit."
        )
    table = table or H.NounTable.load()
    if isinstance(visual, Mapping):
        visual = H.VisualRule.from_dict(visual)
    if mode == "nouns_paper":  # the paper's definition only: every sense of every noun hashtag
        visual = dataclasses.replace(visual or H.VisualRule(), enabled=False)
        meta_hashtags, split_compounds, sense_policy = "none", False, "all"
    options = H.HashtagOptions(
        sense_policy=sense_policy,
        visual=visual or H.VisualRule(),
        meta_hashtags=meta_hashtags,
        split_compounds=split_compounds,
    )
    analyzer = H.HashtagAnalyzer(options, table)
    wordnet_only = not tag_counts
    if wordnet_only:
        forms: dict[str, int] = dict.fromkeys(table.keys, 0)
        min_count = 0
    else:
        forms = {}
        for tag, n in tag_counts.items():
            n = int(n)
            if n < 0:
                raise UserError(f"hashtag {tag!r} has a negative count ({n}); counts must be >= 0.")
            f = H.normalize(tag)
            forms[f] = forms.get(f, 0) + n
    in1k: frozenset[int] = frozenset()
    if mode == "in1k":
        wnids = list(in1k_wnids) if in1k_wnids is not None else imagenet1k_wnids()
        in1k = frozenset(table.index_of_offset(int(w[1:])) for w in wnids)

    dropped: dict[str, list[int]] = collections.defaultdict(
        lambda: [0, 0]
    )  # reason -> [forms, count]

    def drop(reason: str, n: int) -> None:
        d = dropped[reason]
        d[0] += 1
        d[1] += n

    groups: dict[tuple[int, ...], dict] = {}  # sorted synset indices -> {"synsets", "aliases"}
    items = sorted(forms.items())

    show = progress if progress is not None else (None if len(items) > 200_000 else False)
    for form, n in progress_bar(items, desc="canonicalizing hashtags", unit="tag", enabled=show):
        if n < min_count:
            drop("below_min_count", n)
            continue
        a = analyzer.analyze(form)
        if a.reason in (H.EMPTY, H.META, H.NOT_A_NOUN):
            drop(a.reason, n)
            continue
        meanings = a.meanings
        if mode == "in1k":
            meanings = tuple(m for m in meanings if not in1k.isdisjoint(m.synsets))
            if not meanings:
                drop("not_in1k", n)
                continue
        elif a.reason is not None:
            drop(a.reason, n)
            continue
        for m in meanings:
            g = groups.setdefault(tuple(sorted(m.synsets)), {"synsets": m.synsets, "aliases": {}})
            g["aliases"][form] = g["aliases"].get(form, 0) + n
    # A split compound gives each part an alias count, but it stays an alias of neither part alone:
    # only whole-form meanings keep the alias (the canonicalizer re-splits compounds itself).
    candidates = []
    for key, g in groups.items():
        count = sum(g["aliases"].values())
        first_lemma = H.normalize(table.names[g["synsets"][0]].rsplit(".", 2)[0])
        name = _default_name(g["aliases"], first_lemma)
        candidates.append((key, g, count, name))
    candidates.sort(key=lambda c: (-c[2], c[3]))
    num_candidates = len(candidates)
    if top_k is not None and len(candidates) > top_k:
        for c in candidates[top_k:]:
            drop("beyond_top_k", c[2])
        candidates = candidates[:top_k]
    labels = [
        Label(
            name=name,
            synsets=tuple(g["synsets"]),
            aliases=dict(sorted(g["aliases"].items(), key=lambda kv: (-kv[1], kv[0]))),
            count=count,
        )
        for _, g, count, name in candidates
    ]
    labels = _with_ancestors(labels, table)
    total = sum(forms.values())
    kept = sum(label.count for label in labels)
    settings = {
        "mode": mode,
        "top_k": top_k,
        "min_count": min_count,
        "hashtags": options.to_dict(),
        "ancestor_rule": ANCESTOR_RULE,
        "wordnet": "3.0",
        "source": source or ("wordnet" if wordnet_only else "hashtag counts"),
        "corpus_counts": not wordnet_only,
        "tagjax": _tagjax_version(),
    }
    stats = {
        "input_forms": len(forms),
        "input_count": total,
        "candidate_labels": num_candidates,
        "labels": len(labels),
        "kept_count": kept,
        "kept_fraction": round(kept / total, 6) if total else None,
        "dropped": {r: {"forms": d[0], "count": d[1]} for r, d in sorted(dropped.items())},
    }
    if mode == "in1k":
        covered = {s for label in labels for s in label.synsets} & in1k
        stats["in1k_synsets_covered"] = len(covered)
    vocab = Vocabulary(labels, settings, stats, table=table)
    return vocab


def _tagjax_version() -> str:

    version = getattr(tagjax, "__version__", None)
    if (
        version is None
    ):  # imported as a namespace package (some editable installs): ask the metadata
        version = metadata.version("tagjax")
    return version


def _with_ancestors(labels: list[Label], table: H.NounTable) -> list[Label]:
    """Fills each label's ``ancestors`` under ``ANCESTOR_RULE``: the labels that hold, for *every* synset
    of this label, a proper WordNet hypernym of it (instance hypernyms included, transitively)."""
    holders: dict[int, list[int]] = collections.defaultdict(list)
    for i, label in enumerate(labels):
        for s in label.synsets:
            holders[s].append(i)
    out = []
    for j, label in enumerate(labels):
        anc: set[int] | None = None
        for s in label.synsets:
            above = {i for a in table.ancestors(s) for i in holders.get(a, ())}
            anc = above if anc is None else anc & above
            if not anc:
                break
        anc = (anc or set()) - {j}
        out.append(dataclasses.replace(label, ancestors=tuple(sorted(anc))))
    return out


# -- hashtag-count input files -----------------------------------------------------------------------


def _open_text(path: Path):
    return (
        gzip.open(path, "rt", encoding="utf-8")
        if path.suffix == ".gz"
        else open(path, encoding="utf-8")
    )


def _count_tags(path: Path, kind: str) -> tuple[collections.Counter, int, int]:
    """(counts, malformed entries, entries) of one hashtag-count file (read_tag_counts)."""
    counts: collections.Counter = collections.Counter()
    bad = lines = 0
    if kind == ".json":
        with _open_text(path) as f:
            try:
                d = json.load(f)
            except ValueError as e:
                raise UserError(f"{path} is not valid JSON ({e}).") from e
        pairs = d.items() if isinstance(d, dict) else d
        for pair in pairs:
            lines += 1
            try:
                tag, n = pair
                counts[str(tag)] += int(n)
            except (TypeError, ValueError, OverflowError):  # NaN, Infinity
                bad += 1
    else:
        with _open_text(path) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip() or line.startswith("# "):
                    continue
                lines += 1
                try:
                    if kind == ".jsonl":
                        post = json.loads(line)
                        tags = post.get("tags", post.get("hashtags"))
                        if not isinstance(tags, list):
                            raise ValueError("no tags list")
                        for t in set(map(str, tags)):
                            counts[t] += 1
                    else:
                        parts = line.split("\t")
                        counts[parts[0]] += int(parts[1]) if len(parts) > 1 else 1
                except (ValueError, AttributeError, IndexError, OverflowError):
                    bad += 1
    return counts, bad, lines


def read_tag_counts(path: str | os.PathLike, max_bad_fraction: float = 0.001) -> dict[str, int]:
    """Reads hashtag counts. Formats (optionally gzipped, chosen by extension):

    * ``.tsv`` / ``.txt``: ``hashtag<TAB>count`` per line; a line with only a hashtag counts 1;
      ``#`` at the very start of a line followed by a space is a comment.
    * ``.json``: an object ``{"hashtag": count, ...}`` or a list of ``[hashtag, count]`` pairs.
    * ``.jsonl``: one post per line, ``{"tags": [...]}`` (or ``"hashtags"``); each post adds 1 to
      each distinct tag it carries, so posts exported as JSON lines can be counted directly.
    Malformed lines are skipped and counted; more than ``max_bad_fraction`` of them is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hashtag-count file {path} does not exist.")
    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ".tsv"
    try:
        counts, bad, lines = _count_tags(path, kind)
    except (OSError, EOFError, UnicodeDecodeError) as e:  # not gzip, cut short, not UTF-8 text
        raise UserError(f"hashtag-count file {path} cannot be read ({e}).") from None
    if lines and bad / lines > max_bad_fraction:
        raise UserError(
            f"{path}: {bad} of {lines} entries are malformed (more than "
            f"{max_bad_fraction:.2%}); see `tagjax vocab build --help` for the formats."
        )
    if bad:
        print(f"warning: skipped {bad} malformed entries of {lines} in {path}", file=sys.stderr)
    return dict(counts)


# -- package data --------------------------------------------------------------------------------------

"""One hashtag string -> its meaning: the set of WordNet 3.0 noun synsets it can name.

This is the first half of the method's vocabulary (Mahajan et al., 2018; the SWAG follow-up states it
plainly): a canonical hashtag *is* a set of noun synsets, and hashtags with the same set merge into one
label. #brownbear and #ursusarctos both name {brown_bear.n.01} and merge; #dog names seven noun synsets
(the animal, a frump, a cad, a frank, a pawl, an andiron, ...) and stays a label of its own, distinct from
#domesticdog, which names only dog.n.01. :mod:`tagjax.vocab` groups hashtags into labels; this module
decides what one hashtag means.

Steps, in order (:class:`HashtagAnalyzer`):

1. **Normalize** (:func:`normalize`): NFKC, case folding, then every character that is not a letter or
   digit is removed (``#`` included). The result is the hashtag's *form*: ``"#Golden_Retriever"`` and
   ``"goldenretriever"`` share the form ``goldenretriever``. WordNet lemmas are normalized the same way, so
   compound hashtags written without spaces match multi-word lemmas (#icecream -> ice_cream).
2. **Meta-hashtags**: forms on a list (package data ``meta_hashtags.txt``) are dropped first, reason
   ``meta_hashtag`` (#tbt, #photooftheday, #love, #like4like ...).
3. **Morphology** (:meth:`NounTable.base_forms`): WordNet's own noun rules, as nltk's ``morphy`` applies
   them (the exception list ``noun.exc``, then one pass of suffix rules ``s``, ``ses``, ``ves``, ``xes``,
   ``zes``, ``ches``, ``shes``, ``men``, ``ies``), on forms instead of lemmas. The meaning is the union of
   the synsets of every base form that is a lemma, in WordNet's sense order: #dogs means what #dog means;
   #glasses means spectacles *and* the senses of glass, exactly as ``wn.synsets("glasses", "n")``.
   No noun synset at all: dropped, reason ``not_a_noun`` (#happy, #instagood, #selfie in WordNet 3.0).
4. **Sense policy** (off by default): ``"all"`` keeps the whole set; ``"first"`` keeps only WordNet's
   first sense, which merges more (#dog and #domesticdog become one label) but is wrong where sense 1 is
   not what photos show: tiger.n.01 is a fierce person, hotdog.n.01 a stunt performer, cake.n.01 a block
   of soap or wax.
5. **Visual filter** (:class:`VisualRule`): keeps a hashtag when enough of its sense frequency lies on
   senses a photo can show; otherwise reason ``non_visual``. See :class:`VisualRule` for the rule and its
   settings; its precision and recall on a hand-labelled list are measured by :func:`evaluate_rule`.
6. **Word splitting** (off by default, ``split_compounds``): a form with no noun meaning is split into
   the fewest known nouns of at least ``split_min_part`` letters (#sunsetbeach -> sunset + beach); each
   part then goes through steps 3-5 and the hashtag yields several labels. Off by default because a split
   can invent meanings the author did not mean, and it is only tried on forms that name no noun whole.

WordNet itself is not needed here: :class:`NounTable` is a compact precomputed table (form -> synset
indices, synset names, lexicographer files, SemCor counts, hypernyms, the exception list) shipped as package
data and rebuilt from WordNet by ``tagjax vocab rebuild-data``. Loading it takes a fraction of a second;
loading WordNet through nltk takes seconds per process.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
import unicodedata
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tagjax.errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
NOUN_TABLE_FILE = "wordnet_nouns.json.gz"
GLOSS_FILE = "wordnet_glosses.json.gz"
META_HASHTAGS_FILE = "meta_hashtags.txt"
VISUAL_LABELS_FILE = "visual_labels.tsv"
NOUN_TABLE_FORMAT = "tagjax-wordnet-nouns"
NOUN_TABLE_VERSION = 1

# WordNet's detachment rules for nouns (wndb(5WN) "morphy"; nltk MORPHOLOGICAL_SUBSTITUTIONS[NOUN]).
NOUN_SUBSTITUTIONS = (
    ("s", ""),
    ("ses", "s"),
    ("ves", "f"),
    ("xes", "x"),
    ("zes", "z"),
    ("ches", "ch"),
    ("shes", "sh"),
    ("men", "man"),
    ("ies", "y"),
)

# Drop reasons (the keys of CanonResult.dropped and of build statistics).
EMPTY = "empty"  # nothing left after normalization ("#", "#!!!")
META = "meta_hashtag"  # on the meta-hashtag list
NOT_A_NOUN = "not_a_noun"  # no WordNet noun synset for the form or its base forms
NON_VISUAL = "non_visual"  # refused by the visual rule
NOT_IN_VOCAB = (
    "not_in_vocab"  # a visual noun, but its synset set is not one of the vocabulary's labels
)
DUPLICATE = "duplicate"  # its label was already on the post (#dog #dogs)
ANCESTOR = "ancestor"  # dropped by the specificity option: a descendant label is on the same post
DROP_REASONS = (EMPTY, META, NOT_A_NOUN, NON_VISUAL, NOT_IN_VOCAB, DUPLICATE, ANCESTOR)

SENSE_POLICIES = ("all", "first")

_NON_ALNUM = re.compile(r"[\W_]+")


def normalize(tag: str) -> str:
    """A hashtag's form: NFKC, case-folded, with everything but letters and digits removed.

    ASCII input skips NFKC (it is the identity there) because this runs on every first-seen tag.
    """
    if tag.isascii():
        return _NON_ALNUM.sub("", tag.lower())
    return _NON_ALNUM.sub("", unicodedata.normalize("NFKC", tag).casefold())


def fold_accents(form: str) -> str:
    """``café`` -> ``cafe``: WordNet 3.0's lemmas are ASCII, hashtags often are not."""
    decomposed = unicodedata.normalize("NFKD", form)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _write_json_gz(path: Path, obj) -> None:
    """Deterministic gzip JSON (mtime 0), written atomically, so rebuilt package data diffs cleanly."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, sort_keys=False).encode()
    with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
        gz.write(raw)
    tmp.replace(path)


def _read_json_gz(path: Path):
    with gzip.open(path, "rb") as f:
        return json.loads(f.read())


class NounTable:
    """WordNet 3.0's nouns as plain tables, enough to give any hashtag form its meaning without nltk.

    Synsets are numbered 0..N-1 in offset order. ``keys`` maps a normalized lemma (form) to the synsets it
    names in WordNet's sense order; several lemmas with the same form (hotdog, hot_dog) are merged, the
    lemma spelled exactly like the form first. ``counts`` is each synset's SemCor frequency (the sum of its
    lemmas' tag counts), which orders senses and weights the visual rule.
    """

    def __init__(
        self,
        *,
        names,
        offsets,
        lexnames,
        lexname_ids,
        counts,
        hypernyms,
        keys,
        exceptions,
        key_counts,
    ):
        self.names: list[str] = names
        self.offsets: list[int] = offsets
        self.lexnames: list[str] = lexnames
        self.lexname_ids: list[int] = lexname_ids
        self.counts: list[int] = counts
        self.hypernyms: list[list[int]] = hypernyms
        self.keys: dict[str, list[int]] = keys
        self.exceptions: dict[str, list[str]] = exceptions
        # form -> SemCor count of each of its senses (aligned with keys[form]); only forms with a non-zero
        # count are stored, the rest count 0 everywhere.
        self.key_counts: dict[str, list[int]] = key_counts
        self._index_of_offset = {o: i for i, o in enumerate(offsets)}
        self._index_of_name: dict[str, int] | None = None
        self._ancestors: dict[int, frozenset[int]] = {}
        self._glosses: list[str] | None = None

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_wordnet(cls, wn) -> NounTable:
        """Builds the table from an nltk WordNet 3.0 reader (what ``tagjax vocab rebuild-data`` runs)."""

        synsets = sorted(wn.all_synsets("n"), key=lambda s: s.offset())
        index = {s.offset(): i for i, s in enumerate(synsets)}
        lexnames = [name for name, pos in LEXNAMES if pos == 1]
        lexname_index = {name: i for i, name in enumerate(lexnames)}
        names, offsets, lexname_ids, counts, hypernyms = [], [], [], [], []
        lemma_count: dict[
            tuple[int, str], int
        ] = {}  # (synset index, lemma name lowercased) -> count
        for i, s in enumerate(synsets):
            names.append(s.name())
            offsets.append(s.offset())
            lexname_ids.append(lexname_index[s.lexname()])
            total = 0
            for lemma in s.lemmas():
                c = lemma.count()  # nltk searches cntlist.rev on each call: call once per lemma
                if c:
                    key = (i, lemma.name().lower())
                    lemma_count[key] = lemma_count.get(key, 0) + c
                    total += c
            counts.append(total)
            parents = s.hypernyms() + s.instance_hypernyms()
            hypernyms.append(sorted({index[p.offset()] for p in parents}))
        # lemma -> noun synsets in sense order. nltk's public `synsets(lemma)` applies morphy (and would
        # mix in other forms' senses), so the raw index is read instead.
        by_form: dict[str, list[tuple[int, str, list[int]]]] = {}
        for lemma in wn.all_lemma_names("n"):
            form = normalize(lemma)
            if not form:
                continue
            offs = wn._lemma_pos_offset_map[lemma]["n"]
            exact = 0 if lemma.replace("_", "") == form else 1
            by_form.setdefault(form, []).append((exact, lemma, [index[o] for o in offs]))
        keys, key_counts = {}, {}
        for form in sorted(by_form):
            merged: list[int] = []
            sense_counts: dict[int, int] = {}
            for _, lemma, idxs in sorted(by_form[form], key=lambda t: (t[0], t[1])):
                merged.extend(i for i in idxs if i not in merged)
                for i in idxs:
                    sense_counts[i] = sense_counts.get(i, 0) + lemma_count.get(
                        (i, lemma.lower()), 0
                    )
            keys[form] = merged
            if any(sense_counts.values()):
                key_counts[form] = [sense_counts[i] for i in merged]
        exceptions: dict[str, list[str]] = {}
        for inflected, bases in sorted(wn._exception_map["n"].items()):
            form = normalize(inflected)
            base_forms = sorted({normalize(b) for b in bases} & keys.keys() - {form})
            if form and base_forms:
                exceptions[form] = base_forms
        table = cls(
            names=names,
            offsets=offsets,
            lexnames=lexnames,
            lexname_ids=lexname_ids,
            counts=counts,
            hypernyms=hypernyms,
            keys=keys,
            exceptions=exceptions,
            key_counts=key_counts,
        )
        table._glosses = [s.definition() for s in synsets]
        return table

    def save(self, path: Path, gloss_path: Path | None = None) -> None:
        _write_json_gz(
            path,
            {
                "format": NOUN_TABLE_FORMAT,
                "version": NOUN_TABLE_VERSION,
                "wordnet": "3.0",
                "lexnames": self.lexnames,
                "synsets": {
                    "name": self.names,
                    "offset": self.offsets,
                    "lexname": self.lexname_ids,
                    "count": self.counts,
                    "hypernyms": self.hypernyms,
                },
                "keys": self.keys,
                "key_counts": self.key_counts,
                "exceptions": self.exceptions,
            },
        )
        if gloss_path is not None:
            if self._glosses is None:
                raise ValueError(
                    "this table has no glosses to save (it was not built from WordNet)"
                )
            _write_json_gz(
                gloss_path,
                {
                    "format": NOUN_TABLE_FORMAT + "-glosses",
                    "version": NOUN_TABLE_VERSION,
                    "gloss": self._glosses,
                },
            )

    @classmethod
    def load(cls, path: Path | None = None) -> NounTable:
        """Reads a table file; with no path, the package's (cached per process)."""
        if path is None:
            return _default_table()
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"WordNet noun table {path} is missing; rebuild tagjax's package data with "
                "`tagjax vocab rebuild-data` (needs WordNet 3.0: `apt-get install wordnet-base`)."
            )
        d = _read_json_gz(path)
        if d.get("format") != NOUN_TABLE_FORMAT or d.get("version") != NOUN_TABLE_VERSION:
            raise UserError(
                f"{path} is not a version-{NOUN_TABLE_VERSION} tagjax WordNet noun table; "
                "rebuild it with `tagjax vocab rebuild-data`."
            )
        s = d["synsets"]
        table = cls(
            names=s["name"],
            offsets=s["offset"],
            lexnames=d["lexnames"],
            lexname_ids=s["lexname"],
            counts=s["count"],
            hypernyms=s["hypernyms"],
            keys=d["keys"],
            exceptions=d["exceptions"],
            key_counts=d["key_counts"],
        )
        table._gloss_path = path.with_name(GLOSS_FILE)
        return table

    # -- queries ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def base_forms(self, form: str) -> list[str]:
        """The forms that are lemmas among ``form`` and its morphological bases (nltk morphy, one pass)."""
        keys = self.keys
        if form in self.exceptions:
            candidates = [form, *self.exceptions[form]]
        else:
            candidates = [form]
            for old, new in NOUN_SUBSTITUTIONS:
                if form.endswith(old) and len(form) > len(old):
                    candidates.append(form[: -len(old)] + new)
        out = []
        for c in candidates:
            if c in keys and c not in out:
                out.append(c)
        return out

    def senses(self, form: str) -> tuple[int, ...]:
        """Every noun synset the form can name, in sense order; () when it names none."""
        return self.senses_and_counts(form)[0]

    def senses_and_counts(self, form: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The form's senses and how often its lemmas carry each sense in SemCor (summed over bases)."""
        bases = self.base_forms(form)
        if not bases and not form.isascii():
            bases = self.base_forms(fold_accents(form))
        if not bases:
            return (), ()
        keys, key_counts = self.keys, self.key_counts
        if len(bases) == 1:
            b = bases[0]
            senses = keys[b]
            return tuple(senses), tuple(key_counts.get(b) or (0,) * len(senses))
        acc: dict[int, int] = {}
        for b in bases:
            kc = key_counts.get(b)
            for n, i in enumerate(keys[b]):
                acc[i] = acc.get(i, 0) + (kc[n] if kc else 0)
        return tuple(acc), tuple(acc.values())

    def index_of_offset(self, offset: int) -> int:
        return self._index_of_offset[offset]

    def index_of_name(self, name: str) -> int:
        if self._index_of_name is None:
            self._index_of_name = {n: i for i, n in enumerate(self.names)}
        try:
            return self._index_of_name[name]
        except KeyError:
            raise UserError(
                f"{name!r} is not a WordNet 3.0 noun synset name (e.g. 'dog.n.01')."
            ) from None

    def wnid(self, i: int) -> str:
        return f"n{self.offsets[i]:08d}"

    def lexname(self, i: int) -> str:
        return self.lexnames[self.lexname_ids[i]]

    def ancestors(self, i: int) -> frozenset[int]:
        """All proper hypernyms of synset i (instance hypernyms included), transitively; memoized."""
        got = self._ancestors.get(i)
        if got is not None:
            return got
        # Iterative post-order so deep chains never hit the recursion limit.
        stack = [i]
        while stack:
            j = stack[-1]
            pending = [p for p in self.hypernyms[j] if p not in self._ancestors]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            acc: set[int] = set()
            for p in self.hypernyms[j]:
                acc.add(p)
                acc |= self._ancestors[p]
            self._ancestors[j] = frozenset(acc)
        return self._ancestors[i]

    def glosses(self) -> list[str]:
        """WordNet definitions, by synset index (a separate file, read only when a vocabulary is built)."""
        if self._glosses is None:
            path = getattr(self, "_gloss_path", DATA_DIR / GLOSS_FILE)
            if not Path(path).is_file():
                raise UserError(
                    f"WordNet gloss file {path} is missing; rebuild tagjax's package data "
                    "with `tagjax vocab rebuild-data`."
                )
            self._glosses = _read_json_gz(path)["gloss"]
        return self._glosses


@functools.cache
def _default_table() -> NounTable:
    return NounTable.load(DATA_DIR / NOUN_TABLE_FILE)


def read_word_list(path: Path) -> frozenset[str]:
    """A whitespace-separated list of hashtags (with or without '#'); each entry is normalized.

    ``#`` followed by a space (or alone) starts a comment, so ``#tbt #love  # throwbacks`` lists two tags.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hashtag list {path} does not exist; pass an existing file.")
    words = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if "#" in tokens:
            tokens = tokens[: tokens.index("#")]
        words.update(normalize(w) for w in tokens)
    words.discard("")
    return frozenset(words)


@functools.cache
def default_meta_hashtags() -> frozenset[str]:
    return read_word_list(DATA_DIR / META_HASHTAGS_FILE)


# WordNet 3.0's lexicographer files, in the order of their numbers (wndb(5WN) / lexnames(5WN)).
# Each line of the file is "NN<TAB>name<TAB>pos", pos 1 noun, 2 verb, 3 adjective, 4 adverb.
LEXNAMES = (
    ("adj.all", 3),
    ("adj.pert", 3),
    ("adv.all", 4),
    ("noun.Tops", 1),
    ("noun.act", 1),
    ("noun.animal", 1),
    ("noun.artifact", 1),
    ("noun.attribute", 1),
    ("noun.body", 1),
    ("noun.cognition", 1),
    ("noun.communication", 1),
    ("noun.event", 1),
    ("noun.feeling", 1),
    ("noun.food", 1),
    ("noun.group", 1),
    ("noun.location", 1),
    ("noun.motive", 1),
    ("noun.object", 1),
    ("noun.person", 1),
    ("noun.phenomenon", 1),
    ("noun.plant", 1),
    ("noun.possession", 1),
    ("noun.process", 1),
    ("noun.quantity", 1),
    ("noun.relation", 1),
    ("noun.shape", 1),
    ("noun.state", 1),
    ("noun.substance", 1),
    ("noun.time", 1),
    ("verb.body", 2),
    ("verb.change", 2),
    ("verb.cognition", 2),
    ("verb.communication", 2),
    ("verb.competition", 2),
    ("verb.consumption", 2),
    ("verb.contact", 2),
    ("verb.creation", 2),
    ("verb.emotion", 2),
    ("verb.motion", 2),
    ("verb.perception", 2),
    ("verb.possession", 2),
    ("verb.social", 2),
    ("verb.stative", 2),
    ("verb.weather", 2),
    ("adj.ppl", 3),
)

# Lexicographer files whose synsets are things a photo shows: creatures, objects, substances, foods,
# places, people, body parts and physical phenomena (clouds, snow, rainbows' neighbours).
VISUAL_LEXNAMES = (
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.food",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.substance",
    "noun.location",
)
# Synsets outside those files whose hyponyms are visible all the same: events that happen in the picture
# (a wedding is noun.event, a concert noun.communication), facial expressions (smile), colours, sports
# being played, fire (noun.event), dance, shapes. A synset is visual if it or any hypernym is listed.
# The first group are general nouns photos are tagged with that WordNet files under noun.Tops (the top
# of the hierarchy, mostly abstract): animal, person, food, plant. Their hyponyms are visual files anyway.
VISUAL_ANCHORS = (
    "animal.n.01",
    "person.n.01",
    "food.n.01",
    "plant.n.02",
    "social_event.n.01",
    "facial_expression.n.01",
    "color.n.01",
    "athletic_game.n.01",
    "sport.n.01",
    "fire.n.01",
    "dance.n.01",
    "dancing.n.01",
    "exercise.n.01",
    "shape.n.02",
    "visual_communication.n.01",
    "precipitation.n.03",
)
# Single synsets that are visual without their hyponyms: people.n.01 (noun.group, "any group of human
# beings", a crowd in the picture; its hyponyms include "the free" and "the dead") and arrow.n.01 (a mark
# pointing the way, noun.communication; its siblings include quotation marks).
VISUAL_SYNSETS = ("people.n.01", "arrow.n.01")


@dataclasses.dataclass(frozen=True)
class VisualRule:
    """Which hashtags name something a photo can show.

    A synset is *visual* when its lexicographer file is in ``lexnames``, it (or any of its hypernyms) is
    in ``anchors``, or it is one of ``synsets``. A hashtag is kept when the visual senses carry at least ``threshold`` of its sense
    weight, each sense weighing how often the hashtag's own lemma carries that sense in SemCor (WordNet's
    sense counts) plus ``smoothing`` (so unseen senses still count, and the word's frequent senses
    dominate; the lemma's count, not the synset's, because #mountain must not inherit the count of "lot"
    in the synset {mountain, lot, heap, ...}, "a large number or amount"): #love is mostly a feeling and is dropped although one rare sense
    is a person; #sunset is a time, a phenomenon and an event and is kept). Nouns alone are not enough:
    #sunset, #rainbow, #wedding, #fire and #smile are not all physical entities in WordNet, which is why
    the anchors exist. ``enabled=False`` keeps every noun.
    """

    lexnames: tuple[str, ...] = VISUAL_LEXNAMES
    anchors: tuple[str, ...] = VISUAL_ANCHORS
    synsets: tuple[str, ...] = VISUAL_SYNSETS
    threshold: float = 0.3
    smoothing: float = 1.0
    enabled: bool = True

    def to_dict(self) -> dict:
        return {
            "lexnames": list(self.lexnames),
            "anchors": list(self.anchors),
            "synsets": list(self.synsets),
            "threshold": self.threshold,
            "smoothing": self.smoothing,
            "enabled": self.enabled,
        }

    @classmethod
    def from_dict(cls, d: Mapping | None) -> VisualRule:
        if not d:
            return cls()
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(
                f"unknown visual-rule setting(s) {sorted(unknown)}; known: "
                "lexnames, anchors, synsets, threshold, smoothing, enabled."
            )
        d = dict(d)
        d.setdefault("synsets", ())  # saved before the field existed: reproduce that rule exactly
        for k in ("lexnames", "anchors", "synsets"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class _VisualJudge:
    """A VisualRule bound to a table: per-synset verdicts memoized, so each costs one dict lookup."""

    def __init__(self, table: NounTable, rule: VisualRule):
        self.table, self.rule = table, rule
        lex = set(rule.lexnames)
        unknown = lex - set(table.lexnames)
        if unknown:
            raise UserError(
                f"unknown WordNet lexicographer file(s) {sorted(unknown)} in the visual rule; "
                f"noun files are: {', '.join(table.lexnames)}."
            )
        self._lex_ok = [name in lex for name in table.lexnames]
        self._anchors = frozenset(table.index_of_name(n) for n in rule.anchors)
        self._single = frozenset(table.index_of_name(n) for n in rule.synsets)
        self._memo: dict[int, bool] = {}

    def synset_is_visual(self, i: int) -> bool:
        v = self._memo.get(i)
        if v is None:
            t = self.table
            v = (
                self._lex_ok[t.lexname_ids[i]]
                or i in self._anchors
                or i in self._single
                or not self._anchors.isdisjoint(t.ancestors(i))
            )
            self._memo[i] = v
        return v

    def share(self, senses: Sequence[int], counts: Sequence[int]) -> float:
        """The fraction of sense weight on visual senses (1.0 when the rule is disabled)."""
        if not self.rule.enabled:
            return 1.0
        a = self.rule.smoothing
        total = vis = 0.0
        for i, c in zip(senses, counts):
            w = c + a
            total += w
            if self.synset_is_visual(i):
                vis += w
        return vis / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class Meaning:
    """What one (part of a) hashtag names: its base form and synsets (table indices, sense order)."""

    form: str
    synsets: tuple[int, ...]
    visual_share: float


@dataclasses.dataclass(frozen=True)
class Analysis:
    """A hashtag explained: its form, what it means (several meanings when a compound was split), or
    why it was dropped (``reason``; then ``meanings`` may still hold the refused meaning, for display)."""

    tag: str
    form: str
    meanings: tuple[Meaning, ...]
    reason: str | None


@dataclasses.dataclass(frozen=True)
class HashtagOptions:
    """Everything that changes what a hashtag means; stored in a vocabulary's build settings so the
    canonicalizer of a saved vocabulary reproduces its build exactly."""

    sense_policy: str = "all"
    visual: VisualRule = dataclasses.field(default_factory=VisualRule)
    meta_hashtags: str = "default"  # "default" (package list), "none", or a path to a word list
    split_compounds: bool = False
    split_min_part: int = 3  # letters; shorter pieces make nonsense splits (the + rapist)
    split_max_parts: int = 3

    def __post_init__(self):
        if self.sense_policy not in SENSE_POLICIES:
            raise UserError(
                f"unknown sense policy {self.sense_policy!r}; use one of {SENSE_POLICIES}."
            )
        if self.split_min_part < 1 or self.split_max_parts < 2:
            raise UserError("split_min_part must be >= 1 and split_max_parts >= 2.")

    def to_dict(self) -> dict:
        return {
            "sense_policy": self.sense_policy,
            "visual": self.visual.to_dict(),
            "meta_hashtags": self.meta_hashtags,
            "split_compounds": self.split_compounds,
            "split_min_part": self.split_min_part,
            "split_max_parts": self.split_max_parts,
        }

    @classmethod
    def from_dict(cls, d: Mapping | None) -> HashtagOptions:
        d = dict(d or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown hashtag option(s) {sorted(unknown)}; known: {sorted(known)}.")
        d["visual"] = VisualRule.from_dict(d.get("visual"))
        return cls(**d)

    def meta_set(self) -> frozenset[str]:
        if self.meta_hashtags == "default":
            return default_meta_hashtags()
        if self.meta_hashtags in ("none", ""):
            return frozenset()
        return read_word_list(Path(self.meta_hashtags))


class HashtagAnalyzer:
    """Hashtag string -> :class:`Analysis` (no vocabulary involved; :mod:`tagjax.vocab` adds that)."""

    def __init__(self, options: HashtagOptions | None = None, table: NounTable | None = None):
        self.options = options or HashtagOptions()
        self.table = table or NounTable.load()
        self.meta = self.options.meta_set()
        self.judge = _VisualJudge(self.table, self.options.visual)

    def meaning(self, form: str) -> Meaning | None:
        """The meaning of a whole form (morphology + sense policy), or None when it names no noun."""
        senses, counts = self.table.senses_and_counts(form)
        if not senses:
            return None
        if self.options.sense_policy == "first":
            senses, counts = senses[:1], counts[:1]
        return Meaning(form, senses, self.judge.share(senses, counts))

    def analyze(self, tag: str) -> Analysis:
        form = normalize(tag)
        if not form:
            return Analysis(tag, form, (), EMPTY)
        if form in self.meta:
            return Analysis(tag, form, (), META)
        m = self.meaning(form)
        threshold = self.options.visual.threshold
        if m is not None:
            return Analysis(tag, form, (m,), None if m.visual_share >= threshold else NON_VISUAL)
        if self.options.split_compounds:
            parts = self.split(form)
            if parts:
                meanings = tuple(self.meaning(p) for p in parts)
                kept = tuple(
                    mm
                    for mm in meanings
                    if mm.visual_share >= threshold and mm.form not in self.meta
                )
                return Analysis(tag, form, kept or meanings, None if kept else NON_VISUAL)
        return Analysis(tag, form, (), NOT_A_NOUN)

    def split(self, form: str) -> list[str]:
        """The fewest nouns (each >= split_min_part letters) that spell ``form``; [] if there is none.

        Ties prefer longer leading parts (#sunsetbeach -> sunset + beach, not sun + setbeach).
        """
        n, lo, most = len(form), self.options.split_min_part, self.options.split_max_parts
        # best[i] = (parts, split) for form[i:], computed right to left.
        best: list[tuple[int, list[str]] | None] = [None] * (n + 1)
        best[n] = (0, [])
        for i in range(n - lo, -1, -1):
            for j in range(n, i + lo - 1, -1):  # longest piece first
                rest = best[j]
                if rest is None or rest[0] + 1 > most:
                    continue
                piece = form[i:j]
                if not self.table.base_forms(piece):
                    continue
                if best[i] is None or rest[0] + 1 < best[i][0]:
                    best[i] = (rest[0] + 1, [piece, *rest[1]])
        got = best[0]
        return got[1] if got is not None and got[0] >= 2 else []


# -- the hand-labelled evaluation list --------------------------------------------------------------


def read_visual_labels(path: Path | None = None) -> list[tuple[str, bool, str]]:
    """(hashtag, is_visual, split) rows of the committed hand-labelled list (package data)."""
    path = Path(path) if path is not None else DATA_DIR / VISUAL_LABELS_FILE
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tag, label, split = line.split("\t")
        if label not in ("visual", "nonvisual"):
            raise UserError(
                f"{path}: label of {tag!r} must be 'visual' or 'nonvisual', not {label!r}."
            )
        rows.append((tag, label == "visual", split))
    return rows


def split_of(tag: str) -> str:
    """The committed list's dev/test assignment: crc32 of the tag, even = dev."""
    return "dev" if zlib.crc32(tag.encode()) % 2 == 0 else "test"


def evaluate_rule(
    analyzer: HashtagAnalyzer, rows: Iterable[tuple[str, bool, str]], split: str | None = None
) -> dict:
    """Precision and recall of "kept" (positive) against the hand labels.

    precision = kept and visual / kept; recall = kept and visual / visual. Also lists the errors.
    """
    tp = fp = fn = tn = 0
    false_keeps, false_drops = [], []
    for tag, visual, s in rows:
        if split is not None and s != split:
            continue
        kept = analyzer.analyze(tag).reason is None
        if kept and visual:
            tp += 1
        elif kept:
            fp += 1
            false_keeps.append(tag)
        elif visual:
            fn += 1
            false_drops.append(tag)
        else:
            tn += 1
    return {
        "n": tp + fp + fn + tn,
        "visual": tp + fn,
        "kept": tp + fp,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "accuracy": (tp + tn) / max(1, tp + fp + fn + tn),
        "false_keeps": false_keeps,
        "false_drops": false_drops,
    }

"""Vocabularies: building (in1k / nouns), stable ids, save/load, the canonicalizer, the CLI."""

import collections
import gzip
import json

import numpy as np
import pytest

from tagjax import cli
from tagjax import hashtags as H
from tagjax import vocab as V
from tagjax.errors import UserError

# A small corpus in the shape real hashtag counts take: spellings, inflections, synonyms, meta tags.
COUNTS = {
    "#dog": 500,
    "dogs": 120,
    "#Dog": 30,
    "goldenretriever": 80,
    "golden_retrievers": 5,
    "brownbear": 40,
    "ursusarctos": 3,
    "domesticdog": 7,
    "tbt": 900,
    "photooftheday": 800,
    "sunset": 300,
    "sunsets": 20,
    "love": 1000,
    "happy": 400,
    "summer": 200,
    "beach": 150,
    "tiger": 60,
    "pantheratigris": 2,
    "icecream": 45,
    "ice_cream": 5,
    "cat": 90,
    "rarething": 1,
    "zebra": 1,
}


@pytest.fixture(scope="module")
def nouns():
    return V.build_vocabulary(COUNTS, mode="nouns", min_count=2)


@pytest.fixture(scope="module")
def in1k():
    return V.Vocabulary.load("in1k")


def test_inflections_and_spellings_merge_polysemy_does_not(nouns):
    dog = nouns.id_of("dog")
    assert dog is not None
    assert nouns.id_of("#Dogs") == nouns.id_of("DOG") == dog
    assert nouns.aliases_of(dog) == {"dog": 530, "dogs": 120}
    assert nouns.count_of(dog) == 650
    assert nouns.id_of("brownbear") == nouns.id_of("ursusarctos") is not None
    assert nouns.id_of("domesticdog") not in (None, dog)
    assert len(nouns.synsets_of(dog)) == 7 and nouns.synsets_of(nouns.id_of("domesticdog")) == [
        "dog.n.01"
    ]
    assert nouns.id_of("icecream") == nouns.id_of("ice cream")


def test_ids_ordered_by_count_then_name_and_drops_counted(nouns):
    counts = [nouns.count_of(i) for i in range(nouns.num_labels)]
    assert counts == sorted(counts, reverse=True)
    assert nouns.name_of(0) == "dog"
    assert nouns.id_of("sunset") is not None and nouns.id_of("tbt") is None
    dropped = nouns.stats["dropped"]
    assert dropped["meta_hashtag"] == {"forms": 3, "count": 2700}  # tbt, photooftheday, love
    assert dropped["not_a_noun"] == {"forms": 1, "count": 400}  # happy
    assert dropped["non_visual"] == {"forms": 1, "count": 200}  # summer
    assert dropped["below_min_count"] == {"forms": 2, "count": 2}  # zebra, rarething
    kept = sum(nouns.count_of(i) for i in range(nouns.num_labels))
    total_dropped = sum(d["count"] for d in dropped.values())
    assert kept + total_dropped == sum(COUNTS.values())


def test_top_k_keeps_the_most_frequent_labels(nouns):
    top = V.build_vocabulary(COUNTS, mode="nouns", min_count=2, top_k=3)
    assert top.names() == nouns.names()[:3]
    assert top.stats["dropped"]["beyond_top_k"]["forms"] == nouns.num_labels - 3


def test_canonicalizer_result_and_drop_reasons(nouns):
    canon = V.Canonicalizer(nouns)
    r = canon(["#Dogs", "tbt", "goldenretriever", "dog", "happy", "#", "summer", "zebra"])
    assert r.label_ids == tuple(sorted({nouns.id_of("dog"), nouns.id_of("goldenretriever")}))
    assert r.dropped == collections.Counter(
        {
            "meta_hashtag": 1,
            "duplicate": 1,
            "not_a_noun": 1,
            "empty": 1,
            "non_visual": 1,
            "not_in_vocab": 1,
        }
    )
    # Unseen inflections resolve through the noun table: same label.
    assert canon(["goldenretrievers"]).label_ids == (nouns.id_of("goldenretriever"),)
    assert canon([]).label_ids == ()


def test_descendant_option_keeps_golden_retriever_over_dog(nouns):
    dog, golden = nouns.id_of("dog"), nouns.id_of("goldenretriever")
    assert nouns.is_ancestor(dog, golden) and not nouns.is_ancestor(golden, dog)
    assert nouns.ancestors_mask[dog, golden] and not nouns.ancestors_mask[golden, dog]
    assert [dog, golden] in nouns.ancestor_pairs().tolist()
    plain = V.Canonicalizer(nouns)(["#dog", "#goldenretriever", "#beach"])
    specific = V.Canonicalizer(nouns, drop_ancestors=True)(["#dog", "#goldenretriever", "#beach"])
    assert set(plain.label_ids) == {dog, golden, nouns.id_of("beach")}
    assert set(specific.label_ids) == {golden, nouns.id_of("beach")}
    assert specific.dropped["ancestor"] == 1
    assert nouns.drop_ancestors([dog, golden]) == (golden,)


def test_in1k_covers_all_imagenet_synsets_with_more_labels(in1k):
    wnids = V.imagenet1k_wnids()
    assert len(wnids) == 1000
    covered = {w for i in range(in1k.num_labels) for w in in1k.wnids_of(i)} & set(wnids)
    assert len(covered) == 1000
    assert 1000 < in1k.num_labels < 2000
    assert all(set(in1k.wnids_of(i)) & set(wnids) for i in range(in1k.num_labels))
    assert in1k.id_of("brownbear") == in1k.id_of("ursusarctos") is not None
    # #tiger also names a person (tiger.n.01), #pantheratigris only the cat: two labels, one synset.
    assert in1k.id_of("tiger") != in1k.id_of("pantheratigris")
    assert in1k.stats["in1k_synsets_covered"] == 1000


def test_packaged_in1k_vocabulary_is_what_the_table_builds(in1k):
    rebuilt = V.build_vocabulary(None, mode="in1k", source="wordnet")
    assert rebuilt.fingerprint() == in1k.fingerprint()
    assert rebuilt.names() == in1k.names()


def test_in1k_with_corpus_counts(in1k):
    v = V.build_vocabulary(COUNTS, mode="in1k")
    assert v.settings["corpus_counts"] is True
    # Only ImageNet-aligned hashtags survive; the visual filter does not apply in this mode.
    # (#cat is 8 senses, none of them an ImageNet class; #dog's seven neither.)
    assert v.names() == [
        "goldenretriever",
        "tiger",
        "icecream",
        "brownbear",
        "pantheratigris",
        "zebra",
    ]
    assert v.count_of(0) == 85  # goldenretriever 80 + golden_retrievers 5
    assert v.stats["dropped"]["not_in1k"]["forms"] == 8
    assert v.stats["in1k_synsets_covered"] == 5
    assert in1k.num_labels > v.num_labels  # without corpus counts every WordNet form is a candidate


def test_sense_policy_first_merges_dog_and_domesticdog():
    v = V.build_vocabulary(COUNTS, mode="nouns", sense_policy="first")
    assert v.id_of("dog") == v.id_of("domesticdog")
    assert v.synsets_of(v.id_of("dog")) == ["dog.n.01"]
    assert V.Canonicalizer(v)(["tiger"]).label_ids == (v.id_of("tiger"),)
    assert v.synsets_of(v.id_of("tiger")) == ["tiger.n.01"]  # the documented caveat


@pytest.mark.parametrize("name", ["vocab.json", "vocab.json.gz"])
def test_save_load_identical(nouns, tmp_path, name):
    path = tmp_path / name
    nouns.save(path)
    back = V.Vocabulary.load(path)
    assert back == nouns
    assert back.fingerprint() == nouns.fingerprint()
    assert back.to_json() == nouns.to_json()
    for i in range(nouns.num_labels):
        assert back.synsets_of(i) == nouns.synsets_of(i)
        assert back.aliases_of(i) == nouns.aliases_of(i)
        assert back.ancestors_of(i) == nouns.ancestors_of(i)
    if name.endswith(".json"):
        d = json.loads(path.read_text())  # plain, human-readable JSON
        label = d["labels"][0]
        assert label["name"] == "dog" and label["synsets"][0] == {
            "wnid": "n02084071",
            "name": "dog.n.01",
            "gloss": "a member of the genus Canis (probably descended from the common wolf) that has "
            "been domesticated by man since prehistoric times; occurs in many breeds",
        }
        assert (
            d["settings"]["mode"] == "nouns" and d["settings"]["hashtags"]["sense_policy"] == "all"
        )
        # A hand edit that changes the labels is caught.
        d["labels"][0]["name"] = "doggo"
        path.write_text(json.dumps(d))
        with pytest.raises(UserError, match="fingerprint"):
            V.Vocabulary.load(path)


def test_fingerprint_depends_on_labels(nouns):
    other = V.build_vocabulary({**COUNTS, "zebra": 5}, mode="nouns", min_count=2)
    assert other.fingerprint() != nouns.fingerprint()
    assert (
        V.build_vocabulary(COUNTS, mode="nouns", min_count=2).fingerprint() == nouns.fingerprint()
    )


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        V.Vocabulary.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a tagjax vocabulary"):
        V.Vocabulary.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="mode"):
        V.build_vocabulary(COUNTS, mode="17k")


def test_read_tag_counts_formats(tmp_path):
    (tmp_path / "c.tsv").write_text("# comment\n#dog\t3\ncat\t2\nbird\n")
    assert V.read_tag_counts(tmp_path / "c.tsv") == {"#dog": 3, "cat": 2, "bird": 1}
    (tmp_path / "c.json").write_text(json.dumps({"dog": 3, "cat": 2}))
    assert V.read_tag_counts(tmp_path / "c.json") == {"dog": 3, "cat": 2}
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write('{"tags": ["dog", "cat", "dog"]}\n{"hashtags": ["dog"]}\n')
    assert V.read_tag_counts(tmp_path / "p.jsonl.gz") == {"dog": 2, "cat": 1}
    (tmp_path / "bad.tsv").write_text("dog\tmany\ncat\t2\n")
    with pytest.raises(UserError, match="malformed"):
        V.read_tag_counts(tmp_path / "bad.tsv")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.tsv.gz", b"not gzip", "cannot be read"),
        ("c.tsv", b"dog\t3\n\xff\xfe cat\t2\n", "cannot be read"),  # not UTF-8
        ("c.json", b'{"dog": 3, "cat": Infinity}', "malformed"),  # one of two entries
    ],
)
def test_unreadable_count_files_end_in_one_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        V.read_tag_counts(tmp_path / name)


def test_cli_build_show_lookup(tmp_path, capsys):
    counts = tmp_path / "counts.tsv"
    counts.write_text("".join(f"{t}\t{n}\n" for t, n in COUNTS.items()))
    out = tmp_path / "vocab.json"
    assert (
        cli.main(
            [
                "vocab",
                "build",
                "--counts",
                str(counts),
                "--mode",
                "nouns",
                "--min-count",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "dropped meta_hashtag" in text and f"wrote {out}" in text
    v = V.Vocabulary.load(out)
    assert v.fingerprint() == V.build_vocabulary(COUNTS, mode="nouns", min_count=2).fingerprint()

    assert cli.main(["vocab", "show", str(out), "--limit", "3"]) == 0
    text = capsys.readouterr().out
    assert f"{v.num_labels} labels" in text and "dog.n.01" in text

    assert (
        cli.main(
            [
                "vocab",
                "lookup",
                "--vocab",
                str(out),
                "--drop-ancestors",
                "#Dogs",
                "tbt",
                "sunset",
                "goldenretriever",
                "happy",
                "summer",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    dog, golden, sunset = v.id_of("dog"), v.id_of("goldenretriever"), v.id_of("sunset")
    assert lines[0].startswith(f"#Dogs\t-> label {dog} #dog\tsynsets: dog.n.01, frump.n.01")
    assert lines[1] == "tbt\t-> dropped: meta_hashtag"
    assert lines[2].startswith(f"sunset\t-> label {sunset} #sunset")
    assert lines[3].startswith(f"goldenretriever\t-> label {golden} #goldenretriever")
    assert lines[4] == "happy\t-> dropped: not_a_noun"
    assert lines[5].startswith("summer\t-> dropped: non_visual\tsummer.n.01")
    assert lines[6] == (
        "as one post: #sunset #goldenretriever; dropped ancestor=1, meta_hashtag=1, "
        "non_visual=1, not_a_noun=1"
    )

    assert cli.main(["vocab", "lookup", "--json", "tbt"]) == 0  # built-in in1k vocabulary
    e = json.loads(capsys.readouterr().out.splitlines()[0])
    assert e == {"tag": "tbt", "form": "tbt", "dropped": "meta_hashtag", "meanings": []}
    assert cli.main(["vocab", "lookup", "--vocab", str(tmp_path / "none.json"), "dog"]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_ancestors_mask_matches_is_ancestor(in1k):
    mask = in1k.ancestors_mask
    assert mask.shape == (in1k.num_labels,) * 2 and mask.dtype == np.bool_
    pairs = in1k.ancestor_pairs()
    assert mask.sum() == len(pairs) > 0
    a, d = pairs[0]
    assert in1k.is_ancestor(int(a), int(d)) and not mask.diagonal().any()


def test_drop_reasons_are_documented_constants():
    assert set(H.DROP_REASONS) >= {
        "meta_hashtag",
        "not_a_noun",
        "non_visual",
        "not_in_vocab",
        "duplicate",
        "ancestor",
        "empty",
    }


def test_split_compounds_give_several_labels(nouns):
    assert V.Canonicalizer(nouns)(["#sunsetbeach"]).dropped == collections.Counter(
        {"not_a_noun": 1}
    )
    split = V.Canonicalizer(nouns, split_compounds=True)
    r = split(["#sunsetbeach", "#beach"])
    assert r.label_ids == tuple(sorted({nouns.id_of("sunset"), nouns.id_of("beach")}))
    assert r.dropped == collections.Counter({"duplicate": 1})  # #beach again
    assert split.lookup("#summerdog") == nouns.id_of("dog")  # the non-visual part is left out


def test_cache_bound_keeps_results_identical(nouns):
    small = V.Canonicalizer(nouns, cache_size=4)
    big = V.Canonicalizer(nouns)
    posts = [["dog", "tbt", "sunset", "cats"], ["beach", "goldenretriever", "dog", "x"]] * 5
    assert [small(p) for p in posts] == [big(p) for p in posts]
    assert len(small._cache) <= 4

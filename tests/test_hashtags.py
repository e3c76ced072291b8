"""One hashtag -> its meaning (a set of WordNet noun synsets), the drop reasons and the visual filter."""

import subprocess
import sys

import pytest

from tagjax import hashtags as H


@pytest.fixture(scope="module")
def analyzer():
    return H.HashtagAnalyzer()


def names(analyzer, tag):
    a = analyzer.analyze(tag)
    assert len(a.meanings) == 1, a
    return [analyzer.table.names[i] for i in a.meanings[0].synsets]


def test_normalize_strips_hash_folds_case_and_unicode():
    assert H.normalize("#Golden_Retriever") == "goldenretriever"
    assert H.normalize("Ice-Cream!") == "icecream"
    assert H.normalize("＃ＤＯＧＳ") == "dogs"  # fullwidth: NFKC then casefold
    assert H.normalize("#Straße") == "strasse"
    assert H.normalize("#!!!") == ""


def test_inflections_and_compounds(analyzer):
    assert names(analyzer, "#dogs") == names(analyzer, "dog")
    assert len(names(analyzer, "dog")) == 7 and names(analyzer, "dog")[0] == "dog.n.01"
    assert names(analyzer, "geese")[0] == "goose.n.01"  # WordNet's exception list
    assert names(analyzer, "goldenretriever") == ["golden_retriever.n.01"]
    assert names(analyzer, "#GoldenRetrievers") == ["golden_retriever.n.01"]
    assert names(analyzer, "icecream") == ["ice_cream.n.01"]
    assert names(analyzer, "café") == ["cafe.n.01"]  # accents folded when WordNet has no such lemma


def test_synonyms_share_a_meaning_polysemous_tags_do_not(analyzer):
    assert names(analyzer, "brownbear") == names(analyzer, "ursusarctos") == ["brown_bear.n.01"]
    assert names(analyzer, "domesticdog") == ["dog.n.01"]
    assert set(names(analyzer, "dog")) != set(names(analyzer, "domesticdog"))


def test_meta_and_non_visual_tags_are_dropped_with_a_reason(analyzer):
    for tag in ("#tbt", "#photooftheday", "#love", "#like4like", "#instagood"):
        assert analyzer.analyze(tag).reason == H.META, tag
    assert analyzer.analyze("#happy").reason == H.NOT_A_NOUN
    assert analyzer.analyze("#").reason == H.EMPTY
    for tag in ("#summer", "#life", "#motivation"):
        assert analyzer.analyze(tag).reason == H.NON_VISUAL, tag


def test_visible_non_physical_tags_are_kept(analyzer):
    for tag in ("#sunset", "#rainbow", "#wedding", "#fire", "#smile", "#dog", "#beach"):
        assert analyzer.analyze(tag).reason is None, tag


def test_first_sense_policy_and_its_documented_caveats():
    first = H.HashtagAnalyzer(H.HashtagOptions(sense_policy="first"))
    assert names(first, "tiger") == ["tiger.n.01"]  # a fierce person, not the cat
    assert names(first, "hotdog") == ["hotdog.n.01"]  # a stunt performer
    assert names(first, "cake") == ["cake.n.01"]  # a block of soap or wax
    assert names(first, "dog") == names(first, "domesticdog") == ["dog.n.01"]  # these now merge
    assert first.table.lexname(first.analyze("tiger").meanings[0].synsets[0]) == "noun.person"


def test_word_splitting_is_optional(analyzer):
    assert analyzer.analyze("#sunsetbeach").reason == H.NOT_A_NOUN
    split = H.HashtagAnalyzer(H.HashtagOptions(split_compounds=True))
    a = split.analyze("#sunsetbeach")
    assert a.reason is None
    assert [m.form for m in a.meanings] == ["sunset", "beach"]
    assert split.analyze("#dogwood").meanings[0].form == "dogwood"  # a whole noun is never split


def test_visual_rule_is_configurable():
    off = H.HashtagAnalyzer(H.HashtagOptions(visual=H.VisualRule(enabled=False)))
    assert off.analyze("#summer").reason is None
    no_meta = H.HashtagAnalyzer(H.HashtagOptions(meta_hashtags="none"))
    assert no_meta.analyze("#tbt").reason == H.NOT_A_NOUN
    strict = H.HashtagAnalyzer(H.HashtagOptions(visual=H.VisualRule(threshold=0.99)))
    assert strict.analyze("#sunset").reason == H.NON_VISUAL
    with pytest.raises(H.UserError, match="lexicographer"):
        H.HashtagAnalyzer(H.HashtagOptions(visual=H.VisualRule(lexnames=("noun.nonsense",))))
    with pytest.raises(H.UserError, match="sense policy"):
        H.HashtagOptions(sense_policy="most")


# The filter's quality on the committed hand-labelled list (README "Vocabulary" reports these numbers).
# The rule was tuned on the dev half only; the test half is the honest estimate.
def test_visual_filter_precision_and_recall_on_labelled_list(analyzer):
    rows = H.read_visual_labels()
    assert len(rows) >= 300
    assert all(split == H.split_of(tag) for tag, _, split in rows)
    assert {v for _, v, _ in rows} == {True, False}
    test = H.evaluate_rule(analyzer, rows, "test")
    assert test["n"] > 250
    assert test["precision"] >= 0.92, test
    assert test["recall"] >= 0.85, test
    # Without the meta list, WordNet alone still separates most of them.
    bare = H.evaluate_rule(H.HashtagAnalyzer(H.HashtagOptions(meta_hashtags="none")), rows, "test")
    assert bare["precision"] >= 0.8 and bare["recall"] == test["recall"], bare


def test_table_matches_wordnet(wn, analyzer):
    """The precomputed table gives nltk's `synsets(form, 'n')` for lemmas and their inflections (the
    table exists so the hot path never loads WordNet), plus the senses of multi-word lemmas written the
    same way without spaces (hotdog = hotdog + hot_dog; adlaistevenson = Adlai_Stevenson)."""
    table = analyzer.table
    words = [w for w in sorted(table.keys) if w.isalpha()][::400]
    assert len(words) > 150
    for w in words:
        want = {s.offset() for s in wn.synsets(w, "n")}
        got = {table.offsets[i] for i in table.senses(w)}
        assert want <= got, w
    for w in ["dog", "dogs", "glasses", "mice", "geese", "churches", "boxes", "wolves", "women"]:
        assert {table.offsets[i] for i in table.senses(w)} == {
            s.offset() for s in wn.synsets(w, "n")
        }, w
    hot_dog = {s.offset() for s in wn.synsets("hot_dog", "n")} | {
        s.offset() for s in wn.synsets("hotdog", "n")
    }
    assert {table.offsets[i] for i in table.senses(H.normalize("hot_dog"))} == hot_dog


def test_hot_path_does_not_import_nltk():
    code = (
        "import sys\n"
        "from tagjax import vocab\n"
        "c = vocab.Canonicalizer(vocab.Vocabulary.load('in1k'))\n"
        "r = c(['#GoldenRetriever', 'tbt', 'tigers'])\n"
        "assert len(r.label_ids) == 2, r\n"
        "print('nltk' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

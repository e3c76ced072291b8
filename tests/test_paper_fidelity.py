"""The paper's recipe, vocabularies and sampling as tagjax implements them (docs/paper_fidelity.md).

Each test pins a number the docs state: the schedule's start, halvings and length, the batch-norm layout
on every documented device count, fine-tuning a paper checkpoint, the vocabulary modes, the visual filter
on the hashtags it used to drop, the ancestor rule, and what `natural` and `images` sampling weight.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import warnings

import numpy as np
import pytest

from tagjax import config as config_lib
from tagjax import hashtags as H
from tagjax import optim, records, sampling, transfer
from tagjax import vocab as V
from tagjax.configs import _paper

PAPER_CONFIGS = [
    "ig940m_1k5_32x8d",
    "ig940m_1k5_32x16d",
    "ig940m_1k5_32x32d",
    "ig940m_1k5_32x48d",
    "ig3b5_17k_32x16d",
]
# Every device count the paper configs, their docstrings and the README name.
DOCUMENTED_DEVICES = (8, 16, 32, 48, 56, 64, 112, 128, 168, 336)


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return config_lib.load(name)


# -- the schedule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, expected",
    [
        (1_200_000, 144_000_000),  # 120 passes: the short extreme
        (940_000_000, 1_983_605_808),  # IG-940M: ~2.0B images, ~2.1 passes
        (3_500_000_000, 7_000_000_000),  # IG-3.5B: 2 passes, the long extreme
    ],
)
def test_length_heuristic_interpolates_images_processed(images, expected):
    got = optim.paper_schedule_images(images, _paper.LENGTH_SHORT, _paper.LENGTH_LONG)
    assert got == expected
    if images == 940_000_000:
        assert 2.1 < got / images < 2.12


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_warm_up_from_0_1_and_halve_20_times(name):
    c = _load(name)
    dataset = 3_500_000_000 if name.startswith("ig3b5") else 940_000_000
    assert c.train.total_images == optim.paper_schedule_images(
        dataset, _paper.LENGTH_SHORT, _paper.LENGTH_LONG
    )
    s = optim.make_schedule(c.optim, c.train.batch_size, c.train.total_images)
    peak = 0.1 / 256 * 8064
    assert s.peak == pytest.approx(peak)
    lr = s.values_at([0, s.warmup_steps // 2, s.warmup_steps])
    np.testing.assert_allclose(
        lr, [0.1, 0.1 + (peak - 0.1) * (s.warmup_steps // 2) / s.warmup_steps, peak], rtol=1e-5
    )
    assert len(s.halving_steps) == 20
    after = s.values_at([h - 1 for h in s.halving_steps] + [s.total_steps])
    np.testing.assert_allclose(after, peak / 2.0 ** np.arange(21), rtol=1e-5)
    # Equally spaced after warm-up: the gaps differ by at most one step (rounding up to whole steps).
    gaps = np.diff((s.warmup_steps, *s.halving_steps))
    assert gaps.max() - gaps.min() <= 1
    assert c.optim.momentum == 0.9 and c.optim.nesterov is False
    assert c.model.dtype == "bfloat16"


def test_imagenet_only_runs_halve_13_times():
    """The paper's ImageNet runs: batch 3,072, rate 0.1/256 x 3,072, 13 halvings [R]."""
    c = _load("ig940m_1k5_32x8d").optim
    c.num_halvings = _paper.PAPER_HALVINGS_IMAGENET
    s = optim.make_schedule(c, 3072, 144_000_000)
    assert len(s.halving_steps) == 13
    np.testing.assert_allclose(s.values_at([0, s.warmup_steps]), [0.1, 1.2], rtol=1e-6)
    np.testing.assert_allclose(s.values_at([s.total_steps]), [1.2 / 2**13], rtol=1e-5)


def test_warmup_start_above_the_peak_starts_at_the_peak():
    c = _load("ig940m_1k5_32x8d").optim
    s = optim.make_schedule(c, 128, 10_000_000)  # peak 0.05 < the 0.1 start: no warm-down
    assert s.values_at([0])[0] == pytest.approx(0.05)


# -- batch-norm layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(_paper.MAX_MICRO_BATCH))
@pytest.mark.parametrize("devices", DOCUMENTED_DEVICES)
def test_bn_groups_of_24_whenever_some_layout_allows(model, devices):
    max_micro = _paper.MAX_MICRO_BATCH[model]
    lay = _paper.layout(devices, max_micro)
    per_device = 8064 // devices
    assert lay.grad_accum_steps * lay.micro == per_device
    assert lay.micro <= max_micro and lay.micro % lay.bn_group == 0
    possible = any(
        per_device % m == 0 and m % 24 == 0 for m in range(24, min(per_device, max_micro) + 1)
    )
    assert possible == (336 % devices == 0)
    if possible:
        assert lay.bn_group == 24 and not lay.warning
        # The fewest micro-batches that keep 24.
        assert not any(
            per_device % a == 0 and (per_device // a) % 24 == 0 and per_device // a <= max_micro
            for a in range(1, lay.grad_accum_steps)
        )
    else:
        assert lay.bn_group < 24 and f"groups of {lay.bn_group}" in lay.warning


def test_eight_gpus_32x8d_is_14_micro_batches_of_72():
    lay = _paper.layout(8, _paper.MAX_MICRO_BATCH["resnext101_32x8d"])
    assert (lay.grad_accum_steps, lay.micro, lay.bn_group) == (14, 72, 24)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_warns_loudly_when_24_is_impossible(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        c = config_lib.load(f"{name}:8")  # 8 divides 336: no warning
    assert c.model.bn_group_size == 24
    with pytest.warns(UserWarning, match="not the paper's 24"):
        c = config_lib.load(f"{name}:64")
    assert c.model.bn_group_size < 24


# -- fine-tuning a paper checkpoint -------------------------------------------------------------------


@pytest.mark.parametrize("devices, group", [(1, 16), (8, 16), (64, 4)])
def test_compatible_bn_group_for_the_default_batch(devices, group):
    assert transfer.compatible_bn_group(24, 256, devices) == group
    assert transfer.compatible_bn_group(24, 240, devices if 240 % devices == 0 else 1) == 24
    assert transfer.compatible_bn_group(0, 256, devices) == 0


def test_finetuning_a_bn24_checkpoint_with_the_default_transfer_config(tmp_path):
    """A checkpoint whose model keeps batch-norm statistics per 24 images, fine-tuned with
    configs/transfer_finetune.py's batch of 256: a group of 16 is chosen, said, and the step runs."""
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from tagjax import checkpoint, models

    pre = config_lib.load("tiny")
    pre.model.bn_group_size = 24
    model = models.create(pre.model, 16)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    ckpt = checkpoint.save_inference_checkpoint(
        tmp_path / "ckpt", variables, {"config": pre, "source": "test"}
    )
    root = tmp_path / "task"
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for cls, color in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.asarray(color) + rng.normal(0, 20, (36, 36, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    cfg = config_lib.load(
        "transfer_finetune",
        [
            f"--config.transfer.dataset={root}",
            "--config.data.image_size=32",
            "--config.data.eval_resize=36",
            "--config.data.eval_image_size=32",
            "--config.transfer.epochs=6",  # 6 x 48 images: more than one batch of 256
        ],
    )
    assert cfg.train.batch_size == 256 and cfg.transfer.bn_group_size == -1
    said = []
    result = transfer.run_finetune(
        cfg, ckpt, tmp_path / "ft", progress=False, log_fn=said.append, max_steps=1
    )
    assert any("groups of 24" in m and "groups of 16" in m for m in said), said
    meta = checkpoint.read_metadata(checkpoint.resolve(tmp_path / "ft"))
    assert meta["config"]["model"]["bn_group_size"] == 16
    assert result is not None
    with pytest.raises(Exception, match="does not divide"):
        bad = cfg.copy_and_resolve_references()
        bad.transfer.bn_group_size = 24
        transfer.prepare_finetune_config(bad, ckpt, 2, 48, num_devices=8, log_fn=said.append)


# -- vocabularies --------------------------------------------------------------------------------------


def test_nouns_paper_mode_on_a_counts_file(tmp_path):
    """The paper's 17k definition: every noun hashtag, no visual filter, no meta list, no splitting."""
    counts = tmp_path / "counts.tsv"
    counts.write_text(
        "dog\t50\ndogs\t20\nlove\t40\nhappiness\t30\nphotooftheday\t90\nsunsetbeach\t12\n"
        "goldenretriever\t8\nselfie\t70\nfood\t25\n"
    )
    tags = V.read_tag_counts(counts)
    paper = V.build_vocabulary(tags, mode="nouns_paper", split_compounds=True)
    filtered = V.build_vocabulary(tags, mode="nouns", split_compounds=True)
    names = set(paper.names())
    assert {"dog", "love", "happiness", "goldenretriever", "food"} <= names
    assert "photooftheday" not in names and "selfie" not in names  # not WordNet nouns
    assert "sunsetbeach" not in names  # forced: no compound splitting
    assert paper.count_of(paper.id_of("dog")) == 70  # #dog + #dogs
    opts = paper.settings["hashtags"]
    assert opts["visual"]["enabled"] is False and opts["meta_hashtags"] == "none"
    assert opts["sense_policy"] == "all" and opts["split_compounds"] is False
    assert paper.stats["dropped"]["not_a_noun"]["forms"] == 3
    # tagjax's filtered mode drops #love (meta list) and #happiness (not visual).
    assert {"love", "happiness"}.isdisjoint(filtered.names()) and "dog" in filtered.names()
    # The saved vocabulary canonicalizes exactly as it was built.
    paper.save(tmp_path / "v.json")
    back = V.Vocabulary.load(tmp_path / "v.json")
    got = V.Canonicalizer(back)(["#Love", "#happiness", "#tbt", "#dogs"])
    assert sorted(back.name_of(i) for i in got.label_ids) == ["dog", "happiness", "love"]
    top = V.build_vocabulary(tags, mode="nouns_paper", top_k=2)
    assert top.names() == ["dog", "love"]


def test_ig3b5_17k_config_uses_the_paper_vocabulary_mode():
    from tagjax.configs import ig3b5_17k_32x16d

    doc = ig3b5_17k_32x16d.__doc__
    mode = re.search(r"tagjax vocab build --mode (\S+) --top-k 17000", doc).group(1)
    assert mode == "nouns_paper" and mode in V.MODES
    assert _load("ig3b5_17k_32x16d").data.max_labels == 16


@pytest.mark.parametrize("tag", ["food", "animal", "person", "people", "arrow", "animals"])
def test_visual_filter_keeps_general_things_photos_show(tag):
    assert H.HashtagAnalyzer().analyze(tag).reason is None


def test_visual_filter_precision_and_recall_on_the_labelled_list():
    rows = H.read_visual_labels()
    assert {"food", "animal", "person", "people", "arrow"} <= {r[0] for r in rows if r[1]}
    result = H.evaluate_rule(H.HashtagAnalyzer(), rows)
    assert result["n"] == 605
    assert result["precision"] == pytest.approx(0.9457, abs=5e-4)
    assert result["recall"] == pytest.approx(0.9246, abs=5e-4)
    # Without this change's anchors and single synsets, the same list scores lower recall.
    old = H.VisualRule(anchors=H.VISUAL_ANCHORS[4:], synsets=())
    before = H.evaluate_rule(H.HashtagAnalyzer(H.HashtagOptions(visual=old)), rows)
    assert before["recall"] == pytest.approx(0.9106, abs=5e-4)
    assert {"food", "animal", "person", "people", "arrow"} <= set(before["false_drops"])


def test_visual_rule_saved_without_single_synsets_reproduces_the_old_rule():
    old = H.VisualRule.from_dict({"threshold": 0.3, "anchors": list(H.VISUAL_ANCHORS[4:])})
    assert old.synsets == ()
    assert H.HashtagAnalyzer(H.HashtagOptions(visual=old)).analyze("people").reason == H.NON_VISUAL


@pytest.fixture(scope="module")
def nouns():
    tags = "woman cat girl bird vehicle dog goldenretriever goldfinch car sportscar eagle tiger"
    return V.build_vocabulary({t: 10 for t in tags.split()}, mode="nouns")


@pytest.mark.parametrize(
    "general, specific", [("woman", "cat"), ("girl", "bird"), ("vehicle", "cat"), ("bird", "eagle")]
)
def test_ancestor_rule_ignores_senses_the_specific_tag_may_not_carry(nouns, general, specific):
    g, s = nouns.id_of(general), nouns.id_of(specific)
    assert not nouns.is_ancestor(g, s)
    got = V.Canonicalizer(nouns, drop_ancestors=True)([f"#{general}", f"#{specific}"])
    assert set(got.label_ids) == {g, s} and not got.dropped.get("ancestor")


@pytest.mark.parametrize(
    "general, specific", [("dog", "goldenretriever"), ("bird", "goldfinch"), ("car", "sportscar")]
)
def test_ancestor_rule_still_prefers_the_specific_tag(nouns, general, specific):
    g, s = nouns.id_of(general), nouns.id_of(specific)
    assert nouns.is_ancestor(g, s) and not nouns.is_ancestor(s, g)
    got = V.Canonicalizer(nouns, drop_ancestors=True)([f"#{general}", f"#{specific}"])
    assert got.label_ids == (s,) and got.dropped["ancestor"] == 1


def test_in1k_ancestor_pairs_and_speaker_magpie():
    v = V.Vocabulary.load("in1k")
    assert v.settings["ancestor_rule"] == V.ANCESTOR_RULE
    assert len(v.ancestor_pairs()) == 72  # 232 under any-sense ancestry
    assert not v.is_ancestor(v.id_of("speaker"), v.id_of("magpie"))
    assert v.is_ancestor(v.id_of("amphibian"), v.id_of("axolotl"))


def test_a_file_built_under_the_any_sense_rule_is_recomputed_on_load(tmp_path):
    with gzip.open(V.__file__.replace("vocab.py", "data/vocab_in1k.json.gz"), "rt") as f:
        d = json.load(f)
    del d["settings"]["ancestor_rule"]
    speaker, magpie = (
        next(e for e in d["labels"] if e["name"] == n) for n in ("speaker", "magpie")
    )
    magpie["ancestors"] = sorted({*magpie["ancestors"], speaker["id"]})
    (tmp_path / "old.json").write_text(json.dumps(d))
    v = V.Vocabulary.load(tmp_path / "old.json")
    assert not v.is_ancestor(speaker["id"], magpie["id"]) and len(v.ancestor_pairs()) == 72


def test_in1k_counts_and_the_bruin_example():
    """1,312 labels from WordNet 3.0: the most any synset-set canonicalization gives (docs explain ~1.5k)."""
    v = V.Vocabulary.load("in1k")
    t = v.table
    in1k = {t.index_of_offset(int(w[1:])) for w in V.imagenet1k_wnids()}
    forms = {f for f, senses in t.keys.items() if in1k & set(senses)}
    assert v.num_labels == 1312 and v.stats["in1k_synsets_covered"] == 1000
    assert len(forms) == 1804  # distinct hashtag forms that name an ImageNet-1k synset
    assert len({tuple(sorted(t.keys[f])) for f in forms}) == 1284  # their synset sets
    assert sum(len(label.synsets) > 1 for label in v.labels) == 507
    bear = v.id_of("brownbear")
    assert v.id_of("ursusarctos") == bear and v.synsets_of(bear) == ["brown_bear.n.01"]
    assert v.id_of("bruin") != bear
    assert v.synsets_of(v.id_of("bruin")) == ["bruin.n.01", "brown_bear.n.01"]


# -- sampling --------------------------------------------------------------------------------------------


def test_natural_weights_images_by_their_hashtags_and_images_is_uniform():
    """Image i carries k_i = 1 + i % 4 hashtags: `natural` draws it in proportion to k_i, `images` equally."""
    n, num_labels = 400, 40
    rng = np.random.default_rng(0)
    lists = [sorted(rng.choice(num_labels, 1 + i % 4, replace=False).tolist()) for i in range(n)]
    index = records.LabelIndex.from_lists(lists)
    inv = sampling.InvertedIndex.in_memory(index, num_labels)
    draws = 400_000
    natural = sampling.make_sampler("natural", seed=1, num_records=n, index=inv)
    hits = np.bincount(natural.sample(np.arange(draws)).record, minlength=n)
    k = np.asarray([len(x) for x in lists], float)
    by_k = collections.defaultdict(list)
    for i in range(n):
        by_k[k[i]].append(hits[i])
    share = {kk: np.sum(v) / draws for kk, v in by_k.items()}
    for kk in share:  # the share of draws on images with kk hashtags: kk * #images / sum k
        expected = kk * np.sum(k == kk) / k.sum()
        assert share[kk] == pytest.approx(expected, rel=0.02)
    images = sampling.make_sampler("images", seed=1, num_records=n)
    once = np.bincount(images.sample(np.arange(2 * n)).record, minlength=n)
    assert (once == 2).all()  # every image exactly once per pass

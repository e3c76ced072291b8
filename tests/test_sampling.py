"""Hashtag resampling and shuffled epochs (tagjax.sampling): distributions, determinism, memory."""

import pickle

import numpy as np
import pytest

from tagjax import records, sampling
from tagjax.errors import UserError

NUM_LABELS = 24


@pytest.fixture(scope="module")
def zipf_index():
    """3,000 images; hashtag h is on ~1500/(h+1) of them (Zipfian), 1+ hashtags per image."""
    rng = np.random.default_rng(0)
    n = 3000
    lists = [set() for _ in range(n)]
    for h in range(NUM_LABELS):
        for i in rng.choice(n, size=round(1500 / (h + 1)), replace=False):
            lists[i].add(h)
    for i in range(n):
        if not lists[i]:
            lists[i].add(int(rng.integers(NUM_LABELS)))
    return records.LabelIndex.from_lists([sorted(x) for x in lists])


def _lists_of(index):
    return [index.labels_of(i).tolist() for i in range(index.num_records)]


@pytest.mark.parametrize("mode", ["natural", "sqrt", "uniform"])
def test_drawn_hashtag_frequency_matches_n_to_the_alpha(zipf_index, mode):
    inv = sampling.InvertedIndex.in_memory(zipf_index, NUM_LABELS)
    sampler = sampling.make_sampler(mode, seed=3, num_records=zipf_index.num_records, index=inv)
    draws = 200_000
    d = sampler.sample(np.arange(draws))
    freq = np.bincount(d.label, minlength=NUM_LABELS) / draws
    n = zipf_index.counts(NUM_LABELS).astype(float)
    expected = n ** sampling.ALPHAS[mode] / (n ** sampling.ALPHAS[mode]).sum()
    sigma = np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(freq - expected) < 5 * sigma + 1e-4), (freq, expected)
    # The image is one that carries the drawn hashtag, chosen uniformly among them.
    for pos in range(0, draws, 997):
        assert d.label[pos] in zipf_index.labels_of(int(d.record[pos]))
    on_top = d.record[d.label == 0]
    carriers = inv.images_of(0)
    hits = np.bincount(np.searchsorted(carriers, on_top), minlength=len(carriers))
    chi2 = ((hits - hits.mean()) ** 2 / hits.mean()).sum()
    assert chi2 < len(carriers) + 5 * np.sqrt(2 * len(carriers))  # uniform within the hashtag


def test_sampling_modes_really_differ(zipf_index):
    inv = sampling.InvertedIndex.in_memory(zipf_index, NUM_LABELS)
    p = {
        m: sampling.make_sampler(m, 0, zipf_index.num_records, inv).label_probabilities()
        for m in ("natural", "sqrt", "uniform")
    }
    n = zipf_index.counts(NUM_LABELS)
    ratio = n[0] / n[-1]  # ~20: the most frequent hashtag against the rarest
    assert ratio > 10
    assert p["natural"][0] / p["natural"][-1] == pytest.approx(ratio, rel=1e-6)
    assert p["sqrt"][0] / p["sqrt"][-1] == pytest.approx(np.sqrt(ratio), rel=1e-6)
    assert p["uniform"][0] / p["uniform"][-1] == pytest.approx(1.0, rel=1e-6)


def test_hashtags_without_images_are_never_drawn():
    index = records.LabelIndex.from_lists([[0], [0, 2], [2]])
    inv = sampling.InvertedIndex.in_memory(index, 4)
    for mode in ("natural", "sqrt", "uniform"):
        d = sampling.make_sampler(mode, 0, 3, inv).sample(np.arange(5000))
        assert set(np.unique(d.label)) == {0, 2}


def test_stream_is_random_access_and_deterministic(zipf_index):
    inv = sampling.InvertedIndex.in_memory(zipf_index, NUM_LABELS)
    a = sampling.make_sampler("sqrt", 7, zipf_index.num_records, inv)
    b = sampling.make_sampler("sqrt", 7, zipf_index.num_records, inv)
    c = sampling.make_sampler("sqrt", 8, zipf_index.num_records, inv)
    whole = a.sample(np.arange(1000))
    pieces = [b.sample(np.arange(s, s + 100)) for s in range(900, -100, -100)][::-1]
    assert np.array_equal(whole.record, np.concatenate([p.record for p in pieces]))
    assert np.array_equal(whole.label, np.concatenate([p.label for p in pieces]))
    assert (c.sample(np.arange(1000)).record != whole.record).mean() > 0.9
    # A redraw (attempt 1) for a bad record is another, equally deterministic draw.
    assert not np.array_equal(a.sample(np.arange(1000), attempt=1).record, whole.record)
    assert np.array_equal(a.sample(np.arange(10), 1).record, b.sample(np.arange(10), 1).record)


@pytest.mark.parametrize("n", [1, 2, 1000, 4099])
def test_images_mode_visits_every_image_once_per_epoch(n):
    s = sampling.ImageSampler(n, seed=5)
    epochs = s.sample(np.arange(3 * n)).record.reshape(3, n)
    for e in epochs:
        assert np.array_equal(np.sort(e), np.arange(n))
    if n > 100:
        assert (epochs[0] != epochs[1]).mean() > 0.9  # reshuffled every epoch
        assert abs(np.corrcoef(epochs[0], np.arange(n))[0, 1]) < 0.1  # shuffled, not sorted
        other = sampling.ImageSampler(n, seed=6).sample(np.arange(n)).record
        assert (other != epochs[0]).mean() > 0.9


def test_inverted_index_file_matches_and_is_memory_mapped(tmp_path, zipf_index, monkeypatch):
    # Several chunks, so records are split across chunk boundaries.
    # Several chunks and several output passes, so records and hashtags straddle their boundaries.
    monkeypatch.setattr(sampling, "_INVERT_CHUNK_RECORDS", 300)
    monkeypatch.setattr(sampling, "_INVERT_BUFFER_PAIRS", 777)
    store = records.LabelStore.write(tmp_path, "train", _lists_of(zipf_index), NUM_LABELS)
    built = sampling.InvertedIndex.load_or_build(store, NUM_LABELS, tmp_path / "cache")
    for h in range(NUM_LABELS):
        expected = [i for i in range(zipf_index.num_records) if h in zipf_index.labels_of(i)]
        assert built.images_of(h).tolist() == expected
    # The second call reuses the cache file; pickling (into a worker) does not copy the id array.
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    again = sampling.InvertedIndex.load_or_build(store, NUM_LABELS, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files
    assert isinstance(again.images, np.memmap)
    assert len(pickle.dumps(again)) < 4 * len(zipf_index.labels) / 4
    assert np.array_equal(pickle.loads(pickle.dumps(again)).images_of(3), built.images_of(3))
    # Memory per image: 4 bytes per (image, hashtag) pair, as documented.
    assert again.images.dtype == np.uint32 and again.images.nbytes == 4 * len(zipf_index.labels)
    # The chunked multi-pass build and the in-memory one agree entry for entry.
    in_memory = sampling.InvertedIndex.in_memory(zipf_index, NUM_LABELS)
    assert np.array_equal(np.asarray(again.images), in_memory.images)


def test_damaged_label_store_is_refused(tmp_path):
    store = records.LabelStore.write(tmp_path, "train", [[0, 1], [2]], 3)
    np.save(store.counts_path, np.asarray([1, 1, 0]))  # the counts no longer match the ids
    with pytest.raises(UserError, match="damaged"):
        sampling.InvertedIndex.build(store, 3, tmp_path / "index.npy")


def test_label_ids_outside_the_vocabulary_are_refused():
    index = records.LabelIndex.from_lists([[0], [5]])
    with pytest.raises(UserError, match="outside"):
        sampling.InvertedIndex.in_memory(index, 3)


def test_unknown_mode_is_refused():
    with pytest.raises(UserError, match="sampling"):
        sampling.make_sampler("zipf", 0, 10)


def test_uniforms_are_uniform_and_keyed():
    u = sampling.uniforms(0, sampling.STREAM_AUGMENT, np.arange(20_000), 4)
    assert u.shape == (20_000, 4) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    one = sampling.uniforms(0, sampling.STREAM_AUGMENT, 123, 4)
    assert np.array_equal(one, u[123])
    assert not np.array_equal(one, sampling.uniforms(0, sampling.STREAM_NOISE, 123, 4))

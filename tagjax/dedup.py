"""Duplicate and near-duplicate images: hashes, candidate search by hash grouping, and the keep rule.

Three kinds of copies reach a scraped corpus: byte- or pixel-identical re-uploads, re-encoded or resized
copies (the same photo re-shared, a clipart exported at two sizes, recoloured variants of one drawing),
and copies of evaluation images, which make held-out numbers lie. The builder removes all three:

* **exact**: :func:`content_hash` of the stored image (normalized pixels, JPEG-encoded): identical
  pictures match even when their files differ (PNG vs JPEG, different metadata).
* **near**: :func:`phash`, a 64-bit DCT perceptual hash (grayscale, area-averaged to 64 px then 32x32
  Lanczos-resampled, the 8x8 lowest frequencies, one bit per coefficient above their median). Two
  images are near duplicates when the Hamming distance of their hashes is at most a threshold. The
  default was tuned on real openclipart pairs (``benchmarks/dedup_threshold.py``; numbers and the
  reasoning in benchmarks/README.md).
* **evaluation**: training images within a threshold of any evaluation image (a folder, or a TFDS
  split, hashed by tagjax.eval_sets) are removed and listed in the build report.

Finding pairs (:func:`near_pairs`) does not compare all n^2 pairs: by the pigeonhole principle, two
64-bit hashes within distance t agree exactly on at least one of t+1 disjoint bit chunks, so images are
grouped by each chunk value and compared only inside groups. The Beam pipeline uses the same chunks as
GroupByKey keys (:func:`chunk_keys`); the local builder sorts by them. Both find exactly the pairs within
the threshold.

The keep rule (:func:`resolve`) is deterministic and independent of input order: rank every image by
(larger source resolution, more labels, smaller post id); within each connected group of near duplicates
walk the images best-first and keep one unless a neighbour was already kept. Every group's best image is
always kept. The group's best post id is also the group's *root*, which the train/held-out split is keyed
on, so near duplicates never straddle the split even where a chain of them keeps two.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Hashable, Iterable, Mapping, Sequence

import cv2
import numpy as np
from PIL import Image

HASH_BITS = 64
_DCT_SIZE = 32
_PRE_SIZE = 64  # images are area-averaged to at most this size before the Lanczos step to _DCT_SIZE
_LOW = 8


@dataclasses.dataclass(frozen=True)
class DedupOptions:
    """Distances are Hamming distances between 64-bit perceptual hashes (0 = identical hash)."""

    exact: bool = True  # remove identical pictures (content hash)
    # Tuned on openclipart (benchmarks/README.md): at 4, 95% of resized+recompressed copies match and
    # nearly all matching distinct files are recoloured or re-exported variants of one drawing; from 6
    # on, different playing cards and flags start to match. Distances are nearly always even (a hash of
    # a non-blank image has exactly 32 bits set, one per coefficient above the median).
    near_threshold: int = (
        4  # near duplicates: distance <= this; -1 turns near-duplicate removal off
    )
    # Looser for evaluation images: a false match costs one training image, a miss inflates held-out
    # numbers.
    eval_threshold: int = 6


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: X_dct = C @ X @ C.T."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


_DCT = _dct_matrix(_DCT_SIZE)


def phash(pixels: np.ndarray) -> int:
    """64-bit perceptual hash of an RGB (or gray) uint8 image, as a Python int.

    The gray image is area-averaged to at most 64 px a side (OpenCV, cheap), then Lanczos-resampled to
    32x32 (PIL): on the 256 px images a build stores, this costs ~0.17 ms against ~0.41 ms for one
    Lanczos pass over the whole image, and hashes of images up to 64 px are unchanged. Copies matched
    at each threshold and pairs among distinct files are the same as with the single Lanczos pass
    (measured in benchmarks/README.md, "Near-duplicate threshold"), so the threshold stays.
    """

    pixels = np.asarray(pixels, dtype=np.uint8)
    gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels
    height, width = gray.shape
    if height > _PRE_SIZE or width > _PRE_SIZE:
        gray = cv2.resize(
            gray, (min(width, _PRE_SIZE), min(height, _PRE_SIZE)), interpolation=cv2.INTER_AREA
        )
    # Lanczos for the last step, not a box filter: it keeps more resized+recompressed copies within
    # the threshold (benchmarks/README.md).
    small = Image.fromarray(gray).resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.LANCZOS)
    x = np.asarray(small, dtype=np.float64)
    low = (_DCT @ x @ _DCT.T)[:_LOW, :_LOW].ravel()
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def content_hash(stored_jpeg: bytes) -> str:
    """Hash (hex) of an image as the dataset stores it (tagjax.images.process: normalized pixels, then a
    deterministic JPEG encoder): identical pictures match whatever their file format, and so do
    pictures whose pixel differences do not survive the encoding, which would be identical records.
    Hashing the ~30 kB JPEG instead of the ~260 kB of pixels it encodes is ~8x cheaper."""
    return hashlib.blake2b(bytes(stored_jpeg), digest_size=16, person=b"tagjax-image").hexdigest()


def hamming(a: int, b: int) -> int:
    return (int(a) ^ int(b)).bit_count()


def chunk_layout(threshold: int) -> list[tuple[int, int]]:
    """(shift, width) of threshold+1 disjoint chunks covering the 64 bits, as even as possible."""
    if not 0 <= threshold < HASH_BITS // 2:
        raise ValueError(f"threshold must be in [0, {HASH_BITS // 2 - 1}], got {threshold}")
    m = threshold + 1
    widths = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
    layout, shift = [], 0
    for w in widths:
        layout.append((shift, w))
        shift += w
    return layout


def chunk_keys(h: int, threshold: int) -> list[tuple[int, int]]:
    """(chunk index, chunk value) keys; two hashes within ``threshold`` share at least one key."""
    return [(i, (int(h) >> s) & ((1 << w) - 1)) for i, (s, w) in enumerate(chunk_layout(threshold))]


def near_pairs(hashes: Sequence[int] | np.ndarray, threshold: int) -> np.ndarray:
    """All index pairs (i < j) whose hashes are within ``threshold``: int64 [k, 3] rows (i, j, distance).

    Sort-based grouping by chunk: for each chunk, after sorting by its value, element p is compared with
    p+1, p+2, ... while they share the value; the active set shrinks each step, so the work is the number
    of same-chunk pairs, vectorized.
    """
    h = (
        np.asarray([int(x) for x in hashes], dtype=np.uint64)
        if not isinstance(hashes, np.ndarray)
        else hashes.astype(np.uint64)
    )
    n = len(h)
    found = []
    if n < 2 or threshold < 0:
        return np.zeros((0, 3), np.int64)
    for shift, width in chunk_layout(threshold):
        keys = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sk, sh = keys[order], h[order]
        active = np.arange(n - 1)
        k = 1
        while active.size:
            j = active + k
            ok = j < n
            active, j = active[ok], j[ok]
            same = sk[j] == sk[active]
            active, j = active[same], j[same]
            if not active.size:
                break
            d = np.bitwise_count(sh[active] ^ sh[j]).astype(np.int64)
            hit = d <= threshold
            if hit.any():
                a, b = order[active[hit]], order[j[hit]]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b), d[hit]], axis=1))
            k += 1
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    _, first = np.unique(pairs[:, 0] * n + pairs[:, 1], return_index=True)
    return pairs[np.sort(first)]


def cross_pairs(queries: Sequence[int], references: Sequence[int], threshold: int) -> np.ndarray:
    """Pairs (query index, reference index, distance) within ``threshold`` between two sets."""
    nq = len(queries)
    if nq == 0 or len(references) == 0 or threshold < 0:
        return np.zeros((0, 3), np.int64)
    pairs = near_pairs([*queries, *references], threshold)
    mixed = (pairs[:, 0] < nq) & (pairs[:, 1] >= nq)
    out = pairs[mixed].copy()
    out[:, 1] -= nq
    return out


def rank_key(post_id: str, source_pixels: int, num_labels: int) -> tuple:
    """Smaller is better: the copy kept is the larger source, then the one with more labels, then the
    smaller post id (a total order, so the choice never depends on input order)."""
    return (-int(source_pixels), -int(num_labels), str(post_id))


@dataclasses.dataclass
class Resolution:
    """What :func:`resolve` decided for the nodes that had at least one near neighbour."""

    dropped: dict  # node -> (kept neighbour that displaced it, distance)
    root: dict  # node -> its group's best node (nodes absent here are their own root)


def resolve(
    ranks: Mapping[Hashable, tuple], edges: Iterable[tuple[Hashable, Hashable, int]]
) -> Resolution:
    """Greedy best-first keep rule inside each connected group of near duplicates (module docstring).

    ``ranks`` must hold every node that appears in ``edges``; nodes without edges need not be given
    (they are kept and are their own root).
    """
    adjacency: dict = collections.defaultdict(list)
    parent: dict = {}

    def find(x):
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for a, b, d in edges:
        adjacency[a].append((b, int(d)))
        adjacency[b].append((a, int(d)))
        ra, rb = find(a), find(b)
        if ra != rb:
            # The better-ranked root becomes the parent: a group's root ends up as its best node.
            if ranks[rb] < ranks[ra]:
                ra, rb = rb, ra
            parent[rb] = ra
    nodes = sorted(adjacency, key=lambda x: ranks[x])
    kept: set = set()
    dropped: dict = {}
    for node in nodes:
        blockers = [(ranks[nb], nb, d) for nb, d in adjacency[node] if nb in kept]
        if blockers:
            _, nb, d = min(blockers)
            dropped[node] = (nb, d)
        else:
            kept.add(node)
    return Resolution(dropped=dropped, root={x: find(x) for x in nodes})


def best_of_groups(keys: Mapping[Hashable, Hashable], ranks: Mapping[Hashable, tuple]) -> dict:
    """Exact grouping: for every node whose key another node shares, the group's best node (itself for
    the best). Used for content hashes (exact duplicates) and for identical perceptual hashes, which
    have identical neighbourhoods, so collapsing them before :func:`resolve` changes no decision."""
    groups: dict = collections.defaultdict(list)
    for node, key in keys.items():
        groups[key].append(node)
    best = {}
    for members in groups.values():
        if len(members) > 1:
            top = min(members, key=lambda x: ranks[x])
            for m in members:
                best[m] = top
    return best

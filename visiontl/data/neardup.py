"""Near-duplicate search over 64-bit image hashes, in time and memory that grow with the images.

:func:`near_duplicate_pairs` lists every pair of hashes within a Hamming distance. A data check
cannot report pairs: a folder of N near-identical images (a slide scanned in overlapping tiles, a
burst of video frames, a synthetic set) has ~N^2 / 2 of them. :func:`near_duplicate_clusters`
therefore searches each distinct hash once, joins near-duplicate hashes into clusters (connected
components) and reports per image, so its output is linear in the number of images:

* one cluster id per image (``-1``: no near duplicate);
* for every image, its closest near duplicate in an earlier split, if any (what leaks from train
  into val / test).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["NearDuplicates", "near_duplicate_clusters", "near_duplicate_pairs"]

_MAX_CHUNKS = 8  # pigeonhole chunks of at least 8 bits; larger thresholds compare every pair


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[np.ascontiguousarray(x, dtype=np.uint64).view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def _as_hashes(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    if isinstance(hashes, np.ndarray) and hashes.dtype == np.uint64:
        return hashes
    return np.asarray([int(x) for x in hashes], dtype=np.uint64)


def near_duplicate_pairs(hashes: Sequence[int] | np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)``, ``i < j``, of 64-bit hashes at most ``threshold`` bits apart.

    Multi-index hashing: the 64 bits are cut into ``threshold + 1`` chunks; two hashes that differ
    in at most ``threshold`` bits agree exactly on at least one chunk (pigeonhole). For each chunk
    the hashes are sorted by that chunk's value and only hashes inside a run of equal values are
    compared (popcount of the XOR), so the work is the sum of the squared run lengths: with 13-bit
    chunks (threshold 4) 50,000 spread-out hashes make ~10^5 comparisons instead of ~10^9. Above
    threshold 7 the chunks would be too short to prune, so every pair is compared (one run).

    Args:
        hashes: unsigned 64-bit hashes (Python ints or a ``uint64`` array).
        threshold: largest Hamming distance reported (``0`` gives equal hashes).

    Returns:
        The pairs sorted by ``(i, j)``, each once.
    """
    i, j, dist = _pair_arrays(_as_hashes(hashes), threshold)
    return [(int(a), int(b), int(d)) for a, b, d in zip(i, j, dist)]


def _pair_arrays(h: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`near_duplicate_pairs` as three int64 arrays ``(i, j, distance)``."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}.")
    n = len(h)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return empty, empty, empty
    if threshold + 1 <= _MAX_CHUNKS:
        bounds = np.linspace(0, 64, threshold + 2).round().astype(int)
    else:  # one empty chunk: every key is 0, so every pair is compared
        bounds = np.array([0, 0])
    found: list[np.ndarray] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = np.uint64((1 << int(hi - lo)) - 1)
        found += _equal_key_pairs(h, (h >> np.uint64(lo)) & mask, threshold)
    if not found:
        return empty, empty, empty
    codes = np.unique(np.concatenate(found))
    i, j = codes // n, codes % n
    return i, j, _popcount(h[i] ^ h[j])


def _equal_key_pairs(h: np.ndarray, keys: np.ndarray, threshold: int) -> list[np.ndarray]:
    """Codes ``i * n + j`` (``i < j``) of pairs with equal ``keys`` and hashes within ``threshold``.

    Offset by offset, only the sorted positions whose run of equal keys still reaches ``offset``
    further are compared: a long run costs its own length squared, not the whole array's length.
    """
    n = len(h)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, n])
    end = np.repeat(starts + lengths, lengths)  # exclusive end of each position's run
    pos = np.flatnonzero(end - np.arange(n) > 1)
    out = []
    offset = 1
    while True:
        pos = pos[pos + offset < end[pos]]
        if not pos.size:
            return out
        a, b = order[pos], order[pos + offset]
        close = _popcount(h[a] ^ h[b]) <= threshold
        a, b = a[close], b[close]
        out.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
        offset += 1


class NearDuplicates:
    """What :func:`near_duplicate_clusters` found; every array is indexed by image.

    Attributes:
        cluster: cluster id of each image, ``-1`` for an image without a near duplicate (copies
            of one image, same ``group``, are not near duplicates of each other).
        sizes: distinct groups (images, when no two share a group) per cluster id.
        distances: ``(smallest, largest)`` Hamming distance of the near-duplicate links inside
            each cluster (equal hashes count as distance 0).
        partner: for each image, its closest near duplicate in an earlier split (smallest distance,
            then earliest split, then smallest ``order``), ``-1`` when there is none.
        partner_distance: that partner's distance, ``-1`` when there is none.
    """

    def __init__(self, cluster: np.ndarray, sizes: np.ndarray, distances: np.ndarray, partner: np.ndarray,
                 partner_distance: np.ndarray) -> None:
        self.cluster, self.sizes, self.distances = cluster, sizes, distances
        self.partner, self.partner_distance = partner, partner_distance


def near_duplicate_clusters(hashes: Sequence[int] | np.ndarray, threshold: int,
                            rank: Sequence[int] | np.ndarray | None = None,
                            group: Sequence[int] | np.ndarray | None = None,
                            order: Sequence[int] | np.ndarray | None = None) -> NearDuplicates:
    """Near-duplicate clusters and cross-split partners of images given by their 64-bit hashes.

    Each distinct hash is searched once (:func:`near_duplicate_pairs`); images with equal or near
    hashes are joined into clusters (connected components: in a chain ``a ~ b ~ c``, ``a`` and
    ``c`` may be further apart than ``threshold``). Time and memory grow with the number of images
    and of distinct near hash pairs, never with the number of image pairs.

    Args:
        hashes: one unsigned 64-bit hash per image.
        threshold: largest Hamming distance of a near duplicate.
        rank: split rank per image (``0`` train, ``1`` val, ...; ``-1``: take no part in the
            partner search, e.g. unlabelled images). Default: all ``0`` (no partners).
        group: images with the same group id (identical pixels, found elsewhere) are never each
            other's partner. Default: every image its own group.
        order: tie-break among equally close partners (smaller first, e.g. the rank of the path).
            Default: the image index.

    Returns:
        A :class:`NearDuplicates` over the images.
    """
    h = _as_hashes(hashes)
    n = len(h)
    rank = np.zeros(n, dtype=np.int64) if rank is None else np.asarray(rank, dtype=np.int64)
    group = np.arange(n) if group is None else np.asarray(group, dtype=np.int64)
    order = np.arange(n) if order is None else np.asarray(order, dtype=np.int64)
    uniq, image_hash = np.unique(h, return_inverse=True)
    image_hash = image_hash.ravel()
    ui, uj, ud = _pair_arrays(uniq, threshold)
    n_hash = len(uniq)
    # clusters of distinct hashes, then of images
    links = coo_matrix((np.ones(len(ui), dtype=np.int8), (ui, uj)), shape=(n_hash, n_hash))
    _, hash_cluster = connected_components(links, directed=False)
    _, one_per_group = np.unique(group, return_index=True)  # identical pixels share a hash: count them once
    per_hash = np.bincount(image_hash[one_per_group], minlength=n_hash)
    cluster_sizes = np.bincount(hash_cluster, weights=per_hash).astype(np.int64)
    keep = cluster_sizes >= 2
    new_id = np.full(len(cluster_sizes), -1, dtype=np.int64)
    new_id[keep] = np.arange(int(keep.sum()))
    cluster = new_id[hash_cluster[image_hash]]
    sizes = cluster_sizes[keep]
    low = np.full(len(sizes), 65, dtype=np.int64)
    high = np.full(len(sizes), -1, dtype=np.int64)
    shared = per_hash >= 2  # equal hashes of distinct groups: distance 0 inside the cluster
    np.minimum.at(low, new_id[hash_cluster[shared]], 0)
    np.maximum.at(high, new_id[hash_cluster[shared]], 0)
    np.minimum.at(low, new_id[hash_cluster[ui]], ud)
    np.maximum.at(high, new_id[hash_cluster[ui]], ud)
    partner, partner_distance = _partners(image_hash, n_hash, ui, uj, ud, rank, group, order)
    return NearDuplicates(cluster, sizes, np.stack([low, high], axis=1), partner, partner_distance)


def _partners(image_hash: np.ndarray, n_hash: int, ui: np.ndarray, uj: np.ndarray, ud: np.ndarray,
              rank: np.ndarray, group: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest near duplicate of each image in an earlier split (see :class:`NearDuplicates`).

    For each split rank ``r``, the images of earlier ranks form the pool. Per distinct hash the
    pool's best image (smallest (rank, order)) is kept, plus the best of another group (so that an
    image is not its own partner through a copy). An image's candidates are then its own hash's
    best (distance 0) and the best of every near hash (one array operation over the hash links).
    """
    n = len(image_hash)
    partner = np.full(n, -1, dtype=np.int64)
    partner_distance = np.full(n, -1, dtype=np.int64)
    ranks = np.unique(rank[rank >= 0])
    if len(ranks) < 2:
        return partner, partner_distance
    position = np.empty(n, dtype=np.int64)  # tie-break position: (rank, order) sorted
    by_tie = np.lexsort((order, rank))
    position[by_tie] = np.arange(n)
    src = np.r_[ui, uj]  # directed hash links
    dst = np.r_[uj, ui]
    dist = np.r_[ud, ud]
    none = np.iinfo(np.int64).max
    for r in ranks[1:]:
        pool = np.flatnonzero((rank >= 0) & (rank < r))
        best, second = _best_per_hash(pool, image_hash, group, position, n_hash)
        query = np.flatnonzero(rank == r)
        q_hash = image_hash[query]
        own = np.where((best[q_hash] >= 0) & (group[np.maximum(best[q_hash], 0)] != group[query]),
                       best[q_hash], second[q_hash])
        key = np.where(own >= 0, position[np.maximum(own, 0)], none)  # distance 0
        via = best[dst]
        ok = via >= 0
        near_key = np.full(n_hash, none, dtype=np.int64)
        np.minimum.at(near_key, src[ok], dist[ok] * n + position[via[ok]])
        key = np.minimum(key, near_key[q_hash])
        found = key != none
        partner[query[found]] = by_tie[key[found] % n]
        partner_distance[query[found]] = key[found] // n
    return partner, partner_distance


def _best_per_hash(pool: np.ndarray, image_hash: np.ndarray, group: np.ndarray, position: np.ndarray,
                   n_hash: int) -> tuple[np.ndarray, np.ndarray]:
    """Per hash: the pool image with the smallest position, and the smallest of another group."""
    best = np.full(n_hash, -1, dtype=np.int64)
    second = np.full(n_hash, -1, dtype=np.int64)
    if not pool.size:
        return best, second
    ranked = pool[np.lexsort((position[pool], image_hash[pool]))]
    hashes = image_hash[ranked]
    first = np.r_[True, hashes[1:] != hashes[:-1]]
    best[hashes[first]] = ranked[first]
    other = ranked[group[ranked] != group[best[hashes]]]
    if not other.size:
        return best, second
    other_hashes = image_hash[other]
    first = np.r_[True, other_hashes[1:] != other_hashes[:-1]]
    second[other_hashes[first]] = other[first]
    return best, second

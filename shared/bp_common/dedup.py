"""Near-duplicate detection: seeded MinHash over character n-grams, LSH banding, union-find clusters.

Everything per gram is numpy: the texts are joined and viewed as code points, each n-gram is
hashed once (multiply-xor, then a 64-bit finaliser), and each of the `num_perm` hash functions
is one xor and one multiply over all grams followed by a segmented minimum. Work grows
linearly with the total text length; LSH buckets produce candidate pairs, which are checked
against the threshold (signature agreement far from it, exact n-gram Jaccard near it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_PERM = 128
BANDS = 16           # 16 bands x 8 rows: a pair at Jaccard 0.9 shares a band with p > 0.999
NGRAM = 3
_CHUNK_GRAMS = 1 << 20   # grams hashed per block: keeps the working set in cache
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9)
_F1, _F2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def normalise_for_similarity(text: str) -> str:
    """Lower case, whitespace collapsed: the text MinHash sees."""
    return " ".join(text.lower().split())


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, in place: spreads every input bit over the whole word."""
    x ^= x >> np.uint64(30)
    x *= _F1
    x ^= x >> np.uint64(27)
    x *= _F2
    x ^= x >> np.uint64(31)
    return x


def gram_hashes(texts: list[str], ngram: int = NGRAM) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every character n-gram of every text, and each text's first gram index.

    A text shorter than `ngram` counts as one gram (padded), so every text has at least one.
    """
    texts = [t if len(t) >= ngram else t + "\x00" * (ngram - len(t)) for t in texts]
    lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    counts = lens - (ngram - 1)
    text_starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(lens) else np.zeros(0, np.int64)
    gram_starts = np.concatenate(([0], np.cumsum(counts)[:-1])) if len(counts) else np.zeros(0, np.int64)
    total = int(counts.sum())
    # Position of each gram in the joined code points: its text's start plus its offset in the text.
    pos = np.arange(total, dtype=np.int64) + np.repeat(text_starts - gram_starts, counts)
    g = cps[pos] * _M1
    if ngram > 1:
        g ^= cps[pos + 1] * _M2
    for k in range(2, ngram):
        g ^= cps[pos + k] * (_M3 + np.uint64(2 * k))
    return _mix(g), gram_starts


def _perm_params(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xors = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    mults = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True) | np.uint64(1)
    return xors, mults


def signatures(texts: list[str], num_perm: int = NUM_PERM, seed: int = 0, ngram: int = NGRAM) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), uint32. Same seed, same signatures.

    Texts are hashed in blocks of about _CHUNK_GRAMS characters, so memory holds one block's
    grams at a time (plus the signatures), whatever the number of texts.
    """
    n = len(texts)
    sig = np.empty((n, num_perm), dtype=np.uint32)
    xors, mults = _perm_params(num_perm, seed)
    start = 0
    while start < n:
        end, size = start, 0
        while end < n and (size < _CHUNK_GRAMS or end == start):
            size += len(texts[end]) + 1
            end += 1
        g, starts = gram_hashes(texts[start:end], ngram)
        _minhash_block(g, starts, xors, mults, sig[start:end])
        start = end
    return sig


def _minhash_block(g: np.ndarray, starts: np.ndarray, xors: np.ndarray, mults: np.ndarray, out: np.ndarray) -> None:
    seg = starts.astype(np.intp)
    tmp = np.empty_like(g)
    shift = np.uint64(32)
    for k in range(len(xors)):
        # h_k(x) = (x ^ c_k) * a_k mod 2^64; the top 32 bits of each text's minimum are its entry k.
        np.bitwise_xor(g, xors[k], out=tmp)
        np.multiply(tmp, mults[k], out=tmp)
        out[:, k] = np.minimum.reduceat(tmp, seg) >> shift


def candidate_pairs(sig: np.ndarray, bands: int = BANDS) -> np.ndarray:
    """Pairs (i < j) that share at least one LSH band, shape (m, 2), int64, unique.

    In a bucket every member is paired with the bucket's first member and with its neighbour
    (in index order), so a bucket of k rows gives at most 2k pairs, not k^2/2.
    """
    n, num_perm = sig.shape
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    rows = num_perm // bands
    found = []
    for b in range(bands):
        band = sig[:, b * rows:(b + 1) * rows].astype(np.uint64)
        key = np.zeros(n, dtype=np.uint64)
        for c in range(rows):
            key = _mix(key * _M1 + band[:, c] + np.uint64(c + 1))
        order = np.argsort(key, kind="stable")
        sk = key[order]
        same = sk[1:] == sk[:-1]
        if not same.any():
            continue
        # Run starts: positions whose key differs from the previous one.
        new_run = np.concatenate(([True], ~same))
        run_id = np.cumsum(new_run) - 1
        run_first = order[np.flatnonzero(new_run)][run_id]
        idx = np.flatnonzero(same) + 1                       # every non-first member of a run
        found.append(np.stack([run_first[idx], order[idx]], axis=1))
        found.append(np.stack([order[idx - 1], order[idx]], axis=1))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found).astype(np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    pairs.sort(axis=1)
    code = np.unique(pairs[:, 0] * n + pairs[:, 1])
    return np.stack([code // n, code % n], axis=1)


def signature_agreement(sig: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Estimated Jaccard of each pair: the fraction of equal signature entries."""
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        out[s:s + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


@dataclass
class NearResult:
    """Near-duplicate clusters: `labels[i]` is the lowest index of row i's cluster (itself if alone)."""
    labels: np.ndarray
    pairs_checked: int
    pairs_matched: int

    @property
    def duplicates(self) -> np.ndarray:
        """Indices of rows that are near-duplicates of an earlier row (the ones to drop)."""
        return np.flatnonzero(self.labels != np.arange(len(self.labels)))

    @property
    def n_clusters(self) -> int:
        """Clusters with more than one member."""
        dup = self.labels != np.arange(len(self.labels))
        return int(len(np.unique(self.labels[dup])))


def cross_candidate_pairs(sig: np.ndarray, n: int, bands: int = BANDS) -> np.ndarray:
    """Pairs (i, j), i < n <= j, sharing a band: each row of the first set paired with the first
    row of the second set in its bucket, per band."""
    total, num_perm = sig.shape
    rows = num_perm // bands
    found = []
    for b in range(bands):
        band = sig[:, b * rows:(b + 1) * rows].astype(np.uint64)
        key = np.zeros(total, dtype=np.uint64)
        for c in range(rows):
            key = _mix(key * _M1 + band[:, c] + np.uint64(c + 1))
        other_keys, first = np.unique(key[n:], return_index=True)
        pos = np.searchsorted(other_keys, key[:n])
        pos[pos >= len(other_keys)] = 0
        hit = np.flatnonzero(other_keys[pos] == key[:n]) if len(other_keys) else np.zeros(0, np.int64)
        found.append(np.stack([hit, first[pos[hit]] + n], axis=1))
    pairs = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 2), np.int64)
    code = np.unique(pairs[:, 0] * total + pairs[:, 1])
    return np.stack([code // total, code % total], axis=1)


def check_pairs(texts: list[str], sig: np.ndarray, pairs: np.ndarray, threshold: float,
                ngram: int = NGRAM) -> np.ndarray:
    """The candidate pairs whose n-gram Jaccard similarity is at least `threshold`.

    Far from the threshold the signature estimate decides (its error is about 0.03 at 128
    permutations); within 0.1 of it, the exact Jaccard of the two gram sets does.
    """
    if not len(pairs):
        return pairs
    est = signature_agreement(sig, pairs)
    margin = 0.1
    accept = est >= threshold + margin
    unsure = np.flatnonzero((est >= threshold - margin) & ~accept)
    cache: dict[int, set] = {}

    def grams(i: int) -> set:
        got = cache.get(i)
        if got is None:
            got = cache[i] = set(gram_hashes([texts[i]], ngram)[0].tolist())
        return got
    for k in unsure.tolist():
        a, b = grams(int(pairs[k, 0])), grams(int(pairs[k, 1]))
        inter = len(a & b)
        accept[k] = inter >= threshold * (len(a) + len(b) - inter)
    return pairs[accept]


def union_find_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected components of `pairs` over n items; each item labelled with its component's lowest index."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    return np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)


def near_duplicates(texts: list[str], threshold: float = 0.9, seed: int = 0,
                    num_perm: int = NUM_PERM, ngram: int = NGRAM) -> NearResult:
    """Cluster texts whose character n-gram Jaccard similarity is >= threshold.

    texts: already normalised (see normalise_for_similarity). The first row of each cluster is
    the one to keep. Deterministic for a seed.
    """
    sig = signatures(texts, num_perm, seed, ngram)
    cand = candidate_pairs(sig)
    pairs = check_pairs(texts, sig, cand, threshold, ngram)
    return NearResult(union_find_labels(len(texts), pairs), len(cand), len(pairs))


def cross_matches(texts: list[str], others: list[str], threshold: float = 0.9, seed: int = 0,
                  num_perm: int = NUM_PERM, ngram: int = NGRAM) -> np.ndarray:
    """Bool mask over `texts`: True where a text is a near-duplicate (Jaccard >= threshold) of any of `others`."""
    n = len(texts)
    hit = np.zeros(n, dtype=bool)
    if not n or not others:
        return hit
    both = texts + others
    sig = signatures(both, num_perm, seed, ngram)
    pairs = check_pairs(both, sig, cross_candidate_pairs(sig, n), threshold, ngram)
    hit[pairs[:, 0]] = True
    return hit

"""Exact and near duplicates: within train, across train and test (leakage), and with conflicting labels.

Exact duplicates share the md5 of their bytes. Near duplicates are pairs of images whose 64-bit
perceptual hashes differ in at most ``threshold`` bits but whose bytes differ (a resized or re-encoded
copy) and whose 16×16 grey thumbnails correlate (pHash alone links look-alikes on tiny images). Hash
candidates are found by pigeonhole banding instead of comparing all N² pairs: split the 64 bits into
``threshold + 1`` bands; two hashes within ``threshold`` bits agree exactly on at least one band, so
only hashes sharing some band value are compared (with numpy). Linked images are grouped into clusters
(connected components); the counts below are exact, only the listed examples are capped.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

BIG_BUCKET = 2048  # buckets larger than this are compared block by block to bound memory
EMPTY_PAIRS = np.empty((0, 2), dtype=np.int64)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(c)`` for every c in ``counts``, vectorised."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _small_bucket_pairs(order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Every within-bucket pair of the sorted positions ``order[start:start+size]``, all buckets at once."""
    pos = np.repeat(starts, sizes) + _ranges(sizes)
    later = np.repeat(starts + sizes, sizes) - pos - 1  # how many positions follow in the same bucket
    left = np.repeat(pos, later)
    right = left + 1 + _ranges(later)
    return np.stack([order[left], order[right]], axis=1)


def _big_bucket_pairs(members: np.ndarray, hashes: np.ndarray, threshold: int) -> np.ndarray:
    """Pairs within ``threshold`` bits in one large bucket, compared one block of rows at a time."""
    h = hashes[members]
    step = max(1, (1 << 22) // len(members))
    found = []
    for a in range(0, len(members), step):
        dist = np.bitwise_count(h[a:a + step, None] ^ h[None, :])
        r, c = np.nonzero(dist <= threshold)
        keep = c > r + a
        found.append(np.stack([members[r[keep] + a], members[c[keep]]], axis=1))
    return np.concatenate(found) if found else EMPTY_PAIRS


def _band_pairs(hashes: np.ndarray, lo: int, hi: int, threshold: int) -> np.ndarray:
    """Pairs (i < j) that agree on bits [lo, hi) and are within ``threshold`` bits overall."""
    keys = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
    order = np.argsort(keys, kind="stable")  # stable: indices ascend within a bucket, so i < j below
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    small = (sizes > 1) & (sizes <= BIG_BUCKET)
    found = [_small_bucket_pairs(order, starts[small], sizes[small])]
    found += [_big_bucket_pairs(order[s:s + n], hashes, threshold)
              for s, n in zip(starts[sizes > BIG_BUCKET], sizes[sizes > BIG_BUCKET])]
    pairs = np.concatenate(found)
    dist = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]])
    return pairs[dist <= threshold]


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of 64-bit hashes within Hamming ``threshold``, and their distances."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    bands = min(threshold + 1, 64)
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    found = [_band_pairs(hashes, lo, hi, threshold) for lo, hi in zip(edges[:-1], edges[1:])]
    pairs = np.unique(np.concatenate(found + [EMPTY_PAIRS]), axis=0)
    dist = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(np.int64)
    return pairs, dist


def cluster_labels(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component id per item for the links ``pairs``; -1 for items linked to nothing."""
    if len(pairs) == 0:
        return np.full(n, -1, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    labels = labels.astype(np.int64)
    labels[np.bincount(labels)[labels] < 2] = -1
    return labels


def exact_pairs(md5: pd.Series) -> np.ndarray:
    """Links (first member, other member) for every group of byte-identical files."""
    codes, _ = pd.factorize(md5)  # missing md5 (file unreadable from disk) → -1
    frame = pd.DataFrame({"code": codes, "row": np.arange(len(md5))})[codes >= 0]
    first = frame.groupby("code")["row"].transform("min")
    links = frame["row"] != first
    return np.stack([first[links].to_numpy(), frame["row"][links].to_numpy()], axis=1).astype(np.int64)


def thumb_correlation(thumbs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Pearson correlation of the grey thumbnails (bytes) of each pair; two flat thumbnails of about
    the same grey count as 1 (blank copies), a flat one against a textured one as 0."""
    if not len(pairs):
        return np.empty(0)
    rows = np.unique(pairs)
    a, b = np.searchsorted(rows, pairs[:, 0]), np.searchsorted(rows, pairs[:, 1])
    t = np.stack([np.frombuffer(x, dtype=np.uint8) for x in thumbs[rows]]).astype(np.float64)
    mean = t.mean(axis=1)
    t -= mean[:, None]
    norm = np.linalg.norm(t, axis=1)
    corr = np.einsum("ij,ij->i", t[a], t[b]) / np.maximum(norm[a] * norm[b], 1e-12)
    flat = (norm[a] < 1e-6) & (norm[b] < 1e-6)
    return np.where(flat, (np.abs(mean[a] - mean[b]) < 8).astype(float), corr)


def find_near(frame: pd.DataFrame, threshold: int, min_corr: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Near-duplicate pairs (rows of ``frame``) among readable images, excluding byte-identical ones.

    A pair needs pHash distance ≤ ``threshold`` *and* thumbnail correlation ≥ ``min_corr``: on tiny or
    plain-background images pHash alone links look-alikes (a bird and a plane on blue sky). Returns the
    pairs, their pHash distances and how many hash-only candidates there were.
    """
    rows = np.flatnonzero(frame["readable"].to_numpy(dtype=bool))
    hashes = frame["phash"].to_numpy(dtype=np.uint64)[rows]
    pairs, dist = near_pairs(hashes, threshold)
    pairs = rows[pairs]
    md5 = frame["md5"].to_numpy()
    differ = md5[pairs[:, 0]] != md5[pairs[:, 1]]
    pairs, dist = pairs[differ], dist[differ]
    keep = thumb_correlation(frame["thumb"].to_numpy(), pairs) >= min_corr
    log.info("near duplicates: %d pHash candidate pairs, %d confirmed by thumbnails", len(pairs), keep.sum())
    return pairs[keep], dist[keep], int(len(pairs))


def _cluster_table(frame: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """One row per cluster: size, train and test members, distinct train labels."""
    members = frame.loc[labels >= 0, ["split", "label"]].assign(cluster=labels[labels >= 0])
    members["is_train"] = members["split"] == "train"
    members["is_test"] = ~members["is_train"]
    return members.groupby("cluster").agg(n=("split", "size"), n_train=("is_train", "sum"),
                                          n_test=("is_test", "sum"), n_labels=("label", "nunique"))


def summarize(frame: pd.DataFrame, labels: np.ndarray, n_pairs: Optional[int], max_listed: int) -> dict:
    """Exact counts of clusters by kind (within train, train/test leak, conflicting labels) + examples."""
    table = _cluster_table(frame, labels)
    within, cross = table[table.n_train >= 2], table[(table.n_train >= 1) & (table.n_test >= 1)]
    conflict, in_test = table[table.n_labels >= 2], table[table.n_test >= 2]
    order = table.assign(c=table.n_labels >= 2, x=table.n_test.clip(upper=1) * table.n_train.clip(upper=1))
    order = order.sort_values(["c", "x", "n"], ascending=False, kind="stable").index[:max_listed]
    pick = np.isin(labels, order)
    chosen = frame.loc[pick, ["split", "id", "label", "path"]].assign(cluster=labels[pick])
    by_cluster = dict(list(chosen.groupby("cluster")))
    listed = [_describe(by_cluster[c], bool(c in conflict.index), bool(c in cross.index)) for c in order]
    return {
        "pairs": None if n_pairs is None else int(n_pairs), "groups": len(table), "images": int(table.n.sum()),
        "redundant_images": int(table.n.sum() - len(table)),
        "within_train": {"groups": len(within), "images": int(within.n_train.sum())},
        "within_test": {"groups": len(in_test), "images": int(in_test.n_test.sum())},
        "train_test": {"groups": len(cross), "test_images": int(cross.n_test.sum()),
                       "train_images": int(cross.n_train.sum())},
        "conflicting_labels": {"groups": len(conflict), "images": int(conflict.n_train.sum())},
        "listed": listed,
    }


def _describe(members: pd.DataFrame, conflicting: bool, leak: bool) -> dict:
    splits = sorted(set(members["split"]), reverse=True)
    flags = (["conflicting labels"] if conflicting else []) + (["train/test"] if leak else [f"within {splits[0]}"])
    rows = [{"split": r["split"], "id": r["id"], "label": None if pd.isna(r["label"]) else str(r["label"]),
             "path": r["path"]} for r in members.to_dict("records")]
    return {"flags": flags, "members": rows}


def pair_kinds(frame: pd.DataFrame, pairs: np.ndarray) -> dict:
    """Pair-level counts (no transitive chaining): train–train, train–test, test–test, label conflicts."""
    split, label = frame["split"].to_numpy(), frame["label"].to_numpy()
    a, b = pairs[:, 0], pairs[:, 1]
    n_train = (split[a] == "train").astype(int) + (split[b] == "train")
    conflict = (n_train == 2) & (label[a] != label[b]) & pd.notna(label[a]) & pd.notna(label[b])
    return {"train_train": int((n_train == 2).sum()), "train_test": int((n_train == 1).sum()),
            "test_test": int((n_train == 0).sum()), "conflicting_labels": int(conflict.sum())}


def analyse(frame: pd.DataFrame, threshold: int, min_corr: float, max_listed: int) -> tuple[dict, pd.DataFrame]:
    """Duplicate report for ``frame`` (columns split, id, label, path + scan columns) and a table of
    every image in a group (``dup_group`` joins exact and near links: use it as CV groups)."""
    exact = exact_pairs(frame["md5"])
    near, dist, candidates = find_near(frame, threshold, min_corr)
    exact_labels = cluster_labels(len(frame), exact)
    near_labels = cluster_labels(len(frame), near)
    both = cluster_labels(len(frame), np.concatenate([exact, near]))
    sizes = np.bincount(exact_labels[exact_labels >= 0]) if (exact_labels >= 0).any() else np.array([])
    report = {
        "near_threshold": threshold, "near_min_corr": min_corr, "near_hash_candidates": candidates,
        "near_pair_kinds": pair_kinds(frame, near),
        "exact": summarize(frame, exact_labels, int((sizes * (sizes - 1) // 2).sum()), max_listed),
        "near": summarize(frame, near_labels, len(near), max_listed),
        "any": summarize(frame, both, None, 0),
        "near_distance_counts": {int(d): int(c) for d, c in zip(*np.unique(dist, return_counts=True))},
    }
    groups = frame.loc[both >= 0, ["split", "id", "label", "path"]].assign(
        dup_group=both[both >= 0], exact_group=exact_labels[both >= 0], near_group=near_labels[both >= 0])
    return report, groups.sort_values(["dup_group", "split", "id"], kind="stable")

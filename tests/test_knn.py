"""Neighbour lists: hnswlib (with the re-ranked negative query) against exact blocked search."""

from __future__ import annotations

import numpy as np

from g2is_graph.knn import HnswIndex, HnswSettings, conflict_recall, exact_topk, measure_recall, recall


def clustered(n=1500, d=256, clusters=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    x = (0.3 * rng.standard_normal(d) + centers[rng.integers(0, clusters, n)]
         + 0.8 * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_topk_matches_brute_force_and_excludes_self():
    x = clustered(200, 32)
    rows = np.arange(200)
    exact = exact_topk(x, x, 5, exclude=rows, block=37)
    sims = x @ x.T
    np.fill_diagonal(sims, np.nan)
    assert np.array_equal(exact.similar_index, np.argsort(-np.nan_to_num(sims, nan=-9), axis=1)[:, :5])
    assert np.array_equal(exact.conflict_index, np.argsort(np.nan_to_num(sims, nan=9), axis=1)[:, :5])
    assert (exact.similar_index != rows[:, None]).all() and (exact.conflict_index != rows[:, None]).all()
    np.testing.assert_allclose(exact.similar_weight, np.take_along_axis(sims, exact.similar_index, 1), rtol=1e-5)


def test_hnsw_recall_of_both_edge_kinds_at_the_defaults():
    x = clustered()
    index = HnswIndex.build(x, HnswSettings())
    found = index.query(x, x, np.arange(len(x)), 16)
    measured = measure_recall(x, found, sample=300)
    assert measured["similar"] >= 0.95 and measured["conflict"] >= 0.90, measured
    # the naive negated query (ef 64, no extra candidates) is what the defaults fix
    naive = HnswIndex.build(x, HnswSettings(ef=64, ef_negative=64, negative_candidates=16)).query(
        x, x, np.arange(len(x)), 16)
    exact = exact_topk(x, x, 16, exclude=np.arange(len(x)))
    assert recall(naive.conflict_index, exact.conflict_index) < measured["conflict"]


def test_conflict_recall_counts_only_the_negative_pairs_that_become_edges():
    """Gradient features that all point one way (cosines 0.46-0.99 in a real SmolLM2 store) have no
    CONFLICT edges: recall is undefined there, not the poor recall of the unused least-similar lists."""
    rng = np.random.default_rng(0)
    cone = rng.normal(size=(400, 64)) * 0.3 + 3.0
    cone /= np.linalg.norm(cone, axis=1, keepdims=True)
    found = HnswIndex.build(cone.astype(np.float32), HnswSettings()).query(cone, cone, np.arange(len(cone)), 8)
    assert (found.conflict_weight > 0).all()
    assert measure_recall(cone.astype(np.float32), found, sample=100)["conflict"] is None
    approx_index = np.array([[1, 2, 3], [4, 5, 6]])
    approx_weight = np.array([[-0.5, -0.1, 0.2], [0.1, 0.2, 0.3]])
    exact_index = np.array([[1, 3, 2], [4, 5, 6]])
    exact_weight = np.array([[-0.5, -0.2, -0.1], [0.1, 0.2, 0.3]])
    # row 0: negatives {1, 3, 2}, the approximate list holds 1 and 2 as negatives; row 1 has none
    assert conflict_recall(approx_index, approx_weight, exact_index, exact_weight) == 2 / 3

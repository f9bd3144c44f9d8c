"""Neighbour lists: hnswlib (with the re-ranked negative query) against exact blocked search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from g2is_graph.config import GraphConfig
from g2is_graph.neighbors import knn
from g2is_graph.neighbors.knn import HnswIndex, conflict_recall, exact_topk, ivf_neighbors, measure_recall, recall
from g2is_graph.numerics import exact_dots, float32_dot_error


def clustered(n=1500, d=256, clusters=12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d))
    x = (0.3 * rng.standard_normal(d) + centers[rng.integers(0, clusters, n)]
         + 0.8 * rng.standard_normal((n, d))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fsum_cosines(x: np.ndarray) -> np.ndarray:
    """An independent oracle: every pairwise dot product correctly rounded (math.fsum of exact products)."""
    x64 = x.astype(np.float64)
    return np.array([[math.fsum(a * b) for b in x64] for a in x64])


def assert_valid_top_k(index, weight, oracle, keys, largest, tolerance=1e-12):
    """Each list holds k of the best rows by the oracle (up to `tolerance` at its boundary), its weights are
    the oracle's values to `tolerance`, in order, equal weights in key order, and no row is its own neighbour."""
    for i, (row_index, row_weight) in enumerate(zip(index, weight)):
        assert i not in row_index and len(set(row_index)) == len(row_index)
        np.testing.assert_allclose(row_weight, oracle[i, row_index], rtol=0, atol=tolerance)
        sign = -1 if largest else 1
        assert list(np.lexsort((keys[row_index], sign * row_weight))) == list(range(len(row_index)))
        others = np.setdiff1d(np.arange(len(oracle)), np.append(row_index, i))
        if largest:
            assert oracle[i, others].max(initial=-np.inf) <= row_weight[-1] + tolerance
        else:
            assert oracle[i, others].min(initial=np.inf) >= row_weight[-1] - tolerance


def test_exact_topk_is_a_true_top_k_and_excludes_self():
    x = clustered(200, 32)
    rows = np.arange(200)
    exact = exact_topk(x, x, 5, exclude=rows, block=37)
    oracle = fsum_cosines(x)
    assert_valid_top_k(exact.similar_index, exact.similar_weight, oracle, rows, largest=True)
    assert_valid_top_k(exact.conflict_index, exact.conflict_weight, oracle, rows, largest=False)
    np.testing.assert_array_equal(exact.similar_weight, exact_dots(x[exact.similar_index], x[:, None, :]))


def near_ties(n=120, d=64, seed=0):
    """Rows that are tiny perturbations of a few directions (cosines equal to ~1e-7, inside the float32
    product's rounding) plus exact duplicates (equal cosines): the cases where blocking decides order."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((4, d))
    x = centers[rng.integers(0, 4, n)] + 1e-7 * rng.standard_normal((n, d))
    x[n // 2:n // 2 + 10] = x[n // 2]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("data", ["clustered", "near_ties"])
def test_exact_lists_do_not_depend_on_blocking_or_on_the_float32_products_last_bits(data, monkeypatch):
    """Any BLAS (any blocking, kernel, device) rounds the filter's products differently, within the bound:
    the lists, weights and their order are the same, bit for bit."""
    x = clustered(300, 48) if data == "clustered" else near_ties()
    n = len(x)
    keys = np.random.default_rng(1).permutation(n)
    reference = exact_topk(x, x, 8, exclude=np.arange(n), block=n, keys=keys)
    oracle = fsum_cosines(x)
    assert_valid_top_k(reference.similar_index, reference.similar_weight, oracle, keys, largest=True)
    assert_valid_top_k(reference.conflict_index, reference.conflict_weight, oracle, keys, largest=False)
    bound = float32_dot_error(x.shape[1])
    product = knn.float32_cosines
    noise = torch.Generator().manual_seed(2)

    def another_blas(q, base):
        sims = product(q, base)
        return sims + (torch.rand(sims.shape, generator=noise) * 2 - 1).to(sims.dtype) * 0.9 * bound

    for block in (7, 64):
        monkeypatch.setattr(knn, "float32_cosines", another_blas)
        other = exact_topk(x, x, 8, exclude=np.arange(n), block=block, keys=keys)
        for field in ("similar_index", "similar_weight", "conflict_index", "conflict_weight"):
            np.testing.assert_array_equal(getattr(other, field), getattr(reference, field))
    # a score budget smaller than the block asks for: fewer queries per block, the same lists
    monkeypatch.setattr(knn, "float32_cosines", product)
    monkeypatch.setattr(knn, "SCORE_BLOCK_BYTES", 5 * 4 * n)
    capped = exact_topk(x, x, 8, exclude=np.arange(n), block=n, keys=keys)
    for field in ("similar_index", "similar_weight", "conflict_index", "conflict_weight"):
        np.testing.assert_array_equal(getattr(capped, field), getattr(reference, field))
    # in parts: the first rows against everything equal the same rows of the whole search
    m = 2 * n // 3
    part = exact_topk(x[:m], x, 8, exclude=np.arange(m), keys=keys)
    np.testing.assert_array_equal(part.similar_weight, reference.similar_weight[:m])
    np.testing.assert_array_equal(part.conflict_index, reference.conflict_index[:m])


def test_equal_cosines_are_ordered_by_key():
    x = clustered(100, 32)
    x[10:20] = x[10]
    keys = np.random.default_rng(0).permutation(100)
    lists = exact_topk(x[10:11], x, 5, exclude=np.asarray([10]), keys=keys)
    assert list(lists.similar_index[0]) == sorted(range(11, 20), key=lambda j: keys[j])[:5]
    assert (lists.similar_weight[0] == lists.similar_weight[0][0]).all()


def test_hnsw_recall_of_both_edge_kinds_at_the_defaults():
    x = clustered()
    index = HnswIndex.build(x, GraphConfig())
    found = index.query(x, x, np.arange(len(x)), 16)
    measured = measure_recall(x, found, sample=300)
    assert measured["similar"] >= 0.95 and measured["conflict"] >= 0.90, measured
    # the naive negated query (ef 64, no extra candidates) is what the defaults fix
    naive = HnswIndex.build(x, GraphConfig(ef=64, ef_negative=64, negative_candidates=16)).query(
        x, x, np.arange(len(x)), 16)
    exact = exact_topk(x, x, 16, exclude=np.arange(len(x)))
    assert recall(naive.conflict_index, exact.conflict_index) < measured["conflict"]
    # hnswlib's candidates are ranked by the same exact cosines as the exact search
    np.testing.assert_array_equal(found.similar_weight, exact_dots(x[found.similar_index], x[:, None, :]))
    both = np.isin(found.similar_index, exact.similar_index).all(1)
    np.testing.assert_array_equal(found.similar_weight[both], exact.similar_weight[both])


def test_ivf_probing_every_cell_is_the_exact_search_and_fewer_cells_keep_recall():
    x = clustered(1200, 64)
    keys = np.random.default_rng(1).permutation(len(x))
    exact = exact_topk(x, x, 8, exclude=np.arange(len(x)), keys=keys)
    every = ivf_neighbors(x, x, np.arange(len(x)), 8, GraphConfig(index="ivf", ivf_cells=9, ivf_probe=9), keys)
    for field in exact.__dataclass_fields__:  # bit for bit: the same exact weights, the same tie order
        np.testing.assert_array_equal(getattr(every, field), getattr(exact, field))
    some = ivf_neighbors(x, x, np.arange(len(x)), 8, GraphConfig(index="ivf", ivf_cells=9, ivf_probe=3), keys)
    assert (some.similar_index != np.arange(len(x))[:, None]).all()  # never a node's own row
    assert recall(some.similar_index, exact.similar_index) >= 0.9
    # queries from outside the base (an incremental build's old rows against the newcomers)
    outside = ivf_neighbors(x[:50], x[50:], None, 8, GraphConfig(index="ivf", ivf_cells=4, ivf_probe=4))
    np.testing.assert_array_equal(outside.similar_index, exact_topk(x[:50], x[50:], 8).similar_index)


def test_conflict_recall_counts_only_the_negative_pairs_that_become_edges():
    """Gradient features that all point one way (cosines 0.46-0.99 in a real SmolLM2 store) have no
    CONFLICT edges: recall is undefined there, not the poor recall of the unused least-similar lists."""
    rng = np.random.default_rng(0)
    cone = rng.normal(size=(400, 64)) * 0.3 + 3.0
    cone /= np.linalg.norm(cone, axis=1, keepdims=True)
    found = HnswIndex.build(cone.astype(np.float32), GraphConfig()).query(cone, cone, np.arange(len(cone)), 8)
    assert (found.conflict_weight > 0).all()
    assert measure_recall(cone.astype(np.float32), found, sample=100)["conflict"] is None
    approx_index = np.array([[1, 2, 3], [4, 5, 6]])
    approx_weight = np.array([[-0.5, -0.1, 0.2], [0.1, 0.2, 0.3]])
    exact_index = np.array([[1, 3, 2], [4, 5, 6]])
    exact_weight = np.array([[-0.5, -0.2, -0.1], [0.1, 0.2, 0.3]])
    # row 0: negatives {1, 3, 2}, the approximate list holds 1 and 2 as negatives; row 1 has none
    assert conflict_recall(approx_index, approx_weight, exact_index, exact_weight) == 2 / 3

"""Core knowledge: component count by tau, budgets by largest remainder, centring, sign orientation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from g2is_graph.selection.knowledge import (
    components_for_tasks,
    core_knowledge,
    largest_remainder,
    n_kept,
    principal_components,
)


@given(st.integers(0, 500), st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12))
def test_largest_remainder_sums_exactly_and_stays_within_one(total, weights):
    budgets = largest_remainder(total, weights)
    assert sum(budgets) == total
    exact = total * np.asarray(weights) / sum(weights)
    assert all(abs(b - e) < 1 for b, e in zip(budgets, exact))


def test_largest_remainder_known_case():
    assert largest_remainder(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert largest_remainder(7, [0.45, 0.35, 0.2]) == [3, 3, 1]  # remainders .15 .45 .4


def test_fewest_components_exceeding_tau_and_weights_renormalised():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((20, 4)))[0].T  # 4 orthonormal directions
    scales = np.array([4.0, 3.0, 2.0, 1.0])
    x = (rng.standard_normal((200, 4)) * scales) @ basis
    comps, ratios = principal_components(x, centered=True)
    cumulative = np.cumsum(ratios)
    for tau in (0.3, 0.5, 0.8, 0.95):
        kept = core_knowledge(x, 100, tau, centered=True, orient=True)
        m = len(kept)
        assert cumulative[m - 1] > tau and (m == 1 or cumulative[m - 2] <= tau)
        assert sum(c.budget for c in kept) == 100
        assert sum(c.weight for c in kept) == pytest.approx(1.0)
        assert [c.explained_ratio for c in kept] == pytest.approx(list(ratios[:m]))


def test_orientation_makes_mean_projection_non_negative_and_is_recorded():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8)) + np.array([3.0] + [0.0] * 7)
    raw = core_knowledge(x, 10, 0.99, centered=False, orient=False)
    oriented = core_knowledge(x, 10, 0.99, centered=False, orient=True)
    for a, b in zip(raw, oriented):
        assert b.mean_projection >= 0
        np.testing.assert_allclose(b.vector, -a.vector if b.flipped else a.vector)
        assert b.flipped == (a.mean_projection < 0)


def test_uncentred_first_component_is_the_mean_direction_centred_removes_it():
    rng = np.random.default_rng(2)
    mean = np.zeros(16)
    mean[0] = 5.0
    x = mean + 0.3 * rng.standard_normal((40, 16))
    uncentred = core_knowledge(x, 10, 0.5, centered=False, orient=True)[0]
    centred = core_knowledge(x, 10, 0.5, centered=True, orient=True)[0]
    assert abs(uncentred.vector[0]) > 0.99
    assert abs(centred.vector[0]) < 0.5


def test_centred_pca_has_at_most_n_minus_1_components_and_per_task_splits_budget():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 32))
    comps, _ = principal_components(x, centered=True)
    assert len(comps) <= 4
    tasks = ["a"] * 5 + ["b"] * 6
    both = np.concatenate([x, rng.standard_normal((6, 32))])
    per_task = components_for_tasks(both, tasks, 11, 0.5, True, True, "per-task")
    assert sum(c.budget for c in per_task if c.task == "a") == 6
    assert sum(c.budget for c in per_task if c.task == "b") == 5
    pooled = components_for_tasks(both, tasks, 11, 0.5, True, True, "pooled")
    assert {c.task for c in pooled} == {"a,b"} and sum(c.budget for c in pooled) == 11


def test_core_knowledge_as_a_count_or_a_fraction_beside_tau():
    """The paper's two readings: "the first 50% of principal components" and the cumulative variance ratio."""
    ratios = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    assert n_kept(ratios, 0.5) == 2 and n_kept(ratios, 0.95) == 4
    assert n_kept(ratios, 0.5, n_components=3) == 3 and n_kept(ratios, 0.5, n_components=9) == 5
    assert n_kept(ratios, 0.5, component_fraction=0.5) == 3 and n_kept(ratios, 0.5, component_fraction=0.01) == 1
    rng = np.random.default_rng(0)
    features = rng.standard_normal((21, 40))
    kept = core_knowledge(features, 100, 0.5, centered=True, orient=True, n_components=5)
    assert len(kept) == 5 and sum(c.budget for c in kept) == 100
    half = core_knowledge(features, 100, 0.5, centered=True, orient=True, component_fraction=0.5)
    assert len(half) == 10  # half of the 20 informative centred components of 21 examples

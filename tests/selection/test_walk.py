"""The gradient walk against the real server: on a complete graph the Cypher-driven walk selects exactly
what the dense Algorithm 1 selects, in the same order, for several seeds and every option set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from g2is_graph.config import GraphConfig, SelectionConfig
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.db.graph import decode_vectors
from g2is_graph.selection.admission import Selected
from g2is_graph.selection.knowledge import core_knowledge
from g2is_graph.selection.runs import reference_for_graph, select
from g2is_graph.selection.walk import reference_walk
from ingest.graph_build import build_graph

OPTION_SETS = [
    SelectionConfig(n_select=12),
    SelectionConfig(n_select=12, conflict_scope="component"),
    SelectionConfig(n_select=12, fallback="official"),
    SelectionConfig(n_select=12, fallback="official", reassign_shortfall=True, delta=0.95),
    SelectionConfig(n_select=10, centered=False, orient=False, tau=0.8),
    SelectionConfig(n_select=12, candidates="all", page=7),
    SelectionConfig(n_select=12, n_components=2),
    SelectionConfig(n_select=12, component_fraction=0.5, consistency_reference="anchor"),
    SelectionConfig(n_select=12, center_pool=True, delta=0.9),
]


def make_graph(graph, tmp_path, seed: int, n: int = 48, dim: int = 24, k: int | None = None):
    vectors = clustered_vectors(n, dim, clusters=6, spread=0.8, seed=seed)
    train = synthetic_store(tmp_path / f"train{seed}" / "c", vectors, synthetic_rows(n))
    rng = np.random.default_rng(seed)
    val = vectors[rng.choice(n, 6, replace=False)] + 0.3 * rng.standard_normal((6, dim)).astype(np.float32)
    val_store = synthetic_store(tmp_path / f"val{seed}" / "c", val, synthetic_rows(6, prefix="v", task="t"), kind="sgd")
    build_graph(graph, [train.path], GraphConfig(k=k or n - 1, exact=True, device="cpu"), tmp_path / f"state{seed}",
                validation_stores=[val_store.path], progress=False)
    return vectors, val


def picks_of(result):
    return [(p.id, p.how, p.component) for p in result.picks]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graph_walk_equals_dense_reference_on_a_complete_graph(graph, tmp_path, seed):
    make_graph(graph, tmp_path, seed)
    for config in OPTION_SETS:
        config = dataclasses.replace(config, seed=seed)
        walked = select(graph, config, None, progress=False, echo=lambda m: None)
        reference = reference_for_graph(graph, dataclasses.replace(config, candidates="all"))
        assert picks_of(walked.walk) == picks_of(reference), config
        np.testing.assert_allclose([p.cos_k for p in walked.picks], [p.cos_k for p in reference.picks], atol=1e-9)
        assert walked.walk.filled == reference.filled


def test_walk_over_a_sparse_graph_matches_the_reference_on_the_same_edges(graph, tmp_path):
    make_graph(graph, tmp_path, 4, n=60, k=6)
    config = SelectionConfig(n_select=15)
    walked = select(graph, config, None, progress=False, echo=lambda m: None)
    assert picks_of(walked.walk) == picks_of(reference_for_graph(graph, config))
    assert walked.walk.round_trips <= 2 * len(walked.picks) + 2


def test_reference_walk_obeys_algorithm_1():
    """Every walk pick passes both constraints; anchors and paper fallbacks are the unselected argmax cos(z, K)."""
    features = clustered_vectors(80, 16, clusters=8, spread=0.9, seed=7)
    ids = [f"n{i}" for i in range(80)]
    components = core_knowledge(features[:10], 20, 0.6, centered=True, orient=True)
    config = SelectionConfig(n_select=20, delta=0.8)
    result = reference_walk(features, ids, components, config)
    assert len(result.picks) == 20 and len(set(result.ids)) == 20
    chosen: list[int] = []
    for pick in result.picks:
        comp = components[pick.component]
        members = [r for r in chosen if result.picks[chosen.index(r)].component == pick.component]
        if pick.how in ("anchor", "fallback"):  # the argmax, to float64 rounding (1e-12)
            unselected = [r for r in range(80) if r not in chosen]
            best = max(features[r].astype(np.float64) @ comp.vector for r in unselected)
            assert pick.cos_k >= best - 1e-12 and pick.row in unselected
        else:  # no conflict, to float32 rounding of the check's product (1e-6)
            assert min(features[chosen] @ features[pick.row]) >= -1e-6
            s = features[members].astype(np.float64).sum(0)
            before = abs(s @ comp.vector) / np.linalg.norm(s)
            after_sum = s + features[pick.row]
            after = abs(after_sum @ comp.vector) / np.linalg.norm(after_sum)
            assert after >= 0.8 * before - 1e-12
        chosen.append(pick.row)


def test_official_fallback_under_fills_and_reports_it(graph, tmp_path):
    make_graph(graph, tmp_path, 5)
    messages = []
    run = select(graph, SelectionConfig(n_select=20, fallback="official", delta=1.0), None, progress=False,
                 echo=messages.append)
    assert run.walk.shortfall == 20 - len(run.picks) > 0
    assert any("under-filled" in m for m in messages)
    stored = graph.read("run_get", id=run.id)[0]["run"]
    assert stored["status"] == "complete" and stored["shortfall"] == run.walk.shortfall


def test_anchor_ranking_reads_validation_dots_and_says_when_it_cannot(graph, tmp_path):
    make_graph(graph, tmp_path, 7, n=60, k=6)
    config = SelectionConfig(n_select=15)
    fast = select(graph, config, None, progress=False, echo=lambda m: None)
    assert fast.walk.scan == "validation dots (6 per node)"
    assert graph.read("run_get", id=fast.id)[0]["run"]["scan"] == fast.walk.scan

    space = graph.read("feature_space")[0]["id"]
    validation = decode_vectors(graph.read("validation_vectors", space=space, tasks=None)).astype(np.float64)
    (node,) = graph._run_auto("MATCH (z:Sample {row: 3}) RETURN z.gradient_f32 AS g, z.validation_dots AS d")
    stored = np.frombuffer(node["d"], dtype="<f8")
    np.testing.assert_allclose(stored, validation @ np.frombuffer(node["g"], dtype="<f4"), rtol=1e-12)

    graph._run_auto("MATCH (z:Sample {row: 3}) REMOVE z.validation_key, z.validation_dots")
    slow = select(graph, config, None, progress=False, echo=lambda m: None)
    assert slow.walk.scan.startswith("full vectors (1 nodes of rows 0-") and "g2is graph build" in slow.walk.scan
    assert picks_of(slow.walk) == picks_of(fast.walk)

    rebuilt = build_graph(graph, [tmp_path / "train7" / "c"], GraphConfig(k=6, exact=True, device="cpu"),
                          tmp_path / "state7", progress=False)
    assert rebuilt.n_dots == 1 and not rebuilt.up_to_date
    assert build_graph(graph, [tmp_path / "train7" / "c"], GraphConfig(k=6, exact=True, device="cpu"),
                       tmp_path / "state7", progress=False).up_to_date
    assert select(graph, config, None, progress=False, echo=lambda m: None).walk.scan.startswith("validation dots")


def test_as_many_validation_vectors_as_dimensions_scans_full_vectors(graph, tmp_path):
    make_graph(graph, tmp_path, 8, n=30, dim=5, k=4)
    run = select(graph, SelectionConfig(n_select=6), None, progress=False, echo=lambda m: None)
    assert run.walk.scan == "full vectors (6 validation vectors, no fewer than the dimension)"
    assert picks_of(run.walk) == picks_of(reference_for_graph(graph, SelectionConfig(n_select=6)))


def test_a_one_node_cache_selects_the_same_samples_with_more_queries(graph, tmp_path):
    make_graph(graph, tmp_path, 9, n=60, k=6)
    default = select(graph, SelectionConfig(n_select=15), None, progress=False, echo=lambda m: None)
    tiny = select(graph, SelectionConfig(n_select=15, cache_nodes=1), None, progress=False, echo=lambda m: None)
    assert picks_of(tiny.walk) == picks_of(default.walk)
    assert tiny.walk.round_trips > default.walk.round_trips


def test_a_stored_conflict_is_found_from_either_end():
    """Nodes arrive with their outgoing CONFLICT edges only; the selected nodes' lists cover the other way."""
    selected = Selected(4, 2)
    selected.add("a", np.asarray([1.0, 0.0], dtype=np.float32), 0, ["x"])
    assert selected.stored_conflict("x", [], {"a"}) == "a"
    assert selected.stored_conflict("y", ["a"], {"a"}) == "a"
    assert selected.stored_conflict("x", [], {"b"}) is None
    assert selected.cos("a", np.asarray([-0.6, 0.8])) == pytest.approx(-0.6)


def test_consistency_against_the_anchor_and_pool_centring_follow_their_definitions():
    """The deviations do what they say: every walk pick keeps |cos(mean S', K)| >= delta |cos(anchor, K)|, and
    the centred walk decides on (z - mean) / |z - mean|."""
    features = clustered_vectors(90, 16, clusters=6, spread=0.9, seed=3)
    ids = [f"n{i}" for i in range(90)]
    components = core_knowledge(features[:12], 24, 0.6, centered=True, orient=True)
    anchored = reference_walk(features, ids, components, SelectionConfig(n_select=24, consistency_reference="anchor"))
    for ci, comp in enumerate(components):
        members = [p for p in anchored.picks if p.component == ci]
        if not members:
            continue
        anchor = abs(members[0].cos_k)
        total = np.zeros(16)
        for pick in members:
            total += features[pick.row].astype(np.float64)
            if pick.how == "walk":
                assert abs(total @ comp.vector) / np.linalg.norm(total) >= 0.8 * anchor - 1e-12
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    centred = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    walked = reference_walk(features, ids, components, SelectionConfig(n_select=24, center_pool=True))
    first = walked.picks[0]
    assert first.how == "anchor"
    assert first.cos_k == pytest.approx(max(centred @ components[0].vector), abs=1e-6)
    assert len(walked.alignment) == len(components) and walked.alignment[0]["anchor"] == pytest.approx(abs(first.cos_k))

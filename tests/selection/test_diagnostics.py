"""Regime diagnostics of G2IS runs against the real server: stored on the run, printed, explained, compared."""

from __future__ import annotations

import json

import numpy as np
import pytest

from g2is_graph.config import GraphConfig, SelectionConfig
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.selection.diagnostics import pool_cosine_stats, share_text
from g2is_graph.selection.explain import compare_runs, explain
from g2is_graph.selection.runs import select
from ingest.graph_build import build_graph


def build(graph, tmp_path, vectors, n_val=8, k=8):
    n, dim = vectors.shape
    train = synthetic_store(tmp_path / "train" / "c", vectors, synthetic_rows(n))
    rng = np.random.default_rng(0)
    val = vectors[rng.choice(n, n_val, replace=False)] + 0.2 * rng.standard_normal((n_val, dim)).astype(np.float32)
    val_store = synthetic_store(tmp_path / "val" / "c", val, synthetic_rows(n_val, prefix="v", task="t"), kind="sgd")
    build_graph(graph, [train.path], GraphConfig(k=k, exact=True, device="cpu"), tmp_path / "state",
                validation_stores=[val_store.path], progress=False)


def test_pool_cosine_statistics_are_those_of_the_sample():
    x = clustered_vectors(50, 16, clusters=4, seed=1)
    stats = pool_cosine_stats(x, sample=50)
    cos = (x.astype(np.float64) @ x.T.astype(np.float64))[np.triu_indices(50, 1)]
    assert stats["pairs"] == 1225 and stats["mean"] == pytest.approx(cos.mean())
    assert stats["negative_fraction"] == pytest.approx((cos < 0).mean()) and stats["min"] == pytest.approx(cos.min())


def test_a_run_with_few_picks_per_component_says_the_walk_barely_runs(graph, tmp_path):
    build(graph, tmp_path, clustered_vectors(80, 24, clusters=6, spread=0.9, seed=2))
    messages = []
    run = select(graph, SelectionConfig(n_select=8, tau=0.9), None, progress=False, echo=messages.append)
    d = run.diagnostics
    assert d["components"] == len(run.components) and d["picks_per_component"]["median"] < 5
    assert sum(d["share"].values()) == pytest.approx(1.0) and d["share"]["anchor"] == sum(1 for f in run.walk.filled if f) / 8
    assert [a["component"] for a in d["alignment"]] == list(range(len(run.components)))
    assert any("the walk barely runs" in m for m in messages)
    assert "regime:" in run.summary() and "picks per component" in run.summary()
    stored = graph.read("run_get", id=run.id)[0]["run"]
    assert json.loads(stored["diagnostics"]) == d and any("barely runs" in w for w in stored["warnings"])
    answer = explain(graph, run.id, run.picks[0].id)
    assert answer["diagnostics"] == d and "regime:" in answer["text"] and "barely runs" in answer["text"]
    many = select(graph, SelectionConfig(n_select=40, n_components=2), None, progress=False, echo=messages.append)
    assert many.diagnostics["picks_per_component"]["median"] == 20
    assert not any("barely" in w for w in many.diagnostics["warnings"])
    compared = compare_runs(graph, [run.id, many.id])
    assert set(compared["diagnostics"]) == {run.id, many.id}


def test_a_pool_in_one_cone_has_no_conflict_edge_and_says_so(graph, tmp_path):
    rng = np.random.default_rng(3)
    cone = 3.0 + 0.4 * rng.standard_normal((60, 16))
    cone = (cone / np.linalg.norm(cone, axis=1, keepdims=True)).astype(np.float32)
    build(graph, tmp_path, cone)
    messages = []
    run = select(graph, SelectionConfig(n_select=30, n_components=2), None, progress=False, echo=messages.append)
    d = run.diagnostics
    assert d["conflict_edges"] == 0 and d["pool_cosines"]["negative_fraction"] == 0 and d["pool_cosines"]["min"] > 0
    assert d["rejections"].get("conflict", 0) == 0
    assert any("no CONFLICT edge" in m for m in messages)


def test_rejections_are_relationships_cypher_can_query(graph, tmp_path):
    """Why a candidate was refused is queryable in Cypher: one REJECTED relationship per refusal, named fields."""
    from collections import Counter

    build(graph, tmp_path, clustered_vectors(80, 24, clusters=6, spread=0.9, seed=2))
    run = select(graph, SelectionConfig(n_select=30, n_components=2, delta=0.97), None, progress=False,
                 echo=lambda m: None)
    assert run.walk.rejections
    rows = graph._run_auto("MATCH (:SelectionRun {id: $id})-[e:REJECTED]->(s:Sample) "
                           "RETURN e.reason AS reason, count(*) AS n", {"id": run.id})
    assert {r["reason"]: r["n"] for r in rows} == dict(Counter(r.reason for r in run.walk.rejections))
    first = run.walk.rejections[0]
    (stored,) = graph.read("run_rejections", run=run.id, id=first.id)[:1]
    assert (stored["component"], stored["step"], stored["reason"], stored["other"]) == \
        (first.component, first.step, first.reason, first.other)


def test_a_few_negative_pairs_in_millions_do_not_print_as_zero():
    assert share_text(28 / 4_500_000) == "6.2e-06"
    assert share_text(0.0) == "0.0%" and share_text(0.125) == "12.5%"

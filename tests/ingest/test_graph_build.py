"""The graph job against the real server: exact edges, idempotent re-runs, incremental = all at once,
interrupted writes, duplicate content, refusal of another feature space, validation nodes, recall."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from g2is_graph.config import GraphConfig
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.db.graph import Graph, GraphError, decode_vectors
from g2is_graph.neighbors import knn
from g2is_graph.neighbors.knn import exact_topk
from g2is_graph.numerics import exact_matvec, float32_dot_error
from g2is_graph.store.features import StoreError
from ingest.graph_build import BuildResult, build_graph

EXACT = GraphConfig(k=5, exact=True, device="cpu", node_batch=7, edge_batch=9)


def edge_set(graph: Graph) -> set[tuple]:
    """Every edge with its weight as stored: weights are exact cosines, so equal graphs compare equal bit for bit."""
    rows = graph._run_auto("MATCH (a:Sample)-[e]->(b:Sample) RETURN type(e) AS kind, a.id AS a, b.id AS b, "
                           "e.weight AS w, e.rank AS rank")
    return {(r["kind"], r["a"], r["b"], r["w"], r["rank"]) for r in rows}


def node_set(graph: Graph) -> set[tuple]:
    rows = graph._run_auto("MATCH (s:Sample) RETURN s.id AS id, s.content_hash AS h, s.space AS space, "
                           "s.gradient_f32 AS g, s.source_file AS f, s.line AS line, s.row AS row")
    return {tuple(r.values()) for r in rows}


@pytest.fixture()
def pool(tmp_path):
    vectors = clustered_vectors(60, 32, clusters=6, seed=3)
    return vectors, synthetic_store(tmp_path / "all" / "ckpt", vectors, synthetic_rows(60))


def test_exact_build_writes_nodes_and_the_exact_edges(graph, pool, tmp_path):
    vectors, store = pool
    result = build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False, echo=lambda m: None)
    assert result.n_nodes == 60 and result.n_new == 60 and not result.up_to_date
    counts = graph.counts()
    assert counts["samples"] == 60 and counts["similar"] == 60 * 5 and counts["conflict"] == 60 * 5
    exact = exact_topk(vectors, vectors, 5, exclude=np.arange(60), device="cpu")
    for i in (0, 17, 59):
        similar = graph.read("similar_of", id=f"s{i}")
        assert [r["id"] for r in similar] == [f"s{j}" for j in exact.similar_index[i]]
        np.testing.assert_allclose([r["weight"] for r in similar], exact.similar_weight[i], atol=1e-6)
        conflict = graph.conflicts_of(f"s{i}")
        assert [r["id"] for r in conflict] == [f"s{j}" for j in exact.conflict_index[i]]
        np.testing.assert_allclose([r["weight"] for r in conflict], exact.conflict_weight[i], atol=1e-6)
        stored = decode_vectors(graph.read("sample_vectors", ids=[f"s{i}"] + [r["id"] for r in similar]))
        assert list(exact_matvec(stored[1:], stored[0])) == [r["weight"] for r in similar]  # conflicts_of's cosines
        assert all(r["weight"] < 0 for r in conflict)
    stored = decode_vectors(graph.read("sample_vectors", ids=["s7"]))[0]
    np.testing.assert_array_equal(stored, vectors[7])
    space = graph.read("feature_space")[0]
    assert space["id"] == result.space_id and space["status"] == "complete" and space["n_samples"] == 60


def test_rerun_is_a_no_op_and_a_reset_database_is_rewritten(graph, pool, tmp_path):
    _, store = pool
    build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    before = (node_set(graph), edge_set(graph))
    again = build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    assert again.up_to_date and (node_set(graph), edge_set(graph)) == before
    graph.clear()
    rebuilt = build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    assert not rebuilt.up_to_date and (node_set(graph), edge_set(graph)) == before


@pytest.mark.parametrize("seed", [5, 11])
def test_ingesting_a_then_b_equals_a_plus_b_in_exact_mode(graph, tmp_path, monkeypatch, seed):
    """Exactly, on any BLAS: the parts are built with float32 products rounded differently (within the
    rounding bound) than the whole, as another CPU's kernels or another blocking would round them."""
    vectors = clustered_vectors(80, 32, clusters=8, seed=seed)
    rows = synthetic_rows(80)
    whole = synthetic_store(tmp_path / "whole" / "ckpt", vectors, rows)
    build_graph(graph, [whole.path], EXACT, tmp_path / "state-whole", progress=False)
    expected = (node_set(graph), edge_set(graph))
    graph.clear()
    product = knn.float32_cosines
    noise = torch.Generator().manual_seed(seed)

    def another_blas(q, base):
        sims = product(q, base)
        return sims + (torch.rand(sims.shape, generator=noise) * 2 - 1) * 0.9 * float32_dot_error(32)

    monkeypatch.setattr(knn, "float32_cosines", another_blas)
    parts = [(0, 50), (50, 79), (79, 80)]
    results = [build_graph(graph, [synthetic_store(tmp_path / f"part{a}" / "ckpt", vectors[a:b], rows[a:b]).path],
                           EXACT, tmp_path / "state-parts", progress=False) for a, b in parts]
    assert [r.n_new for r in results] == [50, 29, 1]
    assert results[2].n_changed < 80  # a single newcomer rewrites only the lists it entered, and its own
    assert (node_set(graph), edge_set(graph)) == expected


def test_duplicate_content_is_skipped_and_a_reused_id_is_refused(graph, pool, tmp_path):
    vectors, store = pool
    build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    rows = synthetic_rows(60)[:10] + synthetic_rows(5, prefix="new")
    again = synthetic_store(tmp_path / "again" / "ckpt", np.concatenate([vectors[:10], vectors[:5] * -1]), rows)
    result = build_graph(graph, [again.path], EXACT, tmp_path / "state", progress=False, echo=lambda m: None)
    assert result.n_duplicates == 10 and result.n_new == 5 and graph.counts()["samples"] == 65
    clash = synthetic_rows(1, prefix="s")
    clash[0]["content_hash"] = "something else"
    bad = synthetic_store(tmp_path / "clash" / "ckpt", vectors[:1], clash)
    with pytest.raises(StoreError, match="s0.*already in the graph"):
        build_graph(graph, [bad.path], EXACT, tmp_path / "state", progress=False)
    assert graph.counts()["samples"] == 65


def test_features_from_another_projector_are_refused(graph, pool, tmp_path):
    vectors, store = pool
    build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    other = synthetic_store(tmp_path / "other" / "ckpt", vectors, synthetic_rows(60, prefix="o"), projector_seed=1)
    with pytest.raises(GraphError, match="feature space"):
        build_graph(graph, [other.path], EXACT, tmp_path / "state-other", progress=False)
    with pytest.raises(StoreError, match="feature space"):
        build_graph(graph, [other.path], EXACT, tmp_path / "state", progress=False)
    assert graph.counts()["samples"] == 60


def test_interrupted_write_resumes_to_the_uninterrupted_graph(graph, pool, tmp_path, monkeypatch):
    _, store = pool
    build_graph(graph, [store.path], EXACT, tmp_path / "state-ref", progress=False)
    expected = (node_set(graph), edge_set(graph))
    graph.clear()
    original = Graph.write_rows
    calls = {"n": 0}

    def failing(self, name, rows, batch_size, progress=None, **params):
        if name == "sync_similar":
            calls["n"] += 1
            if calls["n"] == 1:
                rows = list(rows)[: batch_size * 2]
                original(self, name, rows, batch_size, progress, **params)
                raise GraphError("simulated crash mid-write")
        return original(self, name, rows, batch_size, progress, **params)

    monkeypatch.setattr(Graph, "write_rows", failing)
    with pytest.raises(GraphError, match="simulated"):
        build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    assert graph.read("feature_space")[0]["status"] == "writing"
    result = build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    assert not result.up_to_date
    assert (node_set(graph), edge_set(graph)) == expected
    assert graph.read("feature_space")[0]["status"] == "complete"


def test_hnsw_build_reports_recall_and_extends_its_index(graph, tmp_path):
    vectors = clustered_vectors(700, 64, clusters=20, seed=1)
    rows = synthetic_rows(700)
    config = GraphConfig(k=8, recall_sample=200, device="cpu")
    first = synthetic_store(tmp_path / "a" / "ckpt", vectors[:500], rows[:500])
    result = build_graph(graph, [first.path], config, tmp_path / "state", progress=False)
    assert result.recall["similar"] >= 0.95 and result.recall["conflict"] >= 0.90
    assert (tmp_path / "state" / "index-1.bin").exists()
    second = synthetic_store(tmp_path / "b" / "ckpt", vectors[500:], rows[500:])
    result = build_graph(graph, [second.path], config, tmp_path / "state", progress=False)
    assert (tmp_path / "state" / "index-2.bin").exists() and not (tmp_path / "state" / "index-1.bin").exists()
    assert result.n_nodes == 700 and result.recall["similar"] >= 0.95 and result.recall["conflict"] >= 0.90
    counts = graph.counts()
    assert counts["samples"] == 700 and counts["similar"] == 700 * 8 and counts["conflict"] == 700 * 8


def test_checkpoints_combine_into_the_weighted_cosine_and_validation_nodes_are_written(graph, tmp_path):
    a, b = clustered_vectors(30, 16, clusters=3, seed=1), clustered_vectors(30, 16, clusters=3, seed=2)
    rows = synthetic_rows(30)
    s1 = synthetic_store(tmp_path / "train" / "c1", a, rows, checkpoint="c1", mean_lr=3e-5)
    s2 = synthetic_store(tmp_path / "train" / "c2", b, rows, checkpoint="c2", mean_lr=1e-5)
    val_rows = synthetic_rows(4, prefix="v", task="gsm8k")
    v1 = synthetic_store(tmp_path / "val" / "c1", a[:4], val_rows, kind="sgd", checkpoint="c1", mean_lr=3e-5)
    v2 = synthetic_store(tmp_path / "val" / "c2", b[:4], val_rows, kind="sgd", checkpoint="c2", mean_lr=1e-5)
    config = GraphConfig(k=29, exact=True, device="cpu")
    result = build_graph(graph, [s1.path, s2.path], config, tmp_path / "state", validation_stores=[v1.path, v2.path],
                         progress=False)
    assert result.n_validation == 4
    weighted = 0.75 * (a @ a.T) + 0.25 * (b @ b.T)
    similar = {r["id"]: r["weight"] for r in graph.read("similar_of", id="s0")}
    for j in (1, 5, 29):
        assert similar[f"s{j}"] == pytest.approx(weighted[0, j], abs=1e-5)
    val = graph.read("validation_vectors", space=result.space_id, tasks=None)
    assert [v["task"] for v in val] == ["gsm8k"] * 4 and len(val[0]["gradient"]) == 32 * 4  # float32 bytes
    with pytest.raises(StoreError, match="sgd"):
        build_graph(graph, [s1.path, s2.path], config, tmp_path / "state", validation_stores=[s1.path, s2.path],
                    progress=False)


def test_validation_dot_products_follow_new_nodes_and_a_new_validation_set(graph, tmp_path):
    """The walk ranks anchors from these: each build writes them for exactly the nodes that lack current ones."""
    vectors = clustered_vectors(50, 32, clusters=5, seed=6)
    rows = synthetic_rows(50)
    first_val = synthetic_store(tmp_path / "val1" / "ckpt", vectors[:3] + 0.1, synthetic_rows(3, prefix="v", task="t"),
                                kind="sgd")
    part = lambda a, b: synthetic_store(tmp_path / f"part{a}" / "ckpt", vectors[a:b], rows[a:b]).path  # noqa: E731
    first = build_graph(graph, [part(0, 40)], EXACT, tmp_path / "state", validation_stores=[first_val.path],
                        progress=False)
    assert first.n_dots == 40
    grown = build_graph(graph, [part(40, 50)], EXACT, tmp_path / "state", progress=False)
    assert grown.n_new == 10 and grown.n_dots == 10
    more_val = synthetic_store(tmp_path / "val2" / "ckpt", vectors[10:12], synthetic_rows(2, prefix="w", task="u"),
                               kind="sgd")
    again = build_graph(graph, [part(40, 50)], EXACT, tmp_path / "state", validation_stores=[more_val.path],
                        progress=False)
    assert again.n_new == 0 and again.n_dots == 50  # another validation set: every node's dots change

    validation = graph.read("validation_vectors", space=again.space_id, tasks=None)
    basis = np.stack([np.frombuffer(v["gradient"], dtype="<f4") for v in validation]).astype(np.float64)
    stored = graph._run_auto("MATCH (s:Sample) RETURN s.gradient_f32 AS vector, s.validation_dots AS dots ORDER BY s.row")
    dots = np.stack([np.frombuffer(r["dots"], dtype="<f8") for r in stored])
    nodes = np.stack([np.frombuffer(r["vector"], dtype="<f4") for r in stored]).astype(np.float64)
    assert dots.shape == (50, 5)
    np.testing.assert_allclose(dots, nodes @ basis.T, rtol=1e-12, atol=1e-15)


def test_a_new_state_on_a_database_built_from_another_state_is_refused_not_up_to_date(graph, tmp_path):
    """Issue 15 (1): store C into a new --state on a database holding the build of store A."""
    a = synthetic_store(tmp_path / "A" / "ckpt", clustered_vectors(40, 32, clusters=4, seed=1), synthetic_rows(40))
    c = synthetic_store(tmp_path / "C" / "ckpt", clustered_vectors(30, 32, clusters=4, seed=2),
                        synthetic_rows(30, prefix="c"))
    build_graph(graph, [a.path], EXACT, tmp_path / "sA", progress=False)
    before = (node_set(graph), edge_set(graph))
    with pytest.raises(GraphError, match=r"40 samples that the graph state .*sC does not list.*built from the graph "
                                         r"state .*sA \(build 1, 40 samples") as refused:
        build_graph(graph, [c.path], EXACT, tmp_path / "sC", progress=False)
    assert "--state" in refused.value.hint
    assert (node_set(graph), edge_set(graph)) == before
    grown = build_graph(graph, [c.path], EXACT, tmp_path / "sA", progress=False)  # the graph's own state adds C
    assert grown.n_new == 30 and graph.counts()["samples"] == 70


def test_a_build_rewrites_what_the_database_lost_instead_of_calling_it_up_to_date(graph, pool, tmp_path):
    _, store = pool
    build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False)
    expected = (node_set(graph), edge_set(graph))
    graph._run_auto("MATCH (s:Sample) WHERE s.id IN ['s3', 's40'] DETACH DELETE s")
    again = build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False, echo=lambda m: None)
    assert not again.up_to_date and (node_set(graph), edge_set(graph)) == expected
    graph._run_auto("MATCH (:Sample {id: 's7'})-[e:CONFLICT]->() DELETE e")
    assert not build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False).up_to_date
    assert (node_set(graph), edge_set(graph)) == expected
    assert build_graph(graph, [store.path], EXACT, tmp_path / "state", progress=False).up_to_date


def test_a_second_writer_waits_for_the_first_or_is_refused_by_name(graph, neo4j_uri, pool, tmp_path):
    import threading
    import time

    from g2is_graph.locks import DatabaseLock, FileLock, LockBusy

    _, store = pool
    said = []
    held = FileLock(tmp_path / "state" / "lock", "the state").acquire(0.0)

    def second_writer():
        with Graph(neo4j_uri) as other:
            build_graph(other, [store.path], EXACT, tmp_path / "state", progress=False, echo=said.append)

    waiting = threading.Thread(target=second_writer)
    waiting.start()
    time.sleep(2.0)  # however long it waits, nothing is written while another process holds the state
    assert graph.counts()["samples"] == 0 and waiting.is_alive()
    held.release()
    waiting.join(timeout=120)
    assert graph.counts()["samples"] == 60 and any("waiting for the graph state directory" in m for m in said)
    graph.clear()
    no_wait = dataclasses.replace(EXACT, lock_wait_s=0.0)
    with FileLock(tmp_path / "state" / "lock", "the state").acquire(0.0):
        with pytest.raises(LockBusy, match=r"graph state directory .*state is in use by pid \d+ on .*since"):
            build_graph(graph, [store.path], no_wait, tmp_path / "state", progress=False)
    with DatabaseLock(graph).acquire(0.0):
        with pytest.raises(LockBusy, match=r"the graph in database neo4j at bolt://.* is being written by pid \d+"):
            build_graph(graph, [store.path], no_wait, tmp_path / "other-state", progress=False)
    assert graph.counts()["samples"] == 0
    build_graph(graph, [store.path], no_wait, tmp_path / "state", progress=False)  # released: goes through
    assert graph.counts()["samples"] == 60


def test_two_builds_into_one_state_at_once_end_in_the_sequential_graph(graph, neo4j_uri, tmp_path):
    """Issue 15 (2): two `graph build` of different stores into one --state at the same time."""
    import threading

    vectors = clustered_vectors(500, 32, clusters=10, seed=8)
    rows = synthetic_rows(500)
    a = synthetic_store(tmp_path / "A" / "ckpt", vectors[:300], rows[:300])
    c = synthetic_store(tmp_path / "C" / "ckpt", vectors[300:], rows[300:])
    whole = synthetic_store(tmp_path / "whole" / "ckpt", vectors, rows)
    config = dataclasses.replace(EXACT, node_batch=25, edge_batch=25)
    build_graph(graph, [whole.path], config, tmp_path / "reference", progress=False)
    expected_edges = edge_set(graph)
    graph.clear()
    errors, barrier = [], threading.Barrier(2)

    def build(store):
        try:
            with Graph(neo4j_uri) as g:
                barrier.wait()
                build_graph(g, [store.path], config, tmp_path / "shared", progress=False, echo=lambda m: None)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(s,)) for s in (a, c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    state = json.loads((tmp_path / "shared" / "state.json").read_text())
    stored = graph._run_auto("MATCH (s:Sample) RETURN s.id AS id, s.row AS row ORDER BY s.row")
    assert [r["id"] for r in stored] == state["ids"] and [r["row"] for r in stored] == list(range(500))
    assert edge_set(graph) == expected_edges
    assert graph.read("feature_space")[0]["status"] == "complete"


def test_a_kill_between_the_hnsw_index_and_the_state_file_changes_no_edge(graph, tmp_path, monkeypatch):
    """Issue 15 (5): the process dies after the extended index is saved and before state.json names it."""
    vectors = clustered_vectors(1000, 32, clusters=8, seed=4)
    rows = synthetic_rows(1000)
    first = synthetic_store(tmp_path / "a" / "ckpt", vectors[:700], rows[:700])
    second = synthetic_store(tmp_path / "b" / "ckpt", vectors[700:], rows[700:])
    # a small, approximate index (recall below 1), as at the scale of the issue: its insertion history shows
    config = GraphConfig(k=8, m=4, ef=8, ef_construction=8, ef_negative=8, negative_candidates=8, similar_candidates=8,
                         recall_sample=50, threads=1, device="cpu", edge_batch=250, node_batch=250)
    build_graph(graph, [first.path], config, tmp_path / "reference", progress=False)
    build_graph(graph, [second.path], config, tmp_path / "reference", progress=False)
    expected = (node_set(graph), edge_set(graph))
    graph.clear()
    build_graph(graph, [first.path], config, tmp_path / "state", progress=False)
    saved = knn.HnswIndex.save

    def save_then_die(self, path):
        saved(self, path)
        raise SystemExit("killed after the index was saved")  # state.json is not written

    monkeypatch.setattr(knn.HnswIndex, "save", save_then_die)
    with pytest.raises(SystemExit):
        build_graph(graph, [second.path], config, tmp_path / "state", progress=False)
    monkeypatch.setattr(knn.HnswIndex, "save", saved)
    build_graph(graph, [second.path], config, tmp_path / "state", progress=False)
    assert (node_set(graph), edge_set(graph)) == expected


def test_a_build_whose_sampled_recall_misses_the_goals_says_so(tmp_path):
    def summary(similar, conflict):
        return BuildResult("s", tmp_path, 10, 10, 0, 10, {"similar": similar, "conflict": conflict, "sample": 10}).summary()

    assert "warning" not in summary(0.99, 0.95) and "warning" not in summary(0.96, None)
    low = summary(0.94, 0.30)
    assert "warning: approximate search recall SIMILAR 0.940 < 0.95, CONFLICT 0.300 < 0.9" in low
    assert 'exact = true, or index = "ivf" (with ivf_probe = 12' in low

"""The graph layer against the real server: schema, round trips, 8192-dim vectors, errors."""

from __future__ import annotations

import numpy as np
import pytest

from g2is_graph.db.graph import Graph, GraphUnavailable, cypher, decode_vectors, statements
from g2is_graph.db.server import _free_port


def sample_rows(vectors: np.ndarray, prefix: str = "s") -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "source_file": "pool.jsonl", "line": i + 1, "dataset": "unit",
         "content_hash": f"h{i}", "n_tokens": 10 + i, "n_loss_tokens": 3, "preview": f"text {i}",
         "row": i, "gradient_f32": vec.astype("<f4").tobytes()}
        for i, vec in enumerate(vectors)
    ]


def test_schema_is_idempotent_and_creates_constraints(graph: Graph):
    graph.init_schema()
    graph._run_auto("CREATE INDEX similar_weight IF NOT EXISTS FOR ()-[e:SIMILAR]-() ON (e.weight)")  # older g2is
    graph._schema_ready = False
    graph.init_schema()
    names = {r["name"] for r in graph._run_auto("SHOW CONSTRAINTS YIELD name")}
    assert {"sample_id", "validation_id", "run_id", "featurespace_id"} <= names
    indexes = {r["name"] for r in graph._run_auto("SHOW INDEXES YIELD name")}
    assert "sample_content_hash" in indexes
    assert not {"similar_weight", "conflict_weight"} & indexes  # unused by any query, 8.5% of the store


def test_vectors_round_trip_8192_dims_as_float32_stored_once(graph: Graph):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, 8192)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    graph._run_auto("CREATE (:Sample {id: 's0', gradient: [1.0, 2.0]})")  # the second copy an older g2is wrote
    written = graph.write("upsert_samples", rows=sample_rows(vectors), space="test-space")
    assert written[0]["written"] == 3
    back = dict(zip(["s0", "s1", "s2"], decode_vectors(graph.read("sample_vectors", ids=["s0", "s1", "s2"]))))
    for i in range(3):
        assert back[f"s{i}"].shape == (8192,)
        np.testing.assert_array_equal(back[f"s{i}"], vectors[i])
    keys = graph._run_auto("MATCH (s:Sample {id: 's0'}) RETURN keys(s) AS k")[0]["k"]
    assert "gradient_f32" in keys and "gradient" not in keys  # one copy of the vector


def test_vector_similarity_cosine_in_cypher_decodes_the_stored_bytes(graph: Graph):
    """pair_cosine decodes the stored float32 bytes in plain Cypher (zeros, negative zero and subnormals
    included), so Cypher's vector.similarity.cosine applies to the one stored copy."""
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((2, 256)).astype(np.float32)
    vectors[1] = -0.7 * vectors[0] + 0.3 * vectors[1]  # a clearly negative cosine
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[0, :4] = [0.0, -0.0, np.float32(1e-40), np.float32(-3e-39)]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    graph.write("upsert_samples", rows=sample_rows(vectors), space="test-space")
    row = graph.read("pair_cosine", a="s0", b="s1")[0]
    expected = float(vectors[0] @ vectors[1])
    assert expected < -0.5
    assert row["cosine"] == pytest.approx(expected, abs=1e-5)
    assert row["similarity"] == pytest.approx((1 + expected) / 2, abs=1e-5)


def test_edge_sync_is_idempotent_and_drops_displaced_edges(graph: Graph):
    vectors = np.eye(4, 16, dtype=np.float32)
    graph.write("upsert_samples", rows=sample_rows(vectors), space="test-space")
    rows = [{"source": "s0", "targets": ["s1", "s2"], "weights": [0.5, 0.25]}]
    for _ in range(2):
        graph.write_rows("sync_similar", rows, batch_size=1)
    assert graph.read("similar_of", id="s0") == [{"id": "s1", "weight": 0.5, "rank": 0},
                                                {"id": "s2", "weight": 0.25, "rank": 1}]
    assert graph.counts()["similar"] == 2
    graph.write_rows("sync_similar", [{"source": "s0", "targets": ["s3", "s1"], "weights": [0.7, 0.5]}], 10)
    assert graph.read("similar_of", id="s0") == [{"id": "s3", "weight": 0.7, "rank": 0},
                                                {"id": "s1", "weight": 0.5, "rank": 1}]
    for _ in range(2):
        graph.write_rows("sync_conflict", [{"source": "s1", "targets": ["s2", "s3"]}], 10)
    graph.write_rows("sync_conflict", [{"source": "s1", "targets": ["s2"]}], 10)
    assert graph.conflicts_of("s1") == [{"id": "s2", "weight": 0.0, "rank": 0}]  # from the vectors: e1 . e2
    bare = graph._run_auto("MATCH ()-[e:CONFLICT]->() RETURN properties(e) AS p")
    assert [r["p"] for r in bare] == [{}]  # a property would cost a 41-byte record per edge
    counts = graph.counts()
    assert counts["samples"] == 4 and counts["similar"] == 2 and counts["conflict"] == 1


def test_duplicate_sample_id_violates_constraint(graph: Graph):
    from g2is_graph.db.graph import GraphError

    graph._run_auto("CREATE (:Sample {id: 'dup'})")
    with pytest.raises(GraphError, match="already exists"):
        graph._guard(graph._run_auto, "CREATE (:Sample {id: 'dup'})")


def test_unreachable_server_is_one_clear_error_without_password():
    uri = f"bolt://127.0.0.1:{_free_port()}"
    g = Graph(uri, auth=("neo4j", "topsecret-password"))
    with pytest.raises(GraphUnavailable) as info:
        g.check()
    g.close()
    message = str(info.value)
    assert uri in message and "g2is neo4j start" in message
    assert "topsecret" not in message


def test_cypher_files_load_by_name_and_reject_paths():
    assert "MERGE (s:Sample" in cypher("upsert_samples")
    assert len(statements("schema")) >= 5
    with pytest.raises(ValueError):
        cypher("../pyproject")
    with pytest.raises(KeyError):
        cypher("no_such_statement")

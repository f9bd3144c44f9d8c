"""Faults survived, bad input refused, nothing injected: against real Neo4j servers."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from g2is_graph.config import GraphConfig, ServerConfig
from g2is_graph.data.records import RecordError, read_jsonl
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.db.graph import Graph, GraphUnavailable
from g2is_graph.db.server import LocalServer, _free_port
from ingest.graph_build import build_graph

INJECTIONS = [
    "x'}) DETACH DELETE (n) //",
    '"}) MATCH (n) DETACH DELETE n RETURN 1 //',
    "`) CALL dbms.security.createUser('evil', 'pw', false) //",
    "$rows UNWIND [1] AS i CREATE (:Evil)",
    "\\u0027; DROP CONSTRAINT sample_id;",
]


def graph_checksum(graph: Graph) -> str:
    nodes = graph._run_auto("MATCH (s:Sample) RETURN s.id AS id, s.content_hash AS h, s.row AS row, "
                            "s.gradient_f32 AS g ORDER BY s.id")
    edges = graph._run_auto("MATCH (a:Sample)-[e]->(b:Sample) RETURN type(e) AS t, a.id AS a, b.id AS b, "
                            "e.weight AS w, e.rank AS r ORDER BY t, a, b")
    space = graph._run_auto("MATCH (f:FeatureSpace) RETURN f.id AS id, f.build AS build, f.status AS status, "
                            "f.n_samples AS n")
    body = json.dumps([nodes, edges, space], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def test_cypher_injection_strings_are_stored_verbatim_and_execute_nothing(graph, tmp_path):
    graph._run_auto("CREATE (:Sentinel {name: 'still here'})")
    n = 12
    rows = synthetic_rows(n)
    for i, text in enumerate(INJECTIONS):
        rows[i]["id"] = text
        rows[i]["preview"] = text
        rows[i]["source_file"] = text
    store = synthetic_store(tmp_path / "s" / "c", clustered_vectors(n, 16, clusters=3, seed=0), rows)
    build_graph(graph, [store.path], GraphConfig(k=4, exact=True, device="cpu"), tmp_path / "state", progress=False)
    stored = {r["id"]: r for r in graph._run_auto("MATCH (s:Sample) RETURN s.id AS id, s.preview AS preview, "
                                                  "s.source_file AS f")}
    for text in INJECTIONS:
        assert stored[text]["preview"] == text and stored[text]["f"] == text
    assert graph._run_auto("MATCH (x:Sentinel) RETURN count(x) AS n")[0]["n"] == 1
    assert graph._run_auto("MATCH (x:Evil) RETURN count(x) AS n")[0]["n"] == 0
    names = {r["name"] for r in graph._run_auto("SHOW CONSTRAINTS YIELD name")}
    assert "sample_id" in names
    assert graph.counts()["samples"] == n


def test_concurrent_writers_of_the_same_build_do_not_duplicate(graph, neo4j_uri, tmp_path):
    n = 200
    store = synthetic_store(tmp_path / "s" / "c", clustered_vectors(n, 32, clusters=5, seed=1), synthetic_rows(n))
    errors = []

    def worker(state):
        try:
            with Graph(neo4j_uri) as g:
                build_graph(g, [store.path], GraphConfig(k=6, exact=True, device="cpu", node_batch=20, edge_batch=25),
                            tmp_path / state, progress=False)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"state{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    counts = graph.counts()
    assert counts["samples"] == n and counts["similar"] == n * 6
    duplicates = graph._run_auto("MATCH (a:Sample)-[e:SIMILAR]->(b:Sample) WITH a, b, count(e) AS c WHERE c > 1 "
                                 "RETURN count(*) AS n")
    assert duplicates[0]["n"] == 0


@pytest.mark.slow
def test_server_killed_mid_build_then_rerun_ends_in_the_uninterrupted_graph(tmp_path):
    server = LocalServer(ServerConfig(state_dir=tmp_path / "neo4j", port=_free_port(), auth=False, heap="512m",
                                      pagecache="128m"))
    server.start(echo=lambda m: None)
    n = 600
    store = synthetic_store(tmp_path / "s" / "c", clustered_vectors(n, 64, clusters=8, seed=2), synthetic_rows(n))
    config = GraphConfig(k=8, exact=True, device="cpu", node_batch=10, edge_batch=10)
    try:
        with Graph(server.status().uri) as graph:
            graph.init_schema()
            build_graph(graph, [store.path], config, tmp_path / "reference", progress=False)
            expected = graph_checksum(graph)
            rng = random.Random(0)
            for attempt in range(3):
                graph.clear()
                kill_after = rng.uniform(0.2, 1.5)
                failure = []

                def build():
                    try:
                        with Graph(server.status().uri) as g:
                            build_graph(g, [store.path], config, tmp_path / f"state{attempt}", progress=False)
                    except GraphUnavailable as exc:
                        failure.append(exc)

                thread = threading.Thread(target=build)
                thread.start()
                time.sleep(kill_after)
                server.kill()
                thread.join(timeout=120)
                server.start(echo=lambda m: None)
                with Graph(server.status().uri) as fresh:
                    fresh.wait_until_available()
                    build_graph(fresh, [store.path], config, tmp_path / f"state{attempt}", progress=False)
                    assert graph_checksum(fresh) == expected, f"kill after {kill_after:.2f}s"
    finally:
        server.stop()


LINE = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.dictionaries(st.sampled_from(["id", "prompt", "completion", "messages", "instruction", "output", "input"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=20), st.lists(st.text(max_size=5), max_size=3),
                              st.lists(st.dictionaries(st.sampled_from(["role", "content"]),
                                                       st.one_of(st.text(max_size=8), st.integers()), max_size=2),
                                       max_size=3)),
                    max_size=4).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, min_size=1, max_size=6))
def test_malformed_jsonl_ends_in_a_clear_error_or_a_reported_skip(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines) + b"\n")
    try:
        read_jsonl(path)
    except RecordError as exc:
        assert str(path) in str(exc) and exc.line >= 1
    skipped = read_jsonl(path, skip_bad=True)
    assert all(str(path) in str(e) for e in skipped.skipped)


def test_non_finite_and_wrong_dimension_features_are_refused(tmp_path, pool_file):
    import torch

    from g2is_graph.store.features import StoreError, import_less

    records = read_jsonl(pool_file).records
    matrix = torch.randn(len(records), 8)
    matrix[3, 2] = float("nan")
    torch.save(matrix, tmp_path / "bad.pt")
    with pytest.raises(StoreError, match=r"row 3 .*pool.jsonl:4"):
        import_less(tmp_path / "bad.pt", [pool_file], tmp_path / "out", normalized=False, meta={})
    assert not (tmp_path / "out").exists()
    torch.save(torch.randn(len(records) + 1, 8), tmp_path / "rows.pt")
    with pytest.raises(StoreError, match="rows"):
        import_less(tmp_path / "rows.pt", [pool_file], tmp_path / "out2", normalized=False, meta={})
    a = synthetic_store(tmp_path / "a" / "c1", np.ones((4, 8), np.float32), synthetic_rows(4), checkpoint="c1")
    b = synthetic_store(tmp_path / "a" / "c2", np.ones((4, 16), np.float32), synthetic_rows(4), checkpoint="c2")
    from g2is_graph.store.space import open_stores

    with pytest.raises(StoreError, match="projector"):
        open_stores([a.path, b.path])


def test_auth_server_end_to_end_and_the_password_never_leaks(tmp_path, monkeypatch):
    """A server with auth on, credentials from the environment: build, select and explain through the CLI
    with --verbose; the password is in none of the outputs, manifests, state files or server logs."""
    from click.testing import CliRunner

    from g2is_graph.cli import main

    secret = "s3cret-" + hashlib.sha256(str(time.time()).encode()).hexdigest()[:12]
    server = LocalServer(ServerConfig(state_dir=tmp_path / "neo4j", port=_free_port(), auth=True, heap="512m",
                                      pagecache="128m"))
    server.start(echo=lambda m: None)
    try:
        with Graph(server.status().uri, auth=("neo4j", server.password())) as g:  # the user's own password
            g._driver.execute_query("ALTER CURRENT USER SET PASSWORD FROM $old TO $new",
                                    {"old": server.password(), "new": secret}, database_="system")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("NEO4J_URI", server.status().uri)
        monkeypatch.setenv("NEO4J_USER", "neo4j")
        monkeypatch.setenv("NEO4J_PASSWORD", secret)
        n = 30
        rows = synthetic_rows(n)
        with open(tmp_path / "synthetic.jsonl", "w") as fh:
            for r in rows:
                fh.write(json.dumps({"id": r["id"], "prompt": f"question {r['id']}", "completion": "answer"}) + "\n")
        vectors = clustered_vectors(n, 16, clusters=3, seed=4)
        train = synthetic_store(tmp_path / "train" / "c", vectors, rows)
        val = synthetic_store(tmp_path / "val" / "c", vectors[:5], synthetic_rows(5, prefix="v", task="t"), kind="sgd")
        runner = CliRunner()
        outputs = []
        for args in (["-v", "graph", "build", str(train.path), "--validation", str(val.path), "--exact", "--k", "5"],
                     ["-v", "select", "--n", "4", "--out", "runs"], ["-v", "runs"]):
            result = runner.invoke(main, args)
            assert result.exit_code == 0, result.output
            outputs.append(result.output)
        run_id = outputs[-1].split()[0]
        sample = (tmp_path / "runs" / run_id / "ids.txt").read_text().split()[0]
        result = runner.invoke(main, ["-v", "explain", "--run", run_id, "--sample", sample, "--json"])
        assert result.exit_code == 0 and json.loads(result.output)["selected"]
        outputs.append(result.output)
        monkeypatch.setenv("NEO4J_PASSWORD", "wrong-" + secret[::-1])
        refused = runner.invoke(main, ["-v", "db", "info"])
        assert refused.exit_code == 3
        outputs.append(refused.output)
        assert not any(secret in o or secret[::-1] in o for o in outputs)
        files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".log")]
        assert files and not any(secret in p.read_text(errors="replace") for p in files)
    finally:
        server.stop()


def test_transient_errors_are_retried_and_written_once(graph, monkeypatch):
    """Two simulated deadlocks inside a managed write: the driver retries with backoff, the rows land once."""
    from neo4j._sync.work.transaction import ManagedTransaction
    from neo4j.exceptions import TransientError

    rows = [{"id": f"t{i}", "source_file": "f", "line": i, "dataset": "d", "content_hash": f"h{i}", "n_tokens": 1,
             "n_loss_tokens": 1, "preview": "p", "row": i, "gradient_f32": b"\0" * 8}
            for i in range(3)]
    real_run = ManagedTransaction.run
    attempts = {"n": 0}

    def flaky_run(self, query, parameters=None, **kwargs):
        attempts["n"] += 1
        if attempts["n"] <= 2:
            raise TransientError("simulated deadlock")
        return real_run(self, query, parameters, **kwargs)

    monkeypatch.setattr(ManagedTransaction, "run", flaky_run)
    graph.write("upsert_samples", rows=rows, space="s")
    monkeypatch.setattr(ManagedTransaction, "run", real_run)
    assert attempts["n"] == 3  # two failures, then the write
    assert graph.counts()["samples"] == 3


def test_secure_uris_pass_through_to_the_driver_unchanged(monkeypatch):
    from g2is_graph.config import ConnectionConfig
    from g2is_graph.db.graph import resolve_connection

    for uri in ("neo4j+s://graph.example.invalid:7687", "bolt+s://graph.example.invalid:7687"):
        monkeypatch.setenv("NEO4J_URI", uri)
        monkeypatch.setenv("NEO4J_PASSWORD", "pw-from-env")
        resolved, auth, _ = resolve_connection(ConnectionConfig.from_env(), start_local=False)
        assert resolved == uri and auth == ("neo4j", "pw-from-env")
        g = Graph(resolved, auth)
        assert g._driver.encrypted  # the +s scheme reached the driver: TLS with certificate checks
        g.close()


def test_an_interrupted_selection_run_is_never_left_complete(graph, tmp_path, monkeypatch):
    from g2is_graph.config import SelectionConfig
    from g2is_graph.selection import runs as selection

    n = 40
    vectors = clustered_vectors(n, 16, clusters=3, seed=5)
    train = synthetic_store(tmp_path / "t" / "c", vectors, synthetic_rows(n))
    val = synthetic_store(tmp_path / "v" / "c", vectors[:5], synthetic_rows(5, prefix="v", task="t"), kind="sgd")
    build_graph(graph, [train.path], GraphConfig(k=5, exact=True, device="cpu"), tmp_path / "state",
                validation_stores=[val.path], progress=False)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(selection, "write_outputs", crash)
    with pytest.raises(OSError, match="simulated"):
        selection.select(graph, SelectionConfig(n_select=6), tmp_path / "runs", progress=False)
    runs = graph.read("runs_list")
    assert len(runs) == 1 and runs[0]["status"] == "failed" and "disk full (simulated)" in runs[0]["reason"]
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "disk full" in manifest["reason"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"]

"""The first build through `neo4j-admin database import` against a real server of its own: the imported graph
equals the one transactions write (nodes, vectors, dots, edges, the walk's picks), an incremental ingest on
it stays transactional and idempotent, strings the CSV files must quote come back as they were, and a failing
importer is a clear error naming its log, with the server left running."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import g2is_graph.db.server as server_module
from g2is_graph.config import GraphConfig, SelectionConfig, ServerConfig
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.db.graph import Graph
from g2is_graph.db.server import LocalServer, _free_port
from g2is_graph.errors import ServerError
from g2is_graph.selection.runs import select
from g2is_graph.store.space import combined_features
from ingest.graph_build import build_graph

TRANSACTIONS = GraphConfig(k=5, exact=True, device="cpu", bulk_import_from=0)
IMPORT = dataclasses.replace(TRANSACTIONS, bulk_import_from=1)


def everything(graph: Graph) -> dict[str, set]:
    nodes = graph._run_auto("MATCH (s:Sample) RETURN s.id AS id, properties(s) AS p")
    edges = graph._run_auto("MATCH (a:Sample)-[e]->(b:Sample) RETURN type(e) AS kind, a.id AS a, b.id AS b, "
                            "e.weight AS w, e.rank AS rank")
    validation = graph._run_auto("MATCH (v:Validation) RETURN v.id AS id, properties(v) AS p")
    space = graph._run_auto("MATCH (f:FeatureSpace) RETURN f.build AS build, f.status AS status, f.n_samples AS n")
    return {"nodes": {(r["id"], tuple(sorted((k, repr(v)) for k, v in r["p"].items()))) for r in nodes},
            "edges": {tuple(r.values()) for r in edges},
            "validation": {(r["id"], tuple(sorted((k, repr(v)) for k, v in r["p"].items()))) for r in validation},
            "space": {tuple(r.values()) for r in space}}


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    server = LocalServer(ServerConfig(state_dir=tmp_path_factory.mktemp("import-server"), port=_free_port(),
                                      auth=False, heap="512m", pagecache="128m", import_heap="512m",
                                      import_off_heap="256m"))
    server.start(echo=lambda m: None)
    yield server
    server.stop()


# what a CSV writer must quote or escape: its delimiters, quotes, line breaks, the array delimiter, empty strings,
# leading spaces, backslashes and non-ASCII text
TRICKY = ['say "hi", then\nleave', "", "  padded  ", "a;b;c", "back\\slash \\\"", "crlf\r\nline", "naïve 数学 ✓"]


def tricky_rows(n: int) -> list[dict]:
    rows = synthetic_rows(n)
    for i, row in enumerate(rows[:len(TRICKY) * 2]):
        text = TRICKY[i % len(TRICKY)]
        if i < len(TRICKY):
            row.update(preview=text, dataset=text, source_file=f"{text}.jsonl")
        else:  # ids too (a line break in an id makes the edge files multi-line as well)
            row.update(id=f"id {text}", preview=text)
    return rows


def stores(tmp_path, n: int = 90, extra: int = 25, dim: int = 32):
    vectors = clustered_vectors(n + extra, dim, clusters=5, spread=0.8, seed=11)
    first = synthetic_store(tmp_path / "a" / "c", vectors[:n], tricky_rows(n))
    second = synthetic_store(tmp_path / "b" / "c", vectors[n:], synthetic_rows(extra, start=n))
    rng = np.random.default_rng(5)
    val = vectors[rng.choice(n, 4, replace=False)] + 0.2 * rng.standard_normal((4, dim)).astype(np.float32)
    validation = synthetic_store(tmp_path / "v" / "c", val, synthetic_rows(4, prefix="v", task="t"), kind="sgd")
    return first.path, second.path, validation.path


def test_imported_first_build_equals_transactions_and_extends_transactionally(graph, own_server, tmp_path):
    first, second, validation = stores(tmp_path)
    build_graph(graph, [first], TRANSACTIONS, tmp_path / "tx", [validation], echo=lambda m: None, progress=False)
    said = []
    with Graph(own_server.status().uri) as imported:
        # a state folder with the importer's own separators in its name (`=` between labels and files, `,`)
        result = build_graph(imported, [first], IMPORT, tmp_path / "imp=1,a", [validation], echo=said.append,
                             progress=False, server=own_server)
        assert any("neo4j-admin" in line for line in said) and "IMPORT DONE" in result.import_summary
        assert result.n_dots == 0  # the dot products came with the import
        assert not list((tmp_path / "imp=1,a" / "import").glob("*.csv"))  # the import files are removed
        assert everything(imported) == everything(graph)
        previews = {r["p"] for r in imported._run_auto("MATCH (s:Sample) RETURN s.preview AS p")}
        assert set(TRICKY) <= previews  # not only equal to the transactions' graph: equal to the input
        config = SelectionConfig(n_select=12)
        walked = [select(g, config, None, progress=False, echo=lambda m: None).walk for g in (graph, imported)]
        assert [p.id for p in walked[0].picks] == [p.id for p in walked[1].picks]
        # an incremental ingest on the imported graph: transactions (the database is not empty), same graph
        for g, state, server in ((graph, "tx", None), (imported, "imp=1,a", own_server)):
            build_graph(g, [second], IMPORT if server else TRANSACTIONS, tmp_path / state, echo=said.append,
                        progress=False, server=server)
        assert sum("neo4j-admin" in line for line in said) == 1
        assert everything(imported) == everything(graph)
        again = build_graph(imported, [second], IMPORT, tmp_path / "imp=1,a", echo=said.append, progress=False,
                            server=own_server)
        assert again.up_to_date


def test_a_failing_importer_is_a_clear_error_naming_its_log_and_the_server_keeps_running(own_server, tmp_path,
                                                                                          monkeypatch):
    first, _, _ = stores(tmp_path)
    monkeypatch.setattr("g2is_graph.db.server.ADMIN_TOOL", "org.neo4j.NoSuchImporter")
    with Graph(own_server.status().uri) as g:
        g.clear()
        with pytest.raises(ServerError, match="import failed .*import.log") as raised:
            build_graph(g, [first], IMPORT, tmp_path / "state", echo=lambda m: None, progress=False,
                        server=own_server)
        assert "NoSuchImporter" in str(raised.value)  # the importer's own words are in the message
        assert "NoSuchImporter" in (own_server.home / "logs" / "import.log").read_text()
        assert own_server.status().state == "running" and g.counts()["samples"] == 0


def test_a_multi_line_node_file_longer_than_the_importers_read_buffer_imports_whole(own_server, tmp_path):
    """300 vectors of 1024 dims are 6 MB of CSV: fields cross the importer's 4 MiB read buffer, where its v2
    multi-line reader fails ("found CR outside a text cell"); a preview with a line break makes it multi-line."""
    n, dim = 300, 1024
    vectors = clustered_vectors(n, dim, clusters=3, spread=0.8, seed=2)
    rows = tricky_rows(n)
    store = synthetic_store(tmp_path / "big" / "c", vectors, rows)
    with Graph(own_server.status().uri) as g:
        g.clear()
        result = build_graph(g, [store.path], dataclasses.replace(IMPORT, k=3), tmp_path / "state",
                             echo=lambda m: None, progress=False, server=own_server)
        assert "IMPORT DONE" in result.import_summary
        got = {r["id"]: r["v"] for r in g._run_auto("MATCH (s:Sample) RETURN s.id AS id, s.gradient_f32 AS v")}
    assert len(got) == n
    unit = combined_features([store], [1.0])  # the node vectors: the store's rows at unit norm
    assert all(got[row["id"]] == unit[i].astype("<f4").tobytes() for i, row in enumerate(rows))


def trailing_zero_bytes(path) -> int:
    data = path.read_bytes()
    return len(data) - len(data.rstrip(b"\0"))


def test_imported_store_files_end_within_one_growth_chunk_of_their_data(own_server, tmp_path, monkeypatch):
    """Neo4j grows a store file by 10% of its translation-table chunks (up to 16 at once) unless told otherwise;
    at a 1M-node import that was 5-11% of the store in preallocated zeros. With chunks shrunk to 64 KiB, the
    vectors of 300 x 1024 fill 21 of them; the default growth ends the file 155 KB past its data (checked),
    one chunk at a time ends it inside the last chunk."""
    chunk = 8 * 8192  # translationTableChunkSizePower=3: eight 8 KiB pages per chunk
    monkeypatch.setattr("g2is_graph.db.server.JVM_FLAGS", [
        *server_module.JVM_FLAGS, "-Dorg.neo4j.io.pagecache.impl.muninn.MuninnPagedFile.translationTableChunkSizePower=3"])
    n, dim = 300, 1024
    store = synthetic_store(tmp_path / "big" / "c", clustered_vectors(n, dim, clusters=3, spread=0.8, seed=4),
                            synthetic_rows(n))
    with Graph(own_server.status().uri) as g:
        g.clear()
        build_graph(g, [store.path], dataclasses.replace(IMPORT, k=3), tmp_path / "state", echo=lambda m: None,
                    progress=False, server=own_server)
    arrays = own_server.home / "data" / "databases" / "neo4j" / "neostore.propertystore.db.arrays"
    assert arrays.stat().st_size > 15 * chunk  # the vectors are there
    assert trailing_zero_bytes(arrays) < chunk

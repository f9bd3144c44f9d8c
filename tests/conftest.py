"""One real Neo4j server per test session, started through the same code path as `g2is neo4j start`.

The server gets its own state directory and a free port, runs without auth (the only server that
may), and the database is emptied before each test that asks for `graph`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from g2is_graph.config import ServerConfig
from g2is_graph.graph import Graph
from g2is_graph.neo4j_local import LocalServer, _free_port


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory) -> LocalServer:
    state = tmp_path_factory.mktemp("neo4j-state")
    server = LocalServer(ServerConfig(state_dir=state, port=_free_port(), auth=False, heap="768m", pagecache="256m"))
    server.start(echo=lambda m: None)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def neo4j_uri(neo4j_server) -> str:
    return neo4j_server.status().uri


@pytest.fixture()
def graph(neo4j_uri) -> Graph:
    with Graph(neo4j_uri) as g:
        g.clear()
        g.init_schema()
        yield g


@pytest.fixture()
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Keep CLI state (server dirs, caches of converted models) out of the user's home."""
    monkeypatch.setenv("G2IS_HOME", str(tmp_path / "g2is-home"))
    monkeypatch.delenv("NEO4J_URI", raising=False)
    monkeypatch.delenv("NEO4J_PASSWORD", raising=False)
    return tmp_path / "g2is-home"

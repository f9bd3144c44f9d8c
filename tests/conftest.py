"""One real Neo4j server per test session, started through the same code path as `g2is neo4j start`.

The server gets its own state directory and a free port, runs without auth (the only server that
may), and the database is emptied before each test that asks for `graph`.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny Llama with a byte-level tokenizer, saved as an HF folder (no downloads)."""
    from g2is_graph.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def write_pool(path: Path, n: int, seed: int = 0, prefix: str = "") -> Path:
    """A small mixed-schema jsonl pool: arithmetic (prompt/completion), word tasks (messages), Alpaca."""
    import json
    import random

    rng = random.Random(seed)
    words = "alpha beta gamma delta sum add count apple tree river number seven three".split()
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            if i % 3 == 0:
                obj = {"id": f"{prefix}m{i}", "dataset": "math", "prompt": f"What is {a}+{b}?", "completion": f"{a + b}"}
            elif i % 3 == 1:
                obj = {"id": f"{prefix}w{i}", "dataset": "words", "messages": [
                    {"role": "user", "content": "Repeat: " + " ".join(rng.choices(words, k=3))},
                    {"role": "assistant", "content": " ".join(rng.choices(words, k=3))}]}
            else:
                obj = {"id": f"{prefix}a{i}", "dataset": "alpaca", "instruction": "Name a word",
                       "input": rng.choice(words), "output": rng.choice(words)}
            fh.write(json.dumps(obj) + "\n")
    return path


@pytest.fixture()
def pool_file(tmp_path) -> Path:
    return write_pool(tmp_path / "pool.jsonl", 30)

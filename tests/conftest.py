"""One real Neo4j server per test session, started through the same code path as `g2is neo4j start`.

The server gets its own state directory and a free port, runs without auth (the only server that
may), and the database is emptied before each test that asks for `graph`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from g2is_graph.config import ServerConfig
from g2is_graph.db.graph import Graph
from g2is_graph.db.server import LocalServer, _free_port

NEO4J_FIXTURES = {"neo4j_server", "neo4j_uri", "graph"}


def pytest_collection_modifyitems(items) -> None:
    """Mark what each test needs: `neo4j` for every test on the session's server (or one it starts itself,
    through LocalServer), `gpu` for the cases parametrised on a CUDA device."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        source = getattr(item.module, "__file__", "") or ""
        if names & NEO4J_FIXTURES or "LocalServer(" in Path(source).read_text():
            item.add_marker(pytest.mark.neo4j)
        if "cuda" in item.name:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def neo4j_server(tmp_path_factory) -> LocalServer:
    state = tmp_path_factory.mktemp("neo4j-state")
    server = LocalServer(ServerConfig(state_dir=state, port=_free_port(), auth=False, heap="768m", pagecache="256m"))
    server.start(echo=lambda m: None)
    watchdog = stop_with_this_process(server.status().pid)
    yield server
    server.stop()
    watchdog.kill()


WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
while alive(parent):
    time.sleep(1)
if alive(server):
    os.kill(server, signal.SIGTERM)
    for _ in range(30):
        time.sleep(1)
        if not alive(server):
            break
    else:
        os.kill(server, signal.SIGKILL)
"""


def stop_with_this_process(server_pid: int) -> subprocess.Popen:
    """The suite's server is launched detached (as `g2is neo4j start` must be); a suite that is killed runs no
    teardown, so a watchdog stops the server when this process is gone instead of leaving a JVM behind."""
    return subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(server_pid)],
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


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
    from g2is_graph.model.loading import build_tiny_model

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


def write_schema_pool(path: Path, n: int) -> Path:
    """Records in every input schema (messages, ShareGPT, Alpaca with a system, TRL conversational and plain
    prompt/completion), single-turn so every trainer format can hold them; every prompt carries HTML-hostile
    text, which pages showing the records must escape."""
    import json

    hostile = "<script>alert('x')</script> & \"q\""
    with open(path, "w") as fh:
        for i in range(n):
            kind = i % 5
            if kind == 0:
                obj = {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": f"What is {i} + 1? {hostile}"},
                                    {"role": "assistant", "content": str(i + 1)}], "dataset": "math"}
            elif kind == 1:
                obj = {"conversations": [{"from": "system", "value": "You count."},
                                         {"from": "human", "value": f"Count to {i % 7 + 1} (item {i}). {hostile}"},
                                         {"from": "gpt", "value": " ".join(str(k) for k in range(1, i % 7 + 2))}],
                       "dataset": "sharegpt"}
            elif kind == 2:
                obj = {"instruction": f"Name a colour {hostile}", "input": f"number {i}", "output": "blue" if i % 2 else "red",
                       "system": "Answer in one word.", "dataset": "alpaca"}
            elif kind == 3:
                obj = {"prompt": [{"role": "user", "content": f"Say {i} twice. {hostile}"}],
                       "completion": [{"role": "assistant", "content": f"{i} {i}"}], "dataset": "trl"}
            else:
                obj = {"prompt": f"Echo {i} {hostile}", "completion": f"echo {i}", "dataset": "plain"}
            fh.write(json.dumps({"id": f"r{i}", **obj}) + "\n")
    return path


def build_selection_graph(graph: Graph, root: Path, n: int = 40, dim: int = 24, seed: int = 3) -> Path:
    """A graph whose samples are the records of a real jsonl pool (source paths recorded relative to `root`, as
    an ingest run from `root` records them), with synthetic features and two validation tasks."""
    import os

    import numpy as np

    from g2is_graph.config import GraphConfig
    from g2is_graph.data.records import read_jsonl
    from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
    from g2is_graph.store.features import record_row
    from ingest.graph_build import build_graph

    pool = write_schema_pool(root / "pool.jsonl", n)
    here = os.getcwd()
    os.chdir(root)
    try:
        rows = [record_row(r) for r in read_jsonl("pool.jsonl").records]
    finally:
        os.chdir(here)
    vectors = clustered_vectors(n, dim, clusters=6, spread=0.8, seed=seed)
    train = synthetic_store(root / "train" / "c", vectors, rows)
    rng = np.random.default_rng(seed)
    val = vectors[rng.choice(n, 6, replace=False)] + 0.3 * rng.standard_normal((6, dim)).astype(np.float32)
    val_rows = synthetic_rows(3, prefix="va", task="t1") + synthetic_rows(3, prefix="vb", task="t2", start=3)
    for i, row in enumerate(val_rows):  # validation texts for the embedding baseline: pool records 0..5
        row["source_file"], row["line"] = "pool.jsonl", i + 1
    val_store = synthetic_store(root / "val" / "c", val, val_rows, kind="sgd")
    build_graph(graph, [train.path], GraphConfig(k=12, exact=True, device="cpu"), root / "state",
                validation_stores=[val_store.path], progress=False)
    return pool


def lora_model(tiny_model, dtype="float32", targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """The tiny model with a fresh LoRA adapter (r=4) whose B is random, in eval mode."""
    import torch

    from g2is_graph.config import LoraSettings
    from g2is_graph.model.loading import add_lora, load_base_model, lora_parameters

    torch.manual_seed(0)
    model = add_lora(load_base_model(tiny_model, dtype), LoraSettings(r=4, alpha=16, dropout=0.1, target_modules=targets))
    for name, p in lora_parameters(model):
        if "lora_B" in name:  # peft initialises B to zero; give the adapter a non-trivial state
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()

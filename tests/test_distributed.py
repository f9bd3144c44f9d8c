"""torchrun on 2 CPU processes (gloo): the gradient job splits its chunks by rank into one store equal to a
single process's, the warmup is data-parallel with the name-keyed Adam state of a single-process run, and an
exact graph build spreads the neighbour search by rows into the graph one process builds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from g2is_graph.config import GraphConfig
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.distributed import Ranks, rank_device, ranks_from_env
from g2is_graph.errors import ConfigError
from g2is_graph.neighbors.knn import Neighbors
from g2is_graph.neighbors.ranks import share
from g2is_graph.store.features import FeatureStore
from ingest.graph_build import build_graph

BIN = Path(sys.executable).parent
WARMUP_ARGS = ["--fraction", "1.0", "--epochs", "2", "--lr", "1e-3", "--batch-size", "1", "--grad-accumulation", "4",
               "--lora-r", "4", "--lora-alpha", "16"]


def g2is(args: list[str], cwd: Path, ranks: int | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    """`python -m g2is_graph.cli ARGS`, or the same under `torchrun --standalone --nproc-per-node RANKS`; one
    thread per process either way, so both runs do their float arithmetic alike."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", G2IS_HOME=str(cwd / "home"), PYTHONPATH=str(Path(__file__).parents[1]),
               **env_vars)
    launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={ranks}"] if ranks else [sys.executable]
    done = subprocess.run(launcher + ["-m", "g2is_graph.cli", "-q", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """A 13-record pool (the last optimizer step has one micro-batch: rank 1 has none there) warmed up once by
    one process and once by torchrun with 2 ranks."""
    from conftest import write_pool

    root = tmp_path_factory.mktemp("dist")
    pool = write_pool(root / "pool.jsonl", 13)
    single = g2is(["warmup", str(pool), "--model", str(tiny_model), "--out", "warm-1", *WARMUP_ARGS], root)
    launched = g2is(["warmup", str(pool), "--model", str(tiny_model), "--out", "warm-2", *WARMUP_ARGS], root, ranks=2)
    return root, pool, single, launched


def test_launched_warmup_saves_the_name_keyed_adam_state_of_a_single_process_run(job):
    from safetensors.torch import load_file

    root, _, single, launched = job
    assert launched.stdout == single.stdout.replace("warm-1", "warm-2")  # rank 0 alone reports, same checkpoints
    for epoch in (1, 2):
        one, two = root / "warm-1" / f"checkpoint-epoch{epoch}", root / "warm-2" / f"checkpoint-epoch{epoch}"
        state_one, state_two = (json.loads((d / "trainer_state.json").read_text()) for d in (one, two))
        assert state_two["parameter_names"] == state_one["parameter_names"]
        assert all(n.startswith("base_model.model.") and "module." not in n for n in state_two["parameter_names"])
        assert state_two["step"] == state_one["step"] == 4 * epoch and state_two["lrs"] == state_one["lrs"]
        moments_one, moments_two = load_file(one / "adam_state.safetensors"), load_file(two / "adam_state.safetensors")
        assert sorted(moments_two) == sorted(moments_one) == sorted(
            f"{n}::{m}" for n in state_one["parameter_names"] for m in ("exp_avg", "exp_avg_sq"))
        # same micro-batches and dropout masks on either side: only the order of the gradient sums differs
        for key in moments_one:
            assert moments_one[key].abs().max() > 0
            torch.testing.assert_close(moments_two[key], moments_one[key], rtol=1e-4, atol=1e-9)
        adapter_one = load_file(one / "adapter_model.safetensors")
        adapter_two = load_file(two / "adapter_model.safetensors")
        for key in adapter_one:
            torch.testing.assert_close(adapter_two[key], adapter_one[key], rtol=1e-4, atol=1e-7)
    log_one, log_two = ((root / d / "train_log.jsonl").read_text().splitlines() for d in ("warm-1", "warm-2"))
    assert len(log_two) == len(log_one) == 8  # rank 0 alone writes the log
    for a, b in zip(map(json.loads, log_one), map(json.loads, log_two)):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_launched_gradient_job_fills_one_store_equal_to_a_single_process_one(job, tiny_model):
    root, pool, _, _ = job
    checkpoint = root / "warm-1" / "checkpoint-epoch2"
    args = [str(pool), "--model", str(tiny_model), "--checkpoint", str(checkpoint), "--dim", "32",
            "--chunk-rows", "3", "--batch-size", "2"]
    g2is(["gradients", *args, "--out", "feat-1"], root)
    launched = g2is(["gradients", *args, "--out", "feat-2"], root, ranks=2)
    assert launched.stdout.strip() == f"feat-2/{checkpoint.name}"  # rank 0 alone reports
    one, two = FeatureStore(root / "feat-1" / checkpoint.name), FeatureStore(root / "feat-2" / checkpoint.name)
    two.verify()
    unstamped = lambda meta: {k: v for k, v in meta.items() if k != "provenance"}  # noqa: E731 (when it was made)
    assert unstamped(two.meta) == unstamped(one.meta) and (two.path / "rows.jsonl").read_bytes() == (one.path / "rows.jsonl").read_bytes()
    for name in ("normalized", "raw"):
        np.testing.assert_array_equal(two.load(name), one.load(name))
    shards = [json.loads((two.path / "chunks" / f"chunk-{c:05d}.json").read_text())["shard"]
              for c in range(two.plan.n_chunks)]
    assert two.plan.n_chunks == 5 and shards == [[c % 2, 2] for c in range(5)]  # each rank wrote its own chunks
    with pytest.raises(AssertionError, match="the ranks are the shards"):
        g2is(["gradients", *args, "--out", "feat-3", "--shard", "0/2"], root, ranks=2)


def test_ranks_come_from_the_launcher_environment():
    assert ranks_from_env({}) == Ranks()
    assert ranks_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    assert not ranks_from_env({"RANK": "0", "WORLD_SIZE": "1"}).distributed
    with pytest.raises(ConfigError, match="RANK=2 WORLD_SIZE=2"):
        ranks_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="integers"):
        ranks_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    assert rank_device(Ranks(1, 2, 1), "cpu") == "cpu"
    if torch.cuda.is_available():
        assert rank_device(Ranks(1, 2, 1), "auto") == "cuda:1"


def edges(graph) -> set[tuple]:
    return {tuple(r.values()) for r in graph._run_auto(
        "MATCH (a:Sample)-[e]->(b:Sample) RETURN type(e) AS kind, a.id AS a, b.id AS b, e.weight AS w, e.rank AS r")}


def test_launched_exact_graph_build_splits_rows_over_ranks_into_the_single_process_graph(graph, neo4j_uri, tmp_path):
    """45 rows (rank 0 takes 22, rank 1 23), then 7 more incrementally (the newcomers' lists and the old rows'
    lists among the newcomers: both searches spread); the lists and the database equal one process's build."""
    vectors = clustered_vectors(52, 24, clusters=4, spread=0.8, seed=7)
    first = synthetic_store(tmp_path / "a" / "c", vectors[:45], synthetic_rows(45)).path
    second = synthetic_store(tmp_path / "b" / "c", vectors[45:], synthetic_rows(7, start=45)).path
    for store in (first, second):
        launched = g2is(["graph", "build", str(store), "--exact", "--k", "5", "--state", "launched"], tmp_path,
                        ranks=2, NEO4J_URI=neo4j_uri)
        assert "graph " in launched.stdout and launched.stdout.count("samples") == 1  # rank 0 alone reports
    launched_edges = edges(graph)
    assert len({e for e in launched_edges if e[0] == "SIMILAR"}) == 52 * 5
    with pytest.raises(AssertionError, match="only exact search is spread"):
        g2is(["graph", "build", str(first), "--hnsw", "--state", "other"], tmp_path, ranks=2, NEO4J_URI=neo4j_uri)
    graph.clear()
    graph.init_schema()
    config = GraphConfig(k=5, exact=True, device="cpu")
    for store in (first, second):
        build_graph(graph, [store], config, tmp_path / "single", echo=lambda m: None, progress=False)
    assert edges(graph) == launched_edges
    one, two = (Neighbors.load(tmp_path / d / "neighbors-2.npz") for d in ("single", "launched"))
    for name in Neighbors.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(two, name), getattr(one, name))


def test_rows_are_shared_contiguously_and_evenly():
    for n, world in ((45, 2), (7, 3), (2, 4), (0, 2)):
        parts = [share(n, Ranks(r, world), r) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
        assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1

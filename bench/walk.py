"""The gradient walk: Neo4j traversal vs the in-memory reference, steps/s and round trips per step.

    python bench/walk.py --n 10000 100000 --ratio 0.01 0.05 --dim 8192

For each N a graph of clustered unit vectors is built in a scratch database of a project-managed Neo4j
(exact edges, k=16, by blocked matrix products: the fastest on this CPU, see bench/graph.py; the reference
walks the same SIMILAR lists read back from Neo4j). Validation
vectors come from a few clusters. For each ratio the G2IS walk (defaults: graph neighbours, conflict
scope all, paper fallback) runs twice against Neo4j (the first run after the build meets a cold server:
query plans, JIT, caches; the second is what a running database gives) and then in memory on the same
vectors and edge lists; all must pick the same samples. Prints wall time, steps/s, queries per step and
the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.config import GraphConfig, SelectionConfig, ServerConfig  # noqa: E402
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store  # noqa: E402
from g2is_graph.db.graph import Graph  # noqa: E402
from g2is_graph.db.server import LocalServer, _free_port  # noqa: E402
from g2is_graph.selection.runs import components_of, load_vectors, select, space_info  # noqa: E402
from g2is_graph.selection.walk import reference_walk  # noqa: E402
from ingest.graph_build import build_graph  # noqa: E402

FAST_EDGES = GraphConfig(k=16, exact=True)


def case(graph: Graph, tmp: Path, n: int, dim: int, ratios: list[float], literal: bool = True) -> None:
    vectors = clustered_vectors(n, dim, clusters=50, spread=0.8, seed=2)
    store = synthetic_store(tmp / f"train{n}" / "c", vectors, synthetic_rows(n), chunk_rows=4096)
    rng = np.random.default_rng(3)
    validation = vectors[rng.choice(n, 40, replace=False)] + 0.2 * rng.standard_normal((40, dim)).astype(np.float32)
    val_store = synthetic_store(tmp / f"val{n}" / "c", validation, synthetic_rows(40, prefix="v", task="t"), kind="sgd")
    graph.clear()
    started = time.perf_counter()
    build_graph(graph, [store.path], FAST_EDGES, tmp / f"state{n}", validation_stores=[val_store.path], progress=True)
    print(f"N={n} d={dim}: graph built in {time.perf_counter() - started:.0f} s", flush=True)
    space = space_info(graph)
    node_vectors, nodes = load_vectors(graph, space)
    ids = [node["id"] for node in nodes]
    neighbors = {r["source"]: np.asarray(r["targets"]) for r in graph.read("similar_rows", space=space.id)}
    for ratio in ratios:
        config = SelectionConfig(ratio=ratio)
        first = select(graph, config, None, progress=True, echo=lambda m: None).walk
        run = select(graph, config, None, progress=True, echo=lambda m: None)  # the server's caches now warm
        walk = run.walk
        assert first.ids == walk.ids
        components = components_of(graph, space, config, len(run.picks) + run.walk.shortfall)
        reference = reference_walk(node_vectors, ids, components, dataclasses.replace(config), neighbors)
        same = reference.ids == walk.ids
        steps = max(walk.steps, 1)
        print(f"  ratio {ratio:.0%}: {len(walk.picks)} picks, {walk.steps} steps, {len(components)} components | "
              f"Neo4j walk {walk.seconds:7.1f} s ({walk.steps / walk.seconds:6.1f} steps/s, "
              f"{walk.round_trips / steps:.2f} queries/step) | reference {reference.seconds:6.1f} s "
              f"({reference.steps / max(reference.seconds, 1e-9):7.1f} steps/s) | Neo4j/reference "
              f"{walk.seconds / max(reference.seconds, 1e-9):5.2f}x (first run {first.seconds:.1f} s, "
              f"{first.seconds / max(reference.seconds, 1e-9):.2f}x) | same selection: {same} | anchor ranking from "
              f"{walk.scan}", flush=True)
        if literal and n <= 20_000:  # the literal Algorithm 1 (every unselected node a candidate) is O(N) per step
            literal = reference_walk(node_vectors, ids, components, dataclasses.replace(config, candidates="all"))
            common = len(set(literal.ids) & set(walk.ids)) / len(walk.ids)
            print(f"    overlap with the literal Algorithm 1 (candidates = all, {literal.seconds:.1f} s): {common:.1%}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--dim", type=int, nargs="+", default=[8192], help="one per --n, or one for all")
    parser.add_argument("--no-literal", action="store_true", help="skip the literal Algorithm 1 (slow: O(N) per step)")
    args = parser.parse_args()
    dims = args.dim * len(args.n) if len(args.dim) == 1 else args.dim
    tmp = Path(tempfile.mkdtemp())
    server = LocalServer(ServerConfig(state_dir=tmp / "neo4j", port=_free_port(), auth=False, heap="4g",
                                      pagecache="4g"))
    server.start(echo=lambda m: None)
    try:
        with Graph(server.status().uri) as graph:
            graph.init_schema()
            for n, dim in zip(args.n, dims):
                case(graph, tmp, n, dim, args.ratio, literal=not args.no_literal)
    finally:
        server.stop()


if __name__ == "__main__":
    main()

"""Graph construction: hnswlib vs exact blocked search, recall of both edge kinds, Neo4j write rates.

    python bench/graph.py --n 10000 50000 100000 --dim 8192 --neo4j-n 10000

For each N, on clustered unit vectors (50 clusters, half of them mirrored so strong negatives exist):
exact blocked top-k (both lists) vs hnswlib build + both queries at the defaults, the ratio, and the
recall of SIMILAR and CONFLICT against exact search on 512 nodes. Then a real build into a scratch
database of the project's Neo4j (started if needed) for `--neo4j-n` nodes: nodes/s, relationships/s,
and bytes per node from the store files (after a checkpoint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.config import GraphConfig, ServerConfig  # noqa: E402
from g2is_graph.data.synthetic import clustered_rows, clustered_vectors, synthetic_rows, synthetic_store  # noqa: E402
from g2is_graph.db.graph import Graph  # noqa: E402
from g2is_graph.db.server import LocalServer, _free_port  # noqa: E402
from g2is_graph.neighbors.knn import HnswIndex, conflict_recall, exact_topk, ivf_neighbors, recall  # noqa: E402
from ingest.graph_build import build_graph  # noqa: E402


def knn_case(n: int, dim: int, k: int, sample: int, exact_sample: int, threads: int = 0,
             device: str = "cpu", exact_only: bool = False, index: str = "hnsw", probe: int = 8) -> None:
    vectors = clustered_rows(n, dim, clusters=50, seed=0)  # made in float32 chunks: 100k x 8192 is 3.3 GB
    config = GraphConfig(k=k, threads=threads, index=index, ivf_probe=probe)
    if exact_only:
        started = time.perf_counter()
        exact_topk(vectors, vectors, k, exclude=np.arange(n), device=device)
        print(f"N={n:>7} d={dim} exact on {device}, all rows: {time.perf_counter() - started:.1f} s", flush=True)
        return
    started = time.perf_counter()
    if index == "ivf":
        lists = ivf_neighbors(vectors, vectors, np.arange(n), k, config)
        built = 0.0
    else:
        hnsw = HnswIndex.build(vectors, config)
        built = time.perf_counter() - started
        lists = hnsw.query(vectors, vectors, np.arange(n), k)
    hnsw_s = time.perf_counter() - started
    # exact search over all N rows is timed on `exact_sample` query rows and scaled (it is linear in rows)
    rows = np.random.default_rng(0).choice(n, size=min(exact_sample, n), replace=False)
    started = time.perf_counter()
    exact = exact_topk(vectors[rows], vectors, k, exclude=rows, device=device)
    exact_s = (time.perf_counter() - started) * n / len(rows)
    check = rows[:sample]
    sim = recall(lists.similar_index[check], exact.similar_index[: len(check)])
    con = conflict_recall(lists.conflict_index[check], lists.conflict_weight[check],
                          exact.conflict_index[: len(check)], exact.conflict_weight[: len(check)])
    what = f"ivf (probe {probe})" if index == "ivf" else "hnswlib"
    print(f"N={n:>7} d={dim} threads={threads or 'all'} exact on {device}: {what} {hnsw_s:7.1f} s (build {built:.1f} s) | exact {exact_s:7.1f} s "
          f"({'measured' if len(rows) == n else f'scaled from {len(rows)} rows'}) | exact/{what} "
          f"{exact_s / hnsw_s:5.2f}x | recall SIMILAR {sim:.3f} CONFLICT {con:.3f}", flush=True)


def neo4j_case(n: int, dim: int, k: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    server = LocalServer(ServerConfig(state_dir=tmp / "neo4j", port=_free_port(), auth=False, heap="2g",
                                      pagecache="2g"))
    db_dir = tmp / "neo4j" / "data" / "databases" / "neo4j"
    server.start(echo=lambda m: None)
    try:
        vectors = clustered_vectors(n, dim, clusters=50, seed=1)
        store = synthetic_store(tmp / "features" / "c", vectors, synthetic_rows(n), chunk_rows=4096)
        with Graph(server.status().uri) as graph:
            graph.init_schema()
        server.stop()  # a clean stop checkpoints the store files (Community has no db.checkpoint procedure)
        before = _store_bytes(db_dir)
        server.start(echo=lambda m: None)
        with Graph(server.status().uri) as graph:
            result = build_graph(graph, [store.path], GraphConfig(k=k), tmp / "state", progress=True)
            print(f"Neo4j build N={n} d={dim} k={k}: {result.summary()}")
            started = time.perf_counter()
            again = build_graph(graph, [store.path], GraphConfig(k=k), tmp / "state", progress=False)
            print(f"  re-run: {again.summary()} in {time.perf_counter() - started:.2f} s")
        server.stop()
        grown = _store_bytes(db_dir) - before
        print(f"  nodes {result.write_rates['nodes']:,.0f}/s, relationships {result.write_rates['relationships']:,.0f}/s; "
              f"store grew {grown / 2**20:,.0f} MiB = {grown / n:,.0f} bytes per node (vector property "
              f"{4 * dim:,} + float32 bytes copy {4 * dim:,}, {2 * k} edges, provenance)")
    finally:
        server.stop()


def _store_bytes(db_dir: Path) -> int:
    return sum(p.stat().st_size for p in db_dir.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="*", default=[10_000, 50_000, 100_000], help="none: skip")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--sample", type=int, default=512)
    parser.add_argument("--exact-sample", type=int, default=2048, help="query rows timed for exact search")
    parser.add_argument("--neo4j-n", type=int, default=10_000, help="0 to skip the Neo4j write benchmark")
    parser.add_argument("--threads", type=int, default=0, help="hnswlib and torch threads (0: all cores)")
    parser.add_argument("--device", default="cpu", help="exact search device (cpu, cuda)")
    parser.add_argument("--exact-only", action="store_true", help="time exact search over all rows, no hnswlib")
    parser.add_argument("--index", choices=["hnsw", "ivf"], default="hnsw", help="the approximate search timed")
    parser.add_argument("--probe", type=int, default=8, help="ivf cells probed per query")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for n in args.n:
        knn_case(n, args.dim, args.k, args.sample, args.exact_sample, args.threads, args.device, args.exact_only,
                 args.index, args.probe)
    if args.neo4j_n:
        neo4j_case(args.neo4j_n, args.dim, args.k)


if __name__ == "__main__":
    main()

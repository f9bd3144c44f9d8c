"""A million-sample pool end to end: graph build (offline import) and a 1% G2IS walk on the running server.

    python bench/million.py --n 1000000 --dim 1024 --k 16

Clustered unit vectors (50 clusters, half mirrored; `clustered_vectors`' distribution, made in chunks) go into a feature store, 40 validation vectors (pool
rows plus noise) into another; `build_graph` then computes both neighbour lists (`--knn`: the GraphConfig
default hnswlib, `ivf`, or `exact`), writes nodes, SIMILAR and CONFLICT edges and validation dot products
through `neo4j-admin database import` into a fresh project-managed server, and a 1% selection runs twice on
it (the first meets a cold server). Prints the stage times, nodes/s and relationships/s, store bytes per
node against the raw bytes (4 d per vector + 24 per edge: two 8-byte node references and a float64
weight), recall on the build's sample, walk steps/s, the peak RSS of this process (making the stores, then the
build and walks: VmHWM is reset between them) and of the server, and
`uptime` before and after (the machine is shared: read timings beside its load).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.config import GraphConfig, SelectionConfig, ServerConfig  # noqa: E402
from g2is_graph.data.synthetic import clustered_rows, synthetic_rows, synthetic_store  # noqa: E402
from g2is_graph.db.graph import Graph  # noqa: E402
from g2is_graph.db.server import LocalServer, _free_port  # noqa: E402
from g2is_graph.selection.runs import select  # noqa: E402
from ingest.graph_build import build_graph  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def server_rss_kib(server: LocalServer) -> int | None:
    pid = server.status().pid
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, TypeError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart this process's VmHWM (Linux `clear_refs` 5), so the build's peak is not making the pool's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_kib() -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--knn", choices=["hnsw", "ivf", "exact"], default="hnsw")
    parser.add_argument("--heap", default="2g", help="server heap (page cache the same)")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--reuse", action="store_true", help="use the stores (and graph) already in --work")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="g2is-million-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"n": args.n, "dim": args.dim, "k": args.k, "knn": args.knn, "uptime_start": uptime()}
    print(figures["uptime_start"], flush=True)

    started = time.perf_counter()
    train, val = work / "train" / "c", work / "val" / "c"
    if args.reuse and (train / "meta.json").exists() and (val / "meta.json").exists():
        print(f"reusing the stores (and state, server) in {work}", flush=True)
    else:
        vectors = clustered_rows(args.n, args.dim)
        synthetic_store(train, vectors, synthetic_rows(args.n), chunk_rows=16384)
        rng = np.random.default_rng(3)
        validation = vectors[rng.choice(args.n, 40, replace=False)] + 0.2 * rng.standard_normal(
            (40, args.dim)).astype(np.float32)
        synthetic_store(val, validation, synthetic_rows(40, prefix="v", task="t"), kind="sgd")
        del vectors
        gc.collect()
    figures["data_s"] = time.perf_counter() - started
    print(f"stores ready in {figures['data_s']:.0f} s", flush=True)
    figures["data_peak_rss_gib"] = (peak_rss_kib() or 0) / 2**20
    figures["peak_rss_reset"] = reset_peak_rss()

    config = GraphConfig(k=args.k, exact=args.knn == "exact", index=args.knn if args.knn != "exact" else "hnsw")
    server = LocalServer(ServerConfig(state_dir=work / "neo4j", port=_free_port(), auth=False, heap=args.heap,
                                      pagecache=args.heap))
    server.start(echo=print)
    try:
        with Graph(server.status().uri) as graph:
            graph.init_schema()
            started = time.perf_counter()
            result = build_graph(graph, [train], config, work / "state", [val], echo=print,
                                 progress=True, server=server)
            figures["build_s"] = time.perf_counter() - started
            figures["build_stages_s"] = result.seconds
            figures["write_rates"] = result.write_rates
            figures["recall"] = result.recall
            figures["import_summary"] = result.import_summary
            print(result.summary(), flush=True)
            print(json.dumps(result.seconds, indent=1), flush=True)
            counts = graph.counts()
            figures["counts"] = counts
        server.stop()  # a clean stop checkpoints the store files (Community has no db.checkpoint procedure)
        store_bytes = tree_bytes(work / "neo4j" / "data" / "databases" / "neo4j")
        server.start(echo=print)
        with Graph(server.status().uri) as graph:
            raw = args.n * args.dim * 4 + (counts["similar"] + counts["conflict"]) * 24
            figures.update(store_bytes=store_bytes, raw_bytes=raw, store_per_node=store_bytes / args.n,
                           store_over_raw=store_bytes / raw)
            print(f"store {store_bytes / 2**30:.2f} GiB = {store_bytes / args.n:,.0f} bytes/node; raw vectors + "
                  f"edges {raw / 2**30:.2f} GiB; ratio {store_bytes / raw:.2f}", flush=True)
            walks = []
            for attempt in ("cold", "warm"):
                run = select(graph, SelectionConfig(ratio=args.ratio), None, progress=True, echo=lambda m: None)
                walk = run.walk
                walks.append({"run": attempt, "picks": len(walk.picks), "steps": walk.steps, "s": walk.seconds,
                              "steps_per_s": walk.steps / max(walk.seconds, 1e-9),
                              "queries_per_step": walk.round_trips / max(walk.steps, 1)})
                print(f"walk ({attempt}): {len(walk.picks)} picks, {walk.steps} steps in {walk.seconds:.1f} s "
                      f"({walk.steps / max(walk.seconds, 1e-9):.1f} steps/s, "
                      f"{walk.round_trips / max(walk.steps, 1):.2f} queries/step)", flush=True)
            figures["walks"] = walks
    finally:
        figures["server_peak_rss_gib"] = (server_rss_kib(server) or 0) / 2**20
        server.stop()
    figures["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures["build_walk_peak_rss_gib"] = (peak_rss_kib() or 0) / 2**20
    figures["uptime_end"] = uptime()
    print(f"peak RSS: making the stores {figures['data_peak_rss_gib']:.2f} GiB; build and walks (VmHWM since, reset "
          f"{'done' if figures['peak_rss_reset'] else 'FAILED'}) {figures['build_walk_peak_rss_gib']:.2f} GiB; "
          f"ru_maxrss {figures['peak_rss_gib']:.2f} GiB; server {figures['server_peak_rss_gib']:.2f} GiB (the "
          f"importer's own peak is in its summary)", flush=True)
    print(figures["uptime_end"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()

"""Recall of hnswlib and the inverted file against exact search on a real feature store (issue 19).

    python bench/knn_recall.py work/features/train/checkpoint-epoch4 [--probe 8,4] [--k 16]

Every row of the store is a query (its own row excluded); exact lists are the fixed-order float64 ones the
graph stores. Run as stored and centred by the pool mean (gradient features share one cone, which is where
approximate CONFLICT search is hardest). Prints the pairwise-cosine summary and, per index, SIMILAR and
CONFLICT recall (conflict over rows that have a negative exact neighbour) and the seconds against exact.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.config import GraphConfig  # noqa: E402
from g2is_graph.neighbors.knn import HnswIndex, conflict_recall, exact_topk, ivf_neighbors, recall  # noqa: E402
from g2is_graph.store.features import FeatureStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", type=Path)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--probe", default="8,4", help="comma list of ivf_probe values")
    args = parser.parse_args()
    features = FeatureStore(args.store).load("normalized").astype(np.float32)
    n = len(features)
    cosines = (features @ features.T)[np.triu_indices(n, 1)]
    print(f"{args.store}: {n} rows x {features.shape[1]} dims; pairwise cosines min {cosines.min():.3f} "
          f"mean {cosines.mean():.3f} max {cosines.max():.3f}, negative pairs {int((cosines < 0).sum())}")
    centred = features - features.mean(axis=0)
    centred = (centred / np.linalg.norm(centred, axis=1, keepdims=True)).astype(np.float32)
    rows = np.arange(n)
    for label, data in (("as stored", features), ("pool-centred", centred)):
        start = time.perf_counter()
        exact = exact_topk(data, data, args.k, exclude=rows, device="cpu", keys=rows)
        exact_s = time.perf_counter() - start
        runs = [("hnsw", GraphConfig(k=args.k))]
        runs += [(f"ivf probe {p}", GraphConfig(k=args.k, index="ivf", ivf_probe=int(p))) for p in args.probe.split(",")]
        for name, config in runs:
            start = time.perf_counter()
            if config.index == "hnsw":
                lists = HnswIndex.build(data, config).query(data, data, rows, args.k, rows)
            else:
                lists = ivf_neighbors(data, data, rows, args.k, config, rows)
            seconds = time.perf_counter() - start
            conflict = conflict_recall(lists.conflict_index, lists.conflict_weight, exact.conflict_index,
                                       exact.conflict_weight)
            print(f"{label:12s} {name:11s} SIMILAR {recall(lists.similar_index, exact.similar_index):.4f}  "
                  f"CONFLICT {'-' if conflict is None else f'{conflict:.4f}'}  {seconds:.1f} s (exact {exact_s:.1f} s)",
                  flush=True)


if __name__ == "__main__":
    main()

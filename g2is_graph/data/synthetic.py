"""Synthetic feature stores for tests and benchmarks: clustered unit vectors with real store metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from g2is_graph.store.features import FeatureStore, write_array_store


def clustered_vectors(n: int, dim: int, clusters: int = 50, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """Rows drawn around `clusters` random centres (half of them mirrored, so strong negatives exist)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres[clusters // 2:] = -centres[: clusters - clusters // 2]
    labels = rng.integers(0, clusters, size=n)
    vectors = centres[labels] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_rows(n: int, dim: int, clusters: int = 50, spread: float = 0.5, seed: int = 0,
                   chunk: int = 65536) -> np.ndarray:
    """`clustered_vectors`' distribution (half the centres mirrored), generated a chunk at a time in float32
    so that making the pool does not cost several times its size in memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres[clusters // 2:] = -centres[: clusters - clusters // 2]
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = centres[rng.integers(0, clusters, size=stop - start)]
        part += spread * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def synthetic_rows(n: int, prefix: str = "s", dataset: str = "synthetic", start: int = 0,
                   task: str | None = None) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "source_file": f"{dataset}.jsonl", "line": i + 1, "dataset": dataset,
             "content_hash": f"{prefix}-{i}-hash", "task": task, "subtask": None, "preview": f"{dataset} example {i}",
             "n_tokens": 32, "n_loss_tokens": 8} for i in range(start, start + n)]


def synthetic_store(path: str | Path, features: np.ndarray, rows: list[dict[str, Any]], kind: str = "adam",
                    projector_seed: int = 0, checkpoint: str = "checkpoint-epoch1", mean_lr: float = 1e-5,
                    chunk_rows: int = 256) -> FeatureStore:
    meta = {"model": {"path": "synthetic", "sha256": "0" * 16}, "checkpoint": {"name": checkpoint, "mean_lr": mean_lr,
            "adapter_sha256": f"synthetic-{checkpoint}"},
            "projector": {"kind": "rademacher", "seed": projector_seed}, "gradient": {"kind": kind},
            "parameters": {"dim": 0}, "chunk_rows": chunk_rows, "store_dtype": "float32", "model_dtype": "float32",
            "data": None}
    return write_array_store(path, features, rows, meta, raw=True)

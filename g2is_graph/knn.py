"""Top-k most similar (SIMILAR) and most negative (CONFLICT) neighbours: exact and hnswlib.

hnswlib answers nearest-neighbour queries; the most negative cosines of x are the nearest neighbours
of -x, but the HNSW graph is built for near neighbours and a plain negated query at ef=64 found only
~59% of the true most-negative neighbours on clustered data (prototype, docs/decisions.md). The negative query
therefore runs with a larger ef (`ef_negative`, default 512) and returns `negative_candidates` (default
128) candidates that are re-ranked by their exact cosine; recall is measured against exact search on
a seeded sample of nodes with every build.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .model import pick_device


@dataclass(frozen=True)
class Neighbors:
    """Row-aligned neighbour lists: indices into the feature matrix and raw cosines, best first."""

    similar_index: np.ndarray  # [N, k] int64
    similar_weight: np.ndarray  # [N, k] float32, descending
    conflict_index: np.ndarray  # [N, k] int64
    conflict_weight: np.ndarray  # [N, k] float32, ascending (most negative first)

    def save(self, path: Path) -> None:
        np.savez(path, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> "Neighbors":
        with np.load(path) as data:
            return cls(**{f: data[f] for f in cls.__dataclass_fields__})


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
               block: int = 2048, device: str = "auto") -> Neighbors:
    """Both neighbour lists by blocked matrix products (unit-norm rows); `exclude[i]` is query i's own row."""
    dev = torch.device(pick_device(device))
    base_t = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32)).to(dev)
    k = min(k, base.shape[0] - (1 if exclude is not None else 0))
    out = [np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float32),
           np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float32)]
    for start in range(0, len(queries), block):
        q = torch.from_numpy(np.ascontiguousarray(queries[start:start + block], dtype=np.float32)).to(dev)
        sims = q @ base_t.T
        if exclude is not None:
            rows = torch.arange(len(q), device=dev)
            own = torch.from_numpy(exclude[start:start + block]).to(dev)
            sims_pos = sims.clone()
            sims_pos[rows, own] = -torch.inf
            sims[rows, own] = torch.inf
        else:
            sims_pos = sims
        top = torch.topk(sims_pos, k, dim=1, largest=True, sorted=True)
        bottom = torch.topk(sims, k, dim=1, largest=False, sorted=True)
        stop = start + len(q)
        out[0][start:stop], out[1][start:stop] = top.indices.cpu().numpy(), top.values.cpu().numpy()
        out[2][start:stop], out[3][start:stop] = bottom.indices.cpu().numpy(), bottom.values.cpu().numpy()
    return Neighbors(*out)


@dataclass(frozen=True)
class HnswSettings:
    M: int = 16
    ef_construction: int = 200
    ef: int = 128
    ef_negative: int = 512
    negative_candidates: int = 128
    similar_candidates: int = 64
    index_dim: int = 0  # >0: the index holds a seeded Gaussian JL sketch of this size; 0: the full vectors
    threads: int = 0  # 0: all cores
    seed: int = 0


class HnswIndex:
    """A cosine hnswlib index over unit-norm rows, labelled by row number, extendable and saved to disk.

    Optionally (`index_dim` > 0) the index holds a seeded JL sketch (Gaussian projections) so the graph
    search is cheaper; every candidate list is re-ranked by its exact cosine in the full space either way.
    On clustered 8192-dim data a 256-dim sketch lost too much recall (SIMILAR 0.43, bench/graph.py), so
    the default indexes the full vectors. Recall against exact search is measured with every build."""

    def __init__(self, dim: int, settings: HnswSettings):
        import hnswlib

        self.dim = dim
        self.settings = settings
        self.sketch = None
        if settings.index_dim and settings.index_dim < dim:
            rng = np.random.default_rng([settings.seed, dim, settings.index_dim])
            self.sketch = rng.standard_normal((dim, settings.index_dim), dtype=np.float32)
        self.index = hnswlib.Index(space="cosine", dim=settings.index_dim if self.sketch is not None else dim)
        self._threads = settings.threads or -1

    def _reduce(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return vectors if self.sketch is None else vectors @ self.sketch

    @classmethod
    def build(cls, features: np.ndarray, settings: HnswSettings, capacity: int | None = None) -> "HnswIndex":
        index = cls(features.shape[1], settings)
        index.index.init_index(max_elements=max(capacity or 0, len(features), 1), ef_construction=settings.ef_construction,
                               M=settings.M, random_seed=settings.seed)
        index.add(features, 0)
        return index

    @classmethod
    def load(cls, path: Path, dim: int, settings: HnswSettings, capacity: int) -> "HnswIndex":
        index = cls(dim, settings)
        index.index.load_index(str(path), max_elements=capacity)
        return index

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        self.index.save_index(str(tmp))
        tmp.replace(path)

    @property
    def count(self) -> int:
        return self.index.get_current_count()

    def add(self, features: np.ndarray, first_row: int) -> None:
        if self.index.get_max_elements() < first_row + len(features):
            self.index.resize_index(first_row + len(features))
        self.index.add_items(self._reduce(features), np.arange(first_row, first_row + len(features)),
                             num_threads=self._threads)

    def query(self, queries: np.ndarray, base: np.ndarray, rows: np.ndarray | None, k: int) -> Neighbors:
        """Neighbour lists of `queries` against everything indexed (`base`, row-labelled); `rows[i]` is
        query i's own row, excluded from its lists, or None when the queries are not in the index."""
        if rows is None:
            rows = np.full(len(queries), -1, dtype=np.int64)
            k = min(k, self.count)
        else:
            k = min(k, self.count - 1)
        s = self.settings
        reduced = self._reduce(queries)
        similar_wanted = min(self.count, max(k + 1, s.similar_candidates if self.sketch is not None else k + 1))
        self.index.set_ef(max(s.ef, similar_wanted))
        labels, _ = self.index.knn_query(reduced, k=similar_wanted, num_threads=self._threads)
        candidates = max(k + 1, min(self.count, s.negative_candidates))
        self.index.set_ef(max(s.ef_negative, candidates))
        neg_labels, _ = self.index.knn_query(-reduced, k=candidates, num_threads=self._threads)
        out = [np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float32),
               np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float32)]
        for pos, (found, descending) in enumerate(((labels, True), (neg_labels, False))):
            _rerank(queries, base, rows, found.astype(np.int64), k, descending, out[2 * pos], out[2 * pos + 1])
        return Neighbors(*out)


def _rerank(queries: np.ndarray, base: np.ndarray, rows: np.ndarray, found: np.ndarray, k: int, descending: bool,
            out_index: np.ndarray, out_weight: np.ndarray, block: int = 64) -> None:
    """Exact cosines of each query's candidates (own row excluded), best k first; blocked gathers."""
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    base_t = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        cand = torch.from_numpy(found[start:stop])
        cos = torch.einsum("bcd,bd->bc", base_t[cand], q_all[start:stop])
        own = cand == torch.from_numpy(rows[start:stop]).unsqueeze(1)
        cos[own] = -torch.inf if descending else torch.inf
        top = torch.topk(cos, k, dim=1, largest=descending, sorted=True)
        out_index[start:stop] = torch.gather(cand, 1, top.indices).numpy()
        out_weight[start:stop] = top.values.numpy()


def recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours that the approximate list contains."""
    k = exact.shape[1]
    return float(np.mean([len(set(a[:k]) & set(e)) / k for a, e in zip(approx, exact)]))


def measure_recall(features: np.ndarray, neighbors: Neighbors, sample: int = 512, seed: int = 0,
                   device: str = "auto") -> dict[str, float]:
    """Recall of both edge kinds against exact search on a seeded sample of rows."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(features), size=min(sample, len(features)), replace=False))
    k = neighbors.similar_index.shape[1]
    exact = exact_topk(features[rows], features, k, exclude=rows, device=device)
    return {"similar": recall(neighbors.similar_index[rows], exact.similar_index),
            "conflict": conflict_recall(neighbors.conflict_index[rows], neighbors.conflict_weight[rows],
                                        exact.conflict_index, exact.conflict_weight),
            "sample": int(len(rows))}


def conflict_recall(approx_index: np.ndarray, approx_weight: np.ndarray, exact_index: np.ndarray,
                    exact_weight: np.ndarray) -> float | None:
    """Recall of the CONFLICT edges that are written (cosine < 0): over rows with at least one negative
    exact neighbour, the fraction of those the approximate list holds with a negative weight. None when
    no sampled pair is negative (gradient features that all point one way): then no CONFLICT edge exists
    and the least-similar lists, which hnswlib finds poorly, are never used."""
    fractions = []
    for a_index, a_weight, e_index, e_weight in zip(approx_index, approx_weight, exact_index, exact_weight):
        wanted = set(e_index[e_weight < 0].tolist())
        if wanted:
            fractions.append(len(wanted & set(a_index[a_weight < 0].tolist())) / len(wanted))
    return float(np.mean(fractions)) if fractions else None

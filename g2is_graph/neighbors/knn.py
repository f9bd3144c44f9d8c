"""Top-k most similar (SIMILAR) and most negative (CONFLICT) neighbours: exact and hnswlib.

hnswlib answers nearest-neighbour queries; the most negative cosines of x are the nearest neighbours
of -x, but the HNSW graph is built for near neighbours and a plain negated query at ef=64 found only
~59% of the true most-negative neighbours on clustered data (prototype, docs/decisions.md). The negative query
therefore runs with a larger ef (`ef_negative`, default 512) and returns `negative_candidates` (default
128) candidates that are re-ranked by their exact cosine; recall is measured against exact search on
a seeded sample of nodes with every build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2is_graph.config import GraphConfig
from g2is_graph.model.loading import pick_device
from g2is_graph.numerics import exact_candidate_dots, float32_dot_error


@dataclass(frozen=True)
class Neighbors:
    """Row-aligned neighbour lists: indices into the feature matrix and exact cosines, best first (equal
    cosines in key order)."""

    similar_index: np.ndarray  # [N, k] int64
    similar_weight: np.ndarray  # [N, k] float64 exact cosines (numerics.exact_dots), descending
    conflict_index: np.ndarray  # [N, k] int64
    conflict_weight: np.ndarray  # [N, k] float64, ascending (most negative first)

    def save(self, path: Path) -> None:
        np.savez(path, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> "Neighbors":
        with np.load(path) as data:
            return cls(**{f: data[f] for f in cls.__dataclass_fields__})


MARGIN = 8  # candidates kept beyond k from the float32 search, re-scored exactly


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
               block: int = 2048, device: str = "auto", keys: np.ndarray | None = None) -> Neighbors:
    """Both neighbour lists of unit-norm rows, exact: `exclude[i]` is query i's own row, `keys[j]` orders
    base rows of equal cosine (default: row number).

    A blocked float32 product on `device` finds k + MARGIN candidates per list; their cosines are then
    computed by `numerics.exact_dots`, and any row whose k-th exact value lies within the float32 product's
    rounding bound of the candidates it did not keep re-scores every base row inside that band. Weights
    and order are then the same for any blocking, BLAS, CPU or device: a graph built in parts equals
    one built at once."""
    dev = torch.device(pick_device(device))
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keys = np.arange(len(base)) if keys is None else np.asarray(keys)
    base_t = torch.from_numpy(base).to(dev)
    k = min(k, base.shape[0] - (1 if exclude is not None else 0))
    wanted = min(k + MARGIN, base.shape[0] - (1 if exclude is not None else 0))
    error = float32_dot_error(base.shape[1], float(np.linalg.norm(base, axis=1).max(initial=0.0)) * 1.0001)
    out = [np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float64),
           np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float64)]
    for start in range(0, len(queries), block):
        q_np = queries[start:start + block]
        q = torch.from_numpy(q_np).to(dev)
        sims = float32_cosines(q, base_t)
        if exclude is not None:
            rows = torch.arange(len(q), device=dev)
            own = torch.from_numpy(exclude[start:start + block]).to(dev)
            sims_pos = sims.clone()
            sims_pos[rows, own] = -torch.inf
            sims[rows, own] = torch.inf
        else:
            sims_pos = sims
        q_error = error * np.linalg.norm(q_np, axis=1) * 1.0001
        stop = start + len(q)
        for pos, (scores, largest) in enumerate(((sims_pos, True), (sims, False))):
            kept = torch.topk(scores, wanted, dim=1, largest=largest, sorted=True).indices
            index, weight = _exact_top(q_np, base, scores, kept, k, largest, keys, q_error)
            out[2 * pos][start:stop], out[2 * pos + 1][start:stop] = index, weight
    return Neighbors(*out)


def float32_cosines(queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The filter's blocked float32 product; its error bound assumes true float32 (no TF32 or bf16 passes)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return queries @ base.T
    finally:
        torch.set_float32_matmul_precision(saved)


def _exact_top(queries: np.ndarray, base: np.ndarray, scores: torch.Tensor, kept: torch.Tensor, k: int,
               largest: bool, keys: np.ndarray, q_error: np.ndarray, columns: np.ndarray | None = None,
               own: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The exact best k of each query's candidates, equal cosines by key.

    `scores[i, c]` is the float32 cosine of query i with base row `columns[i, c]` (row c when None), and
    `kept` the positions of its best float32 scores. Those are scored exactly; where a candidate left out
    could still reach the exact top k (its float32 score within the rounding bound `q_error[i]` of the
    k-th exact value), the left-out candidates inside that band are scored too. `own[i]` is never kept."""
    sign = -1.0 if largest else 1.0
    outside = -torch.inf if largest else torch.inf
    kept_np = kept.cpu().numpy()
    ids = kept_np if columns is None else np.take_along_axis(columns, kept_np, 1)
    exact = exact_candidate_dots(queries, base, ids)
    if own is not None:
        exact[ids == own[:, None]] = sign * np.inf
    order = np.lexsort((keys[ids], sign * exact), axis=-1)
    ids, exact = np.take_along_axis(ids, order, 1), np.take_along_axis(exact, order, 1)
    index, weight = ids[:, :k].copy(), exact[:, :k].copy()
    if kept.shape[1] >= scores.shape[1]:
        return index, weight
    last_kept = torch.gather(scores, 1, kept[:, -1:]).flatten().cpu().numpy()
    kth = weight[:, -1]
    unsafe = np.flatnonzero(last_kept + q_error >= kth if largest else last_kept - q_error <= kth)
    if not len(unsafe):
        return index, weight
    rows = torch.from_numpy(unsafe).to(scores.device)
    left_out = scores[rows].clone().scatter_(1, kept[rows], outside)
    threshold = torch.from_numpy(kth[unsafe] + sign * q_error[unsafe]).to(left_out)
    band = left_out >= threshold[:, None] if largest else left_out <= threshold[:, None]
    row_of, column = (a.cpu().numpy() for a in torch.nonzero(band, as_tuple=True))
    if not len(row_of):
        return index, weight
    counts = np.bincount(row_of, minlength=len(unsafe))
    slot = np.arange(len(row_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    extra = np.repeat(ids[unsafe, :1], counts.max(), axis=1)
    valid = np.zeros(extra.shape, dtype=bool)
    extra[row_of, slot] = column if columns is None else columns[unsafe[row_of], column]
    valid[row_of, slot] = True
    extra_exact = exact_candidate_dots(queries[unsafe], base, extra)
    extra_exact[~valid] = sign * np.inf
    if own is not None:
        extra_exact[extra == own[unsafe, None]] = sign * np.inf
    all_ids = np.concatenate([ids[unsafe], extra], axis=1)
    all_exact = np.concatenate([exact[unsafe], extra_exact], axis=1)
    order = np.lexsort((keys[all_ids], sign * all_exact), axis=-1)[:, :k]
    index[unsafe], weight[unsafe] = np.take_along_axis(all_ids, order, 1), np.take_along_axis(all_exact, order, 1)
    return index, weight


class HnswIndex:
    """A cosine hnswlib index over unit-norm rows, labelled by row number, extendable and saved to disk.

    Optionally (`index_dim` > 0) the index holds a seeded JL sketch (Gaussian projections) so the graph
    search is cheaper; every candidate list is re-ranked by its exact cosine in the full space either way.
    On clustered 8192-dim data a 256-dim sketch lost too much recall (SIMILAR 0.43, bench/graph.py), so
    the default indexes the full vectors. Recall against exact search is measured with every build."""

    def __init__(self, dim: int, config: GraphConfig):
        import hnswlib

        self.dim = dim
        self.config = config
        self.sketch = None
        if config.index_dim and config.index_dim < dim:
            rng = np.random.default_rng([config.seed, dim, config.index_dim])
            self.sketch = rng.standard_normal((dim, config.index_dim), dtype=np.float32)
        self.index = hnswlib.Index(space="cosine", dim=config.index_dim if self.sketch is not None else dim)
        self._threads = config.threads or -1

    def _reduce(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return vectors if self.sketch is None else vectors @ self.sketch

    @classmethod
    def build(cls, features: np.ndarray, config: GraphConfig, capacity: int | None = None) -> "HnswIndex":
        index = cls(features.shape[1], config)
        index.index.init_index(max_elements=max(capacity or 0, len(features), 1), ef_construction=config.ef_construction,
                               M=config.m, random_seed=config.seed)
        index.add(features, 0)
        return index

    @classmethod
    def load(cls, path: Path, dim: int, config: GraphConfig, capacity: int) -> "HnswIndex":
        index = cls(dim, config)
        index.index.load_index(str(path), max_elements=capacity)
        return index

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # hnswlib writes the file itself: renamed whole
        self.index.save_index(str(tmp))
        os.replace(tmp, path)

    @property
    def count(self) -> int:
        return self.index.get_current_count()

    def add(self, features: np.ndarray, first_row: int) -> None:
        if self.index.get_max_elements() < first_row + len(features):
            self.index.resize_index(first_row + len(features))
        self.index.add_items(self._reduce(features), np.arange(first_row, first_row + len(features)),
                             num_threads=self._threads)

    def query(self, queries: np.ndarray, base: np.ndarray, rows: np.ndarray | None, k: int,
              keys: np.ndarray | None = None) -> Neighbors:
        """Neighbour lists of `queries` against everything indexed (`base`, row-labelled); `rows[i]` is
        query i's own row, excluded from its lists, or None when the queries are not in the index. The
        candidates hnswlib finds are ranked by exact cosine, ties by `keys` (as `exact_topk` ranks)."""
        if rows is None:
            rows = np.full(len(queries), -1, dtype=np.int64)
            k = min(k, self.count)
        else:
            k = min(k, self.count - 1)
        s = self.config
        reduced = self._reduce(queries)
        similar_wanted = min(self.count, max(k + 1, s.similar_candidates if self.sketch is not None else k + 1))
        self.index.set_ef(max(s.ef, similar_wanted))
        labels, _ = self.index.knn_query(reduced, k=similar_wanted, num_threads=self._threads)
        candidates = max(k + 1, min(self.count, s.negative_candidates))
        self.index.set_ef(max(s.ef_negative, candidates))
        neg_labels, _ = self.index.knn_query(-reduced, k=candidates, num_threads=self._threads)
        out = []
        for found, largest in ((labels, True), (neg_labels, False)):
            out += _rerank(queries, base, rows, found.astype(np.int64), k, largest, keys)
        return Neighbors(*out)


def _rerank(queries: np.ndarray, base: np.ndarray, rows: np.ndarray, found: np.ndarray, k: int, largest: bool,
            keys: np.ndarray | None, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The exact best k of each query's candidates (own row excluded), as `exact_topk` ranks them: a float32
    pass keeps k + MARGIN, exact cosines decide, the rounding band is re-scored where it matters."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    keys = np.arange(len(base)) if keys is None else np.asarray(keys)
    q_all, base_t = torch.from_numpy(queries), torch.from_numpy(base)
    error = float32_dot_error(base.shape[1], float(np.linalg.norm(base, axis=1).max(initial=0.0)) * 1.0001)
    out_index = np.empty((len(queries), k), dtype=np.int64)
    out_weight = np.empty((len(queries), k), dtype=np.float64)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        cand = found[start:stop]
        cos = torch.einsum("bcd,bd->bc", base_t[torch.from_numpy(cand)], q_all[start:stop])
        cos[torch.from_numpy(cand == rows[start:stop, None])] = -torch.inf if largest else torch.inf
        kept = torch.topk(cos, min(k + MARGIN, cand.shape[1]), dim=1, largest=largest, sorted=True).indices
        q_error = error * np.linalg.norm(queries[start:stop], axis=1) * 1.0001
        out_index[start:stop], out_weight[start:stop] = _exact_top(
            queries[start:stop], base, cos, kept, k, largest, keys, q_error, cand, rows[start:stop])
    return out_index, out_weight


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

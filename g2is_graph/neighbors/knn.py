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
from g2is_graph.numerics import exact_candidate_dots, float32_dot_error, row_norms


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


SCORE_BLOCK_BYTES = 256 * 2**20  # one block of float32 query-by-base scores: bounds exact search's memory


def exact_topk(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
               block: int = 2048, device: str = "auto", keys: np.ndarray | None = None) -> Neighbors:
    """Both neighbour lists of unit-norm rows, exact: `exclude[i]` is query i's own row, `keys[j]` orders
    base rows of equal cosine (default: row number).

    A blocked float32 product on `device` finds k + MARGIN candidates per list; their cosines are then
    computed by `numerics.exact_dots`, and any row whose k-th exact value lies within the float32 product's
    rounding bound of the candidates it did not keep re-scores every base row inside that band. Weights
    and order are then the same for any blocking, BLAS, CPU or device: a graph built in parts equals
    one built at once. `block` queries at a time, fewer where their score matrix would pass
    SCORE_BLOCK_BYTES (a 512-node recall sample against a million rows would otherwise hold 2 GB)."""
    dev = torch.device(pick_device(device))
    block = max(1, min(block, SCORE_BLOCK_BYTES // (4 * max(len(base), 1))))
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keys = np.arange(len(base)) if keys is None else np.asarray(keys)
    base_t = torch.from_numpy(base).to(dev)
    k = min(k, base.shape[0] - (1 if exclude is not None else 0))
    wanted = min(k + MARGIN, base.shape[0] - (1 if exclude is not None else 0))
    error = float32_dot_error(base.shape[1], float(row_norms(base).max(initial=0.0)) * 1.0001)
    out = [np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float64),
           np.empty((len(queries), k), dtype=np.int64), np.empty((len(queries), k), dtype=np.float64)]
    for start in range(0, len(queries), block):
        q_np = queries[start:start + block]
        q = torch.from_numpy(q_np).to(dev)
        sims = float32_cosines(q, base_t)
        rows = torch.arange(len(q), device=dev)
        own = None if exclude is None else torch.from_numpy(exclude[start:start + block]).to(dev)
        q_error = error * np.linalg.norm(q_np, axis=1) * 1.0001
        stop = start + len(q)
        for pos, largest in enumerate((True, False)):
            if own is not None:  # a query's own row is out of both lists: set past each end in turn, in place
                sims[rows, own] = -torch.inf if largest else torch.inf
            kept = torch.topk(sims, wanted, dim=1, largest=largest, sorted=True).indices
            index, weight = _exact_top(q_np, base, sims, kept, k, largest, keys, q_error)
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
    error = float32_dot_error(base.shape[1], float(row_norms(base).max(initial=0.0)) * 1.0001)
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


def ivf_neighbors(queries: np.ndarray, base: np.ndarray, rows: np.ndarray | None, k: int, config: GraphConfig,
                  keys: np.ndarray | None = None) -> Neighbors:
    """Both lists by an inverted file: spherical k-means cells over `base` (seeded, trained on a sample),
    each query searched exhaustively (blocked float32 products) in the `ivf_probe` cells whose centroids are
    most similar to it (SIMILAR) and in the `ivf_probe` least similar (CONFLICT: the cells nearest -q);
    the best k + MARGIN candidates are then ranked by exact cosine like every other path. Cost per query
    is ~ probe * N / cells * d instead of N d; recall is what the probed cells hold, measured per build."""
    base = np.ascontiguousarray(base, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, nq = len(base), len(queries)
    own = np.full(nq, -1, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    k = min(k, n - (0 if rows is None else 1))
    cells = config.ivf_cells or max(1, int(round(np.sqrt(n))))
    cells = min(cells, max(1, n // (4 * (k + MARGIN))))  # cells of a few lists' worth of rows at least
    probe = min(cells, config.ivf_probe)
    centroids = _spherical_kmeans(base, cells, config.seed)
    base_t, cent_t = torch.from_numpy(base), torch.from_numpy(centroids)
    assign = np.empty(n, dtype=np.int64)
    for start in range(0, n, 8192):
        assign[start:start + 8192] = torch.argmax(base_t[start:start + 8192] @ cent_t.T, dim=1).numpy()
    members = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[members], np.arange(cells + 1))
    wanted = min(k + MARGIN, n - (0 if rows is None else 1))
    search = min(n, wanted + (0 if rows is None else 1))  # one more: a query's own row is dropped after the search
    error = float32_dot_error(base.shape[1], float(row_norms(base).max(initial=0.0)) * 1.0001)
    q_error = error * row_norms(queries) * 1.0001
    queries_t = torch.from_numpy(queries)
    keys = np.arange(n) if keys is None else np.asarray(keys)
    out = []
    for largest in (True, False):
        probes = np.empty((nq, probe), dtype=np.int64)
        for start in range(0, nq, 8192):
            scores = queries_t[start:start + 8192] @ cent_t.T
            probes[start:start + 8192] = torch.topk(scores, probe, dim=1, largest=largest).indices.numpy()
        best_score = torch.full((nq, search), -torch.inf if largest else torch.inf)
        best_index = torch.full((nq, search), -1, dtype=torch.int64)
        flat = probes.reshape(-1)
        by_cell = np.argsort(flat, kind="stable")
        cell_bounds = np.searchsorted(flat[by_cell], np.arange(cells + 1))
        for cell in range(cells):
            asking = torch.from_numpy(by_cell[cell_bounds[cell]:cell_bounds[cell + 1]] // probe)
            inside_t = torch.from_numpy(members[bounds[cell]:bounds[cell + 1]])
            if not len(asking) or not len(inside_t):
                continue
            top = torch.topk(float32_cosines(queries_t[asking], base_t[inside_t]), min(search, len(inside_t)),
                             dim=1, largest=largest)
            merged_score = torch.cat([best_score[asking], top.values], dim=1)
            merged_index = torch.cat([best_index[asking], inside_t[top.indices]], dim=1)
            keep = torch.topk(merged_score, search, dim=1, largest=largest).indices
            best_score[asking] = torch.gather(merged_score, 1, keep)
            best_index[asking] = torch.gather(merged_index, 1, keep)
        found = best_index.numpy()
        if rows is not None:  # drop each query's own row (or, where it was not found, the last candidate)
            is_own = found == own[:, None]
            drop = np.where(is_own.any(axis=1), is_own.argmax(axis=1), search - 1)
            kept_cols = np.ones(found.shape, dtype=bool)
            kept_cols[np.arange(nq), drop] = False
            found = found[kept_cols].reshape(nq, search - 1)
            score = best_score.numpy()[kept_cols].reshape(nq, search - 1)
        else:
            score = best_score.numpy()
        short = np.flatnonzero((found < 0).any(axis=1))
        found[short] = 0  # placeholders: the probed cells held fewer than k + MARGIN rows, see below
        index = np.empty((nq, k), dtype=np.int64)
        weight = np.empty((nq, k), dtype=np.float64)
        every = torch.arange(found.shape[1]).expand(min(nq, 4096), -1)
        for start in range(0, nq, 4096):
            stop = min(nq, start + 4096)
            index[start:stop], weight[start:stop] = _exact_top(
                queries[start:stop], base, torch.from_numpy(score[start:stop]), every[:stop - start], k, largest,
                keys, q_error[start:stop], found[start:stop], own[start:stop])
        if len(short):  # those queries are searched exactly
            exact = exact_topk(queries[short], base, k, exclude=None if rows is None else own[short], device="cpu",
                               keys=keys)
            index[short] = exact.similar_index if largest else exact.conflict_index
            weight[short] = exact.similar_weight if largest else exact.conflict_weight
        out += [index, weight]
    return Neighbors(*out)


def _spherical_kmeans(base: np.ndarray, cells: int, seed: int, iterations: int = 8,
                      sample_per_cell: int = 64) -> np.ndarray:
    """Unit centroids of `cells` cells, trained on a seeded sample of rows (empty cells re-seeded)."""
    rng = np.random.default_rng([seed, cells])
    sample = base[np.sort(rng.choice(len(base), size=min(len(base), cells * sample_per_cell), replace=False))]
    centroids = sample[rng.choice(len(sample), size=cells, replace=False)].copy()
    sample_t = torch.from_numpy(sample)
    for _ in range(iterations):
        labels = torch.cat([torch.argmax(sample_t[i:i + 8192] @ torch.from_numpy(centroids).T, dim=1)
                            for i in range(0, len(sample), 8192)]).numpy()
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, sample)
        empty = np.flatnonzero(np.bincount(labels, minlength=cells) == 0)
        sums[empty] = sample[rng.choice(len(sample), size=len(empty), replace=False)]
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-30)
        centroids = centroids.astype(np.float32)
    return centroids


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

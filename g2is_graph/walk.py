"""The gradient walk (G2IS Algorithm 1): a Cypher-driven traversal of the graph, and its dense oracle.

Per component K with budget b: the anchor is the unselected node with the largest cos(z, K); each
step takes, among the candidates ordered by cos(z, s) to the last added node s, the first z with
  no conflict:  cos(z, s') >= 0 for every s' in the conflict scope (all selected, or this component's)
  consistency:  |cos(mean(S' + z), K)| >= delta * |cos(mean(S'), K)|   (S' = this component's set)
and falls back, when none passes, to the unselected argmax cos(z, K) (paper) or stops short (official).
Candidates are the SIMILAR neighbours of s (`neighbors`) or every unselected node (`all`). A node is
never selected twice: candidates, anchors and fallbacks exclude everything already selected.

Both implementations call the same admission test (`admit`) and order candidates by the same float64
cosines, so on a complete graph they select the same samples in the same order. The conflict test is
a float32 matrix-vector product over all selected vectors (exact, not only the stored CONFLICT edges).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import SelectionConfig
from .knowledge import Component


@dataclass
class Pick:
    rank: int
    id: str
    row: int
    component: int
    step: int
    how: str  # anchor | walk | fallback | score
    from_id: str | None = None
    edge_cos: float | None = None  # cos(z, s) to the node it was reached from
    cos_k: float | None = None  # cos(z, K), or the baseline's score
    consistency: float | None = None  # |cos(mean(S'+z), K)| / |cos(mean(S'), K)|
    min_cos_selected: float | None = None  # min cos(z, s') over the conflict scope at acceptance

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Rejection:
    component: int
    step: int
    id: str
    reason: str  # conflict | consistency
    other: str | None  # the selected node it conflicted with
    value: float  # the conflicting cosine, or the consistency ratio


@dataclass
class WalkResult:
    picks: list[Pick] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    round_trips: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.picks]

    @property
    def shortfall(self) -> int:
        return sum(self.budgets) - len(self.picks)


class Selected:
    """The growing selection: ids, a float32 matrix of vectors for the exact conflict test."""

    def __init__(self, capacity: int, dim: int):
        self.vectors = np.empty((max(capacity, 1), dim), dtype=np.float32)
        self.ids: list[str] = []
        self.id_set: set[str] = set()
        self.component_of: list[int] = []

    def add(self, node_id: str, vector: np.ndarray, component: int) -> None:
        if len(self.ids) == len(self.vectors):
            self.vectors = np.concatenate([self.vectors, np.empty_like(self.vectors)])
        self.vectors[len(self.ids)] = vector
        self.ids.append(node_id)
        self.id_set.add(node_id)
        self.component_of.append(component)

    def scope(self, component: int | None) -> tuple[np.ndarray, list[int]]:
        """Vectors (and positions) of all selected nodes, or of one component's."""
        if component is None:
            return self.vectors[: len(self.ids)], list(range(len(self.ids)))
        positions = [i for i, c in enumerate(self.component_of) if c == component]
        return self.vectors[positions], positions


def decode_vectors(records, key: str = "gradient") -> np.ndarray:
    """Rows of `gradient_f32` bytes (little-endian float32) as a [n, d] array."""
    if not records:
        return np.empty((0, 0), dtype=np.float32)
    return np.stack([np.frombuffer(r[key], dtype="<f4") for r in records]).astype(np.float32, copy=False)


def vector_pages(read, space: str, page: int = 2000):
    """(node records without their vector, [n, d] vectors) page by page, in row order; `read` runs a named
    query (Graph.read, or a walk's counting wrapper)."""
    start = 0
    while True:
        records = read("space_vectors", space=space, start=start, stop=start + page)
        if not records:
            return
        vectors = decode_vectors(records)
        for record in records:
            del record["gradient"]
        yield records, vectors
        start += page


def admit(vector: np.ndarray, scope: np.ndarray, component_sum: np.ndarray, k: np.ndarray, delta: float):
    """(passes, reason, worst scope position or None, value, min cos to scope, consistency ratio)."""
    min_cos = None
    if len(scope):
        cos = scope @ vector.astype(np.float32)
        worst = int(np.argmin(cos))
        min_cos = float(cos[worst])
        if min_cos < 0:
            return False, "conflict", worst, min_cos, min_cos, None
    before = _cos(component_sum, k)
    after = _cos(component_sum + vector, k)
    ratio = abs(after) / abs(before) if before != 0 else float("inf")
    if abs(after) < delta * abs(before):
        return False, "consistency", None, ratio, min_cos, ratio
    return True, None, None, ratio, min_cos, ratio


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    norm = np.linalg.norm(a)
    return float(a @ b / norm) if norm > 0 else 0.0


def order_by_cos(vectors: np.ndarray, rows: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Positions of `vectors` by descending float64 cosine to `to`, ties by row."""
    cos = vectors.astype(np.float64) @ to.astype(np.float64)
    return np.lexsort((rows, -cos)), cos


def best_by_k(top_rows: np.ndarray, vectors: np.ndarray, k: np.ndarray) -> tuple[int, float]:
    """Among the top entries of a coarse ranking, the exact float64 argmax cos(z, K) (ties: lowest row)."""
    cos = vectors.astype(np.float64) @ k
    best = np.lexsort((top_rows, -cos))[0]
    return int(best), float(cos[best])


def reference_walk(features: np.ndarray, ids: list[str], components: list[Component], config: SelectionConfig,
                   neighbors: dict[int, np.ndarray] | None = None) -> WalkResult:
    """Dense, in-memory Algorithm 1 over unit rows `features` (the oracle for the graph walk).

    `neighbors[row]` lists row's SIMILAR targets (candidates = neighbors); None means all unselected.
    """
    started = time.perf_counter()
    n, dim = features.shape
    rows = np.arange(n)
    total = sum(c.budget for c in components)
    selected = Selected(total, dim)
    taken = np.zeros(n, dtype=bool)
    result = WalkResult(budgets=[c.budget for c in components])
    carry = 0
    for ci, comp in enumerate(components):
        k = comp.vector.astype(np.float64)
        budget = comp.budget + carry
        k_scores = features @ k.astype(np.float32)
        k_order = np.lexsort((rows, -k_scores))
        component_sum = np.zeros(dim, dtype=np.float64)
        members = 0

        def take(row, how, from_row=None, edge=None, consistency=None, min_cos=None):
            nonlocal component_sum, members
            vec = features[row]
            selected.add(ids[row], vec, ci)
            taken[row] = True
            component_sum = component_sum + vec.astype(np.float64)
            result.picks.append(Pick(len(result.picks) + 1, ids[row], int(row), ci, members, how,
                                     ids[from_row] if from_row is not None else None, edge,
                                     float(vec.astype(np.float64) @ k), consistency, min_cos))
            members += 1

        def argmax_k():
            top = k_order[~taken[k_order]][: config.rerank].tolist()
            if not top:
                return None
            best, _ = best_by_k(np.asarray(top), features[top], k)
            return top[best]

        last = None
        while members < budget:
            if last is None:
                anchor = argmax_k()
                if anchor is None:
                    break
                take(anchor, "anchor")
                last = anchor
                continue
            result.steps += 1
            if neighbors is None:
                pool = np.flatnonzero(~taken)
            else:
                targets = np.asarray(neighbors.get(last, ()), dtype=np.int64)
                pool = targets[~taken[targets]]
            found = None
            if len(pool):
                order, cos = order_by_cos(features[pool], pool, features[last])
                scope, positions = selected.scope(None if config.conflict_scope == "all" else ci)
                for pos in order:
                    z = pool[pos]
                    ok, reason, worst, value, min_cos, ratio = admit(features[z], scope, component_sum, k, config.delta)
                    if ok:
                        found = (z, float(cos[pos]), ratio, min_cos)
                        break
                    other = selected.ids[positions[worst]] if worst is not None else None
                    result.rejections.append(Rejection(ci, members, ids[z], reason, other, value))
            if found is not None:
                z, edge, ratio, min_cos = found
                take(z, "walk", last, edge, ratio, min_cos)
                last = z
            elif config.fallback == "paper":
                z = argmax_k()
                if z is None:
                    break
                take(z, "fallback", last)
                last = z
            else:
                break
        result.filled.append(members)
        carry = budget - members if config.reassign_shortfall else 0
    result.seconds = time.perf_counter() - started
    return result


class GraphWalk:
    """Algorithm 1 as a traversal of the Neo4j graph: one query per step (two on a fallback)."""

    def __init__(self, graph, space: str, config: SelectionConfig):
        self.graph = graph
        self.space = space
        self.config = config
        self.round_trips = 0

    def _read(self, name: str, **params) -> list[dict[str, Any]]:
        self.round_trips += 1
        return self.graph.read(name, **params)

    def _vectors(self, records) -> np.ndarray:
        return decode_vectors(records)

    def run(self, components: list[Component], progress=None) -> WalkResult:
        started = time.perf_counter()
        config = self.config
        total = sum(c.budget for c in components)
        dim = None
        selected: Selected | None = None
        result = WalkResult(budgets=[c.budget for c in components])
        carry = 0
        scan_ids, scan_rows, scan_scores = self._scan(components)
        keep = total + config.rerank + 1  # enough for every anchor and fallback of the run
        for ci, comp in enumerate(components):
            k = comp.vector.astype(np.float64)
            budget = comp.budget + carry
            if budget <= 0:
                result.filled.append(0)
                continue
            order = np.lexsort((scan_rows, -scan_scores[:, ci]))[:keep]
            ranking = [{"id": scan_ids[i], "row": int(scan_rows[i])} for i in order]
            component_sum = None
            members = 0
            last: dict[str, Any] | None = None

            cursor = 0
            cache: dict[str, np.ndarray] = {}  # vectors of ranking entries already fetched

            def unselected(entry) -> bool:
                return selected is None or entry["id"] not in selected.id_set

            def argmax_k():
                """The exact argmax among the first `rerank` unselected ranking entries; vectors are fetched
                once (with the next entries prefetched), so a run of fallbacks costs few queries."""
                nonlocal cursor
                while cursor < len(ranking) and not unselected(ranking[cursor]):
                    cursor += 1
                top, i = [], cursor
                while i < len(ranking) and len(top) < config.rerank:
                    if unselected(ranking[i]):
                        top.append(ranking[i])
                    i += 1
                if not top:
                    return None
                missing = [r["id"] for r in top if r["id"] not in cache]
                if missing:
                    ahead = [r["id"] for r in ranking[i:i + 3 * config.rerank] if r["id"] not in cache and unselected(r)]
                    fetched = self._read("walk_vectors", ids=missing + ahead)
                    cache.update(zip((r["id"] for r in fetched), self._vectors(fetched)))
                vectors = np.stack([cache[r["id"]] for r in top])
                best, _ = best_by_k(np.asarray([r["row"] for r in top]), vectors, k)
                return {"id": top[best]["id"], "row": top[best]["row"], "vector": vectors[best]}

            def take(node, how, edge=None, consistency=None, min_cos=None):
                nonlocal component_sum, members, selected, dim
                if selected is None:
                    dim = len(node["vector"])
                    selected = Selected(total, dim)
                vec = node["vector"]
                component_sum = (component_sum if component_sum is not None else np.zeros(dim)) + vec.astype(np.float64)
                selected.add(node["id"], vec, ci)
                result.picks.append(Pick(len(result.picks) + 1, node["id"], int(node["row"]), ci, members, how,
                                         last["id"] if last is not None and how != "anchor" else None, edge,
                                         float(vec.astype(np.float64) @ k), consistency, min_cos))
                members += 1
                if progress is not None:
                    progress.update(1)

            while members < budget:
                if last is None:
                    anchor = argmax_k()
                    if anchor is None:
                        break
                    take(anchor, "anchor")
                    last = anchor
                    continue
                result.steps += 1
                found = self._step(ci, members, last, selected, component_sum, k, result)
                if found is not None:
                    node, edge, ratio, min_cos = found
                    take(node, "walk", edge, ratio, min_cos)
                    last = node
                elif config.fallback == "paper":
                    node = argmax_k()
                    if node is None:
                        break
                    take(node, "fallback")
                    last = node
                else:
                    break
            result.filled.append(members)
            carry = budget - members if config.reassign_shortfall else 0
        result.round_trips = self.round_trips
        result.seconds = time.perf_counter() - started
        return result

    def _scan(self, components: list[Component], page: int = 2000):
        """cos(z, K) of every node for every component, in one paged pass over the vectors (O(N) once per run;
        Cypher's vector.similarity.cosine took 20 s for 10k nodes x 19 components, numpy on pages far less)."""
        k32 = np.stack([c.vector for c in components]).astype(np.float32).T
        ids: list[str] = []
        rows, scores = [], []
        for records, vectors in vector_pages(self._read, self.space, page):
            ids += [r["id"] for r in records]
            rows.append(np.asarray([r["row"] for r in records]))
            scores.append(vectors @ k32)
        return ids, np.concatenate(rows), np.concatenate(scores).astype(np.float64)

    def _step(self, ci, members, last, selected: Selected, component_sum, k, result: WalkResult):
        config = self.config
        scope, positions = selected.scope(None if config.conflict_scope == "all" else ci)
        scope_ids = selected.id_set if config.conflict_scope == "all" else {selected.ids[p] for p in positions}
        skip = 0
        while True:
            if config.candidates == "neighbors":
                records = self._read("walk_candidates", last=last["id"])
                records = [r for r in records if r["id"] not in selected.id_set]
            else:
                records = self._read("walk_candidates_all", space=self.space, vector=last["vector"].tolist(),
                                     excluded=selected.ids, skip=skip, limit=config.page)
            if not records:
                return None
            vectors = self._vectors(records)
            rows = np.asarray([r["row"] for r in records])
            order, cos = order_by_cos(vectors, rows, last["vector"])
            for pos in order:
                record = records[pos]
                stored = next(((x, w) for x, w in record["conflicts"] if x in scope_ids), None)
                if stored is not None:  # a stored CONFLICT edge to the scope: rejected without a dot product
                    result.rejections.append(Rejection(ci, members, record["id"], "conflict", stored[0], float(stored[1])))
                    continue
                ok, reason, worst, value, min_cos, ratio = admit(vectors[pos], scope, component_sum, k, config.delta)
                if ok:
                    node = {"id": record["id"], "row": record["row"], "vector": vectors[pos]}
                    return node, float(cos[pos]), ratio, min_cos
                other = selected.ids[positions[worst]] if worst is not None else None
                result.rejections.append(Rejection(ci, members, record["id"], reason, other, value))
            if config.candidates == "neighbors":
                return None
            skip += config.page

"""The gradient walk (G2IS Algorithm 1): a Cypher-driven traversal of the graph, and its dense oracle.

Per component K with budget b: the anchor is the unselected node with the largest cos(z, K); each
step takes, among the candidates ordered by cos(z, s) to the last added node s, the first z with
  no conflict:  cos(z, s') >= 0 for every s' in the conflict scope (all selected, or this component's)
  consistency:  |cos(mean(S' + z), K)| >= delta * |cos(mean(S'), K)|   (S' = this component's set)
and falls back, when none passes, to the unselected argmax cos(z, K) (paper) or stops short (official).
Candidates are the SIMILAR neighbours of s (`neighbors`) or every unselected node (`all`). A node is
never selected twice: candidates, anchors and fallbacks exclude everything already selected.

Both implementations call the same admission test (`admit`) and order candidates by the same exact
cosines (`numerics.exact_dots`: the same on every CPU, BLAS and batching), so on a complete graph they
select the same samples in the same order. The conflict test covers all selected vectors (not only the
stored CONFLICT edges): a float32 product filters, exact cosines decide.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import SelectionConfig
from .knowledge import Component
from .numerics import (exact_descending, exact_dot_error, exact_dots, exact_matvec, exact_norm, float64_dot_error,
                       top_exact, unit_filter_error)


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
    scan: str = "in memory"  # how cos(z, K) of every node was obtained
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
        self.position: dict[str, int] = {}
        self.conflicted: dict[str, list[str]] = {}  # node -> selected nodes with a CONFLICT edge to it

    def add(self, node_id: str, vector: np.ndarray, component: int, conflicts=()) -> None:
        if len(self.ids) == len(self.vectors):
            self.vectors = np.concatenate([self.vectors, np.empty_like(self.vectors)])
        self.vectors[len(self.ids)] = vector
        self.position[node_id] = len(self.ids)
        self.ids.append(node_id)
        self.id_set.add(node_id)
        self.component_of.append(component)
        for partner in conflicts:
            self.conflicted.setdefault(partner, []).append(node_id)

    def stored_conflict(self, candidate_id: str, candidate_conflicts, scope_ids) -> str | None:
        """A selected node in the scope joined to the candidate by a stored CONFLICT edge (either way round)."""
        for partner in candidate_conflicts:
            if partner in scope_ids:
                return partner
        return next((s for s in self.conflicted.get(candidate_id, ()) if s in scope_ids), None)

    def cos(self, node_id: str, vector: np.ndarray) -> float:
        return float(exact_dots(self.vectors[self.position[node_id]], vector))

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
    """(passes, reason, worst scope position or None, value, min cos to scope, consistency ratio).
    The minimum cosine to the scope is exact: a float32 product finds the few scope members that could
    hold it, exact cosines decide among them (ties: the earliest selected)."""
    min_cos = None
    if len(scope):
        approx = scope @ vector.astype(np.float32)
        (worst,), (neg_min,) = top_exact(-approx, unit_filter_error(len(vector)), 1,
                                         lambda rows: -exact_matvec(scope[rows], vector))
        worst, min_cos = int(worst), float(-neg_min)
        if min_cos < 0:
            return False, "conflict", worst, min_cos, min_cos, None
    before = _cos(component_sum, k)
    after = _cos(component_sum + vector, k)
    ratio = abs(after) / abs(before) if before != 0 else float("inf")
    if abs(after) < delta * abs(before):
        return False, "consistency", None, ratio, min_cos, ratio
    return True, None, None, ratio, min_cos, ratio


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    norm = exact_norm(a)
    return float(exact_dots(a, b) / norm) if norm > 0 else 0.0


def order_by_cos(vectors: np.ndarray, rows: np.ndarray, to: np.ndarray) -> np.ndarray:
    """Positions of `vectors` by descending exact cosine to `to`, ties by row."""
    cos = exact_matvec(vectors, to)
    return np.lexsort((rows, -cos)), cos


def best_by_k(top_rows: np.ndarray, vectors: np.ndarray, k: np.ndarray) -> tuple[int, float]:
    """Among the top entries of a coarse ranking, the exact argmax cos(z, K) (ties: lowest row)."""
    cos = exact_matvec(vectors, k)
    best = np.lexsort((top_rows, -cos))[0]
    return int(best), float(cos[best])


def reference_walk(features: np.ndarray, ids: list[str], components: list[Component], config: SelectionConfig,
                   neighbors: dict[int, np.ndarray] | None = None) -> WalkResult:
    """Dense, in-memory Algorithm 1 over unit rows `features` (the oracle for the graph walk).

    `neighbors[row]` lists row's SIMILAR targets (candidates = neighbors); None means all unselected.
    """
    started = time.perf_counter()
    n, dim = features.shape
    total = sum(c.budget for c in components)
    selected = Selected(total, dim)
    taken = np.zeros(n, dtype=bool)
    result = WalkResult(budgets=[c.budget for c in components])
    carry = 0
    filter_error = unit_filter_error(dim)
    for ci, comp in enumerate(components):
        k = comp.vector.astype(np.float64)
        budget = comp.budget + carry
        k_scores = features @ k.astype(np.float32)
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
                                     float(exact_dots(vec, k)), consistency, min_cos))
            members += 1

        def argmax_k():
            free = np.flatnonzero(~taken)
            if not len(free):
                return None
            (best,), _ = top_exact(k_scores[free], filter_error, 1, lambda pos: exact_matvec(features[free[pos]], k))
            return int(free[best])

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
                candidates = _all_unselected(features, taken, last, filter_error)
            else:
                targets = np.asarray(neighbors.get(last, ()), dtype=np.int64)
                pool = targets[~taken[targets]]
                order, cos = order_by_cos(features[pool], pool, features[last])
                candidates = ((float(cos[pos]), pool[pos]) for pos in order)
            found = None
            scope, positions = selected.scope(None if config.conflict_scope == "all" else ci)
            for edge, z in candidates:
                ok, reason, worst, value, min_cos, ratio = admit(features[z], scope, component_sum, k, config.delta)
                if ok:
                    found = (z, edge, ratio, min_cos)
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


def _all_unselected(features: np.ndarray, taken: np.ndarray, last: int, error: float, page: int = 64):
    """(exact cos to `last`, row) of every unselected row, best first (ties by row), computed page by page
    as the walk consumes them: a float32 product orders, exact cosines decide."""
    pool = np.flatnonzero(~taken)
    approx = features[pool] @ features[last]
    order = pool[np.argsort(-approx, kind="stable")]
    approx = np.sort(approx)[::-1]

    def pages():
        for start in range(0, len(order), page):
            rows = order[start:start + page]
            yield approx[start:start + page], rows, exact_matvec(features[rows], features[last]), rows

    return exact_descending(pages(), error)


@dataclass
class Node:
    id: str
    row: int
    vector: np.ndarray
    similar: list[str]  # SIMILAR targets, strongest edge first
    conflicts: list[str]  # targets of its outgoing CONFLICT edges (at most k)


class NodeCache:
    """Nodes fetched during one walk, least recently used dropped beyond `capacity`. Consecutive steps share
    most candidates (neighbours of neighbours), so a step fetches only the vectors it has not seen, and a
    node's SIMILAR list comes with it: stepping from it needs no query for its neighbourhood."""

    def __init__(self, read, capacity: int):
        self.read = read
        self.capacity = max(capacity, 1)
        self.nodes: OrderedDict[str, Node] = OrderedDict()

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.nodes

    def get(self, ids: list[str], expand: list[str] = ()) -> dict[str, Node]:
        """The named nodes, the missing ones fetched in one query, together with the SIMILAR targets of
        `expand` (kept for later steps)."""
        found = {}
        for node_id in ids:
            node = self.nodes.get(node_id)
            if node is not None:
                self.nodes.move_to_end(node_id)
                found[node_id] = node
        missing = [node_id for node_id in ids if node_id not in found]
        if missing or expand:
            records = self.read("walk_nodes", ids=missing, expand=list(expand))
            wanted = set(missing)
            for record, vector in zip(records, decode_vectors(records)):
                node = Node(record["id"], record["row"], vector, record["similar"], record["conflicts"])
                self.nodes[node.id] = node
                if node.id in wanted:
                    found[node.id] = node
            while len(self.nodes) > self.capacity:
                self.nodes.popitem(last=False)
        return found


def validation_key(records, vectors: np.ndarray) -> str:
    """Identity of a validation set (ids and float32 vectors, in order) that node dot products refer to."""
    digest = hashlib.sha256()
    for record, vector in zip(records, vectors):
        digest.update(record["id"].encode() + b"\0" + vector.astype("<f4").tobytes())
    return digest.hexdigest()[:16]


def validation_basis(read, space: str) -> tuple[np.ndarray | None, str]:
    """The validation vectors [m, d] that node dot products are taken with (in `validation_vectors` order)
    and their key; (None, why not) when there are none or m dot products would be no fewer than d floats.
    The build writes the dots and the walk reads them through this one definition."""
    records = read("validation_vectors", space=space, tasks=None)
    if not records:
        return None, "no validation vectors"
    vectors = decode_vectors(records)
    if len(vectors) >= vectors.shape[1]:
        return None, f"{len(vectors)} validation vectors, no fewer than the dimension"
    return vectors, validation_key(records, vectors)


LOOKAHEAD = 3  # guessed next nodes whose neighbourhoods a step's query also fetches
SPAN_TOLERANCE = 1e-6  # largest |K - V^T a| for which components count as lying in the validation span


class GraphWalk:
    """Algorithm 1 as a traversal of the Neo4j graph, in one read transaction: one query per step at most
    (none when every candidate was fetched before), one more per run of fallbacks."""

    def __init__(self, graph, space: str, config: SelectionConfig):
        self.graph = graph
        self.space = space
        self.config = config
        self.round_trips = 0
        self._reader = None

    def _read(self, name: str, **params) -> list[dict[str, Any]]:
        self.round_trips += 1
        return self._reader(name, **params)

    def run(self, components: list[Component], progress=None) -> WalkResult:
        with self.graph.read_transaction() as reader:
            self._reader = reader
            try:
                return self._run(components, progress)
            finally:
                self._reader = None

    def _run(self, components: list[Component], progress=None) -> WalkResult:
        started = time.perf_counter()
        config = self.config
        total = sum(c.budget for c in components)
        selected: Selected | None = None
        result = WalkResult(budgets=[c.budget for c in components])
        carry = 0
        scan_ids, scan_rows, scan_scores, scan_error, result.scan = self._scan(components)
        cache = NodeCache(self._read, config.cache_nodes)
        expanded: set[str] = set()  # ranking entries whose neighbourhoods were asked for
        keep = total + config.rerank + 1  # enough for every anchor and fallback of the run
        for ci, comp in enumerate(components):
            k = comp.vector.astype(np.float64)
            budget = comp.budget + carry
            if budget <= 0:
                result.filled.append(0)
                continue
            order = np.lexsort((scan_rows, -scan_scores[:, ci]))[:keep]
            ranking = [scan_ids[i] for i in order]
            ranked_scores = scan_scores[order, ci]
            component_sum = None
            members = 0
            last: Node | None = None
            cursor = 0
            fetched_upto = 0  # ranking entries before this one were fetched once already

            def unselected(node_id) -> bool:
                return selected is None or node_id not in selected.id_set

            def argmax_k():
                """The exact argmax cos(z, K) over the unselected ranking entries whose scan score is within
                twice the scan's error bound of the best one (at most `rerank`; usually one). The next few
                entries and the neighbourhoods of all of them come in the same query: a run of fallbacks
                visits them in turn."""
                nonlocal cursor, fetched_upto
                while cursor < len(ranking) and not unselected(ranking[cursor]):
                    cursor += 1
                if cursor == len(ranking):
                    return None
                floor = ranked_scores[cursor] - 2 * scan_error[ci]
                top, i = [], cursor
                while i < len(ranking) and len(top) < config.rerank and ranked_scores[i] >= floor:
                    if unselected(ranking[i]):
                        top.append(ranking[i])
                    i += 1
                wanted, extra, expand = top, [], []
                if i > fetched_upto:
                    wanted = top + [x for x in ranking[i:i + LOOKAHEAD] if unselected(x)]
                    fetched_upto = i + LOOKAHEAD
                    extra, expand = self._neighbourhoods([x for x in wanted if x not in expanded], selected, cache)
                    expanded.update(wanted)
                nodes = cache.get(wanted + extra, expand)
                vectors = np.stack([nodes[x].vector for x in top])
                best, _ = best_by_k(np.asarray([nodes[x].row for x in top]), vectors, k)
                return nodes[top[best]]

            def take(node: Node, how, edge=None, consistency=None, min_cos=None):
                nonlocal component_sum, members, selected
                if selected is None:
                    selected = Selected(total, len(node.vector))
                vec = node.vector
                component_sum = (component_sum if component_sum is not None else np.zeros(len(vec))) + vec.astype(np.float64)
                selected.add(node.id, vec, ci, node.conflicts)
                result.picks.append(Pick(len(result.picks) + 1, node.id, int(node.row), ci, members, how,
                                         last.id if last is not None and how != "anchor" else None, edge,
                                         float(exact_dots(vec, k)), consistency, min_cos))
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
                found = self._step(ci, members, last, selected, component_sum, k, result, cache)
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

    def _scan(self, components: list[Component]):
        """cos(z, K) of every node for every component, once per run: (ids, rows, [N, C] scores, per-component
        error bound, how they were obtained).

        The components lie in the span of the validation vectors V (PCA of some of them, centred or not), so
        K = V^T a and cos(z, K) = (z . V^T) a: with each node's dot products with V stored by the build, the
        scan reads m numbers per node instead of d. Otherwise (dots missing or stale, m >= d) it reads every
        vector, and the description says so and why."""
        k = np.stack([c.vector for c in components]).astype(np.float64)
        scanned, reason = self._scan_dots(k)
        if scanned is not None:
            return scanned
        ids: list[str] = []
        rows, scores = [], []
        for records, vectors in vector_pages(self._read, self.space):
            ids += [r["id"] for r in records]
            rows.append(np.asarray([r["row"] for r in records]))
            scores.append(vectors.astype(np.float64) @ k.T)
        dim = k.shape[1]
        norms = np.linalg.norm(k, axis=1) * 1.001  # node vectors have unit norm
        error = float64_dot_error(dim, norms) + exact_dot_error(dim, norms)
        return (ids, np.concatenate(rows), np.concatenate(scores), error, f"full vectors ({reason})")

    def _scan_dots(self, k: np.ndarray):
        """The scan from the stored dot products, or (None, why they cannot be used)."""
        validation, key = validation_basis(self._read, self.space)
        if validation is None:
            return None, key
        basis = validation.T.astype(np.float64)
        coefficients = np.linalg.lstsq(basis, k.T, rcond=None)[0]
        misfit = basis @ coefficients - k.T
        if np.abs(misfit).max() > SPAN_TOLERANCE:
            return None, f"components outside the validation span (residual {np.abs(misfit).max():.1e})"
        m = len(validation)
        page = max(1_000, 4_000_000 // (8 * m))  # about 4 MB of dots per query
        ids: list[str] = []
        rows, scores = [], []
        start = 0
        while True:
            (found,) = self._read("space_validation_dots", space=self.space, key=key, start=start, stop=start + page)
            if found["n"] == 0:
                break
            if len(found["ids"]) < found["n"]:
                return None, (f"{found['n'] - len(found['ids'])} nodes of rows {start}-{start + page - 1} have no dot "
                              "products with the current validation set; `g2is graph build` adds them")
            ids += found["ids"]
            rows.append(np.asarray(found["rows"]))
            scores.append(np.frombuffer(b"".join(found["dots"]), dtype="<f8").reshape(-1, m) @ coefficients)
            start += page
        if not ids:
            return None, "the graph has no nodes"
        # |scan - exact cos(z, K)|: the misfit, the stored dots' and the combination's float64 rounding,
        # and the exact side's own rounding (node vectors have unit norm)
        dim = basis.shape[0]
        weighted = np.abs(coefficients).T @ (np.linalg.norm(basis, axis=0) * 1.001)
        norms = np.linalg.norm(k, axis=1) * 1.001
        error = (np.linalg.norm(misfit, axis=0) + float64_dot_error(dim, weighted)
                 + float64_dot_error(m, weighted) + exact_dot_error(dim, norms))
        return (ids, np.concatenate(rows), np.concatenate(scores), error, f"validation dots ({m} per node)"), ""

    @staticmethod
    def _neighbourhoods(node_ids: list[str], selected: Selected | None, cache: NodeCache) -> tuple[list[str], list[str]]:
        """What a query must add to fetch the unselected SIMILAR targets of `node_ids`: (the unfetched targets
        of the fetched ones, the unfetched ones themselves for the server to expand)."""
        ids, expand = [], []
        for node_id in node_ids:
            if node_id not in cache:
                expand.append(node_id)
                continue
            ids += [y for y in cache.nodes[node_id].similar
                    if y not in cache and (selected is None or y not in selected.id_set)]
        return ids, expand

    @classmethod
    def _lookahead(cls, last: Node, selected: Selected, cache: NodeCache) -> tuple[list[str], list[str]]:
        """When a step needs a query anyway, the neighbourhoods of the nodes the walk will probably visit next
        come with it: from the last node, follow the strongest edge to an unselected node LOOKAHEAD times
        (the first guess not fetched yet ends the chain and is expanded by the server). A right guess makes the
        following steps need no query; a wrong one costs only transfer. Returns (ids, expand)."""
        chain: list[str] = []
        node = last
        for _ in range(LOOKAHEAD):
            guess = next((x for x in node.similar if x not in selected.id_set and x != last.id and x not in chain), None)
            if guess is None:
                break
            chain.append(guess)
            if guess not in cache:
                break
            node = cache.nodes[guess]
        return cls._neighbourhoods(chain, selected, cache)

    def _step(self, ci, members, last: Node, selected: Selected, component_sum, k, result: WalkResult,
              cache: NodeCache):
        config = self.config
        scope, positions = selected.scope(None if config.conflict_scope == "all" else ci)
        scope_ids = selected.id_set if config.conflict_scope == "all" else {selected.ids[p] for p in positions}
        if config.candidates == "neighbors":
            pool = [x for x in last.similar if x not in selected.id_set]
            ahead, expand = [], []
            if not all(x in cache for x in pool):
                ahead, expand = self._lookahead(last, selected, cache)
            fetched = cache.get(pool + ahead, expand)
            nodes = [fetched[x] for x in pool]
            if not nodes:
                return None
            order, cos = order_by_cos(np.stack([z.vector for z in nodes]), np.asarray([z.row for z in nodes]),
                                      last.vector)
            candidates = ((float(cos[pos]), nodes[pos]) for pos in order)
        else:
            candidates = self._all_unselected(last, selected)
        for edge, z in candidates:
            stored = selected.stored_conflict(z.id, z.conflicts, scope_ids)
            if stored is not None:  # a stored CONFLICT edge to the scope: rejected without the scope's products
                result.rejections.append(Rejection(ci, members, z.id, "conflict", stored, selected.cos(stored, z.vector)))
                continue
            ok, reason, worst, value, min_cos, ratio = admit(z.vector, scope, component_sum, k, config.delta)
            if ok:
                return z, edge, ratio, min_cos
            other = selected.ids[positions[worst]] if worst is not None else None
            result.rejections.append(Rejection(ci, members, z.id, reason, other, value))
        return None

    def _all_unselected(self, last: Node, selected: Selected):
        """(exact cos to `last`, node) of every unselected node, best first (ties by row): the server ranks
        by its own cosine and sends pages; exact cosines decide the order, a page at a time as needed.
        The server's similarity is (1 + cos) / 2 from float32 arithmetic of its own; its bound is taken
        as twice this side's, doubled again for the rescaling."""
        error = 4 * unit_filter_error(len(last.vector))

        def pages():
            skip = 0
            while True:
                records = self._read("walk_candidates_all", space=self.space, vector=last.vector.tolist(),
                                     excluded=selected.ids, skip=skip, limit=self.config.page)
                if not records:
                    return
                vectors = decode_vectors(records)
                nodes = [Node(r["id"], r["row"], vector, [], r["conflicts"]) for r, vector in zip(records, vectors)]
                approx = np.asarray([2 * r["weight"] - 1 for r in records])
                yield approx, [z.row for z in nodes], exact_matvec(vectors, last.vector), nodes
                skip += self.config.page

        return exact_descending(pages(), error)

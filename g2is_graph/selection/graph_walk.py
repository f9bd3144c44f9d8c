"""The gradient walk's Neo4j source: Algorithm 1 (`walk.gradient_walk`) as a traversal of the graph.

One read transaction per walk; a step needs one query at most (none when every candidate was fetched
before), a run of fallbacks one more. Anchors and fallbacks are ranked once per run from each node's
stored dot products with the validation vectors (the components lie in their span) or, when those
cannot be used, from every vector; the description says which and why (`scan` in every run).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from g2is_graph.config import SelectionConfig
from g2is_graph.db.graph import decode_vectors, validation_basis, vector_pages
from g2is_graph.numerics import exact_dot_error, exact_matvec, float64_dot_error
from g2is_graph.selection.admission import Selected, WalkResult, best_by_k, center_rows, column_sums, order_by_cos
from g2is_graph.selection.knowledge import Component
from g2is_graph.selection.walk import Node, gradient_walk

LOOKAHEAD = 3  # guessed next nodes whose neighbourhoods a step's query also fetches
SPAN_TOLERANCE = 1e-6  # largest |K - V^T a| for which components count as lying in the validation span


class NodeCache:
    """Nodes fetched during one walk, least recently used dropped beyond `capacity`. Consecutive steps share
    most candidates (neighbours of neighbours), so a step fetches only the vectors it has not seen, and a
    node's SIMILAR list comes with it: stepping from it needs no query for its neighbourhood. `transform`
    maps fetched vectors (the pool-centred deviation)."""

    def __init__(self, read, capacity: int, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        self.read = read
        self.capacity = max(capacity, 1)
        self.transform = transform
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
            vectors = decode_vectors(records)
            if self.transform is not None and len(records):
                vectors = self.transform(vectors)
            wanted = set(missing)
            for record, vector in zip(records, vectors):
                node = Node(record["id"], record["row"], vector, record["similar"], record["conflicts"])
                self.nodes[node.id] = node
                if node.id in wanted:
                    found[node.id] = node
            while len(self.nodes) > self.capacity:
                self.nodes.popitem(last=False)
        return found


class Neo4jSource:
    """Nodes, their SIMILAR lists and stored CONFLICT edges read from the graph through `read`."""

    def __init__(self, read, space: str, dim: int, config: SelectionConfig):
        self._reader = read
        self.space = space
        self.dim = dim
        self.config = config
        self.round_trips = 0
        self.mean: np.ndarray | None = None
        self.cache = NodeCache(self._read, config.cache_nodes)
        self.expanded: set[str] = set()  # ranking entries whose neighbourhoods were asked for

    def _read(self, name: str, **params) -> list[dict[str, Any]]:
        self.round_trips += 1
        return self._reader(name, **params)

    # -- anchors and fallbacks ---------------------------------------------------------------
    def prepare(self, components: list[Component]) -> str:
        if self.config.center_pool:
            self.mean = self._pool_mean()
            self.cache.transform = lambda vectors: center_rows(vectors, self.mean)
        self.scan_ids, self.scan_rows, self.scan_scores, self.scan_error, described = self._scan(components)
        self.keep = sum(c.budget for c in components) + self.config.rerank + 1  # every anchor and fallback
        return described

    def start_component(self, index: int, k: np.ndarray) -> None:
        order = np.lexsort((self.scan_rows, -self.scan_scores[:, index]))[:self.keep]
        self.k = k
        self.error = self.scan_error[index]
        self.ranking = [self.scan_ids[i] for i in order]
        self.ranked_scores = self.scan_scores[order, index]
        self.cursor = 0
        self.fetched_upto = 0  # ranking entries before this one were fetched once already

    def argmax_k(self, selected: Selected) -> Node | None:
        """The exact argmax cos(z, K) over the unselected ranking entries whose scan score is within twice
        the scan's error bound of the best one (at most `rerank`; usually one). The next few entries and the
        neighbourhoods of all of them come in the same query: a run of fallbacks visits them in turn."""
        ranking, scores = self.ranking, self.ranked_scores
        while self.cursor < len(ranking) and ranking[self.cursor] in selected.id_set:
            self.cursor += 1
        if self.cursor == len(ranking):
            return None
        floor = scores[self.cursor] - 2 * self.error
        top, i = [], self.cursor
        while i < len(ranking) and len(top) < self.config.rerank and scores[i] >= floor:
            if ranking[i] not in selected.id_set:
                top.append(ranking[i])
            i += 1
        wanted, extra, expand = top, [], []
        if i > self.fetched_upto:
            wanted = top + [x for x in ranking[i:i + LOOKAHEAD] if x not in selected.id_set]
            self.fetched_upto = i + LOOKAHEAD
            extra, expand = self._neighbourhoods([x for x in wanted if x not in self.expanded], selected)
            self.expanded.update(wanted)
        nodes = self.cache.get(wanted + extra, expand)
        vectors = np.stack([nodes[x].vector for x in top])
        best, _ = best_by_k(np.asarray([nodes[x].row for x in top]), vectors, self.k)
        return nodes[top[best]]

    # -- walk steps ---------------------------------------------------------------------------
    def candidates(self, last: Node, selected: Selected) -> Iterator[tuple[float, Node]]:
        if self.config.candidates != "neighbors":
            yield from self._all_unselected(last, selected)
            return
        pool = [x for x in last.similar if x not in selected.id_set]
        ahead, expand = [], []
        if not all(x in self.cache for x in pool):
            ahead, expand = self._lookahead(last, selected)
        fetched = self.cache.get(pool + ahead, expand)
        nodes = [fetched[x] for x in pool]
        if not nodes:
            return
        order, cos = order_by_cos(np.stack([z.vector for z in nodes]), np.asarray([z.row for z in nodes]),
                                  last.vector)
        for pos in order:
            yield float(cos[pos]), nodes[pos]

    def _all_unselected(self, last: Node, selected: Selected):
        """(exact cos to `last`, node) of every unselected node, best first (ties by row): one streamed pass
        over the vectors computes every exact cosine (memory: one page and N scores), then the nodes are
        fetched in that order a page at a time as the walk asks for them. The stored vectors are bytes, which
        the server cannot rank by (docs/decisions.md, issue 19); the literal walk is O(N d) per step anyway."""
        ids: list[str] = []
        rows, scores = [], []
        for records, vectors in vector_pages(self._read, self.space, self.config.page):
            keep = [i for i, r in enumerate(records) if r["id"] not in selected.id_set]
            if not keep:
                continue
            if self.mean is not None:
                vectors = center_rows(vectors, self.mean)
            ids += [records[i]["id"] for i in keep]
            rows.append(np.asarray([records[i]["row"] for i in keep]))
            scores.append(exact_matvec(vectors[keep], last.vector))
        if not ids:
            return
        rows_all, cos = np.concatenate(rows), np.concatenate(scores)
        order = np.lexsort((rows_all, -cos))
        for start in range(0, len(order), self.config.page):
            part = order[start:start + self.config.page]
            nodes = self.cache.get([ids[i] for i in part], [])
            for i in part:
                yield float(cos[i]), nodes[ids[i]]

    def stored_conflict(self, node: Node, selected: Selected, scope_ids) -> str | None:
        if self.mean is not None:
            return None  # stored edges are cosines of the uncentred vectors
        return selected.stored_conflict(node.id, node.conflicts, scope_ids)

    def taken(self, node: Node) -> None:
        pass

    def _neighbourhoods(self, node_ids: list[str], selected: Selected) -> tuple[list[str], list[str]]:
        """What a query must add to fetch the unselected SIMILAR targets of `node_ids`: (the unfetched targets
        of the fetched ones, the unfetched ones themselves for the server to expand)."""
        ids, expand = [], []
        for node_id in node_ids:
            if node_id not in self.cache:
                expand.append(node_id)
                continue
            ids += [y for y in self.cache.nodes[node_id].similar if y not in self.cache and y not in selected.id_set]
        return ids, expand

    def _lookahead(self, last: Node, selected: Selected) -> tuple[list[str], list[str]]:
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
            if guess not in self.cache:
                break
            node = self.cache.nodes[guess]
        return self._neighbourhoods(chain, selected)

    # -- the scan ------------------------------------------------------------------------------
    def _pool_mean(self) -> np.ndarray:
        total, n = np.zeros(self.dim), 0
        for _, vectors in vector_pages(self._read, self.space):
            total += column_sums(vectors)
            n += len(vectors)
        return total / max(n, 1)

    def _scan(self, components: list[Component]):
        """cos(z, K) of every node for every component, once per run: (ids, rows, [N, C] scores, per-component
        bound on |score - exact cosine|, how they were obtained).

        The components lie in the span of the validation vectors V (PCA of some of them, centred or not), so
        K = V^T a and cos(z, K) = (z . V^T) a: with each node's dot products with V stored by the build, the
        scan reads m numbers per node instead of d. Otherwise (dots missing or stale, m >= d, pool-centred
        vectors) it reads every vector, and the description says so and why."""
        k = np.stack([c.vector for c in components]).astype(np.float64)
        if self.mean is not None:
            reason = "pool-centred features"
        else:
            scanned, reason = self._scan_dots(k)
            if scanned is not None:
                return scanned
        ids: list[str] = []
        rows, scores = [], []
        for records, vectors in vector_pages(self._read, self.space):
            if self.mean is not None:
                vectors = center_rows(vectors, self.mean)
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


class GraphWalk:
    """Algorithm 1 as a traversal of the Neo4j graph, in one read transaction."""

    def __init__(self, graph, space: str, config: SelectionConfig, dim: int):
        self.graph = graph
        self.space = space
        self.config = config
        self.dim = dim

    def run(self, components: list[Component], progress=None) -> WalkResult:
        with self.graph.read_transaction() as reader:
            return gradient_walk(Neo4jSource(reader, self.space, self.dim, self.config), components, self.config,
                                 progress)

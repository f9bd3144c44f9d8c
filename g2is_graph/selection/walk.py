"""The gradient walk (G2IS Algorithm 1), written once, over a candidate source.

Per component K with budget b: the anchor is the unselected node with the largest cos(z, K); each
step takes, among the candidates ordered by cos(z, s) to the last added node s, the first z that the
admission rule (`admission.admit`: no conflict, consistency) accepts, and falls back, when none
passes, to the unselected argmax cos(z, K) (paper) or stops short (official). A node is never
selected twice.

A source says where nodes come from: `InMemorySource` walks a feature matrix (the oracle; candidates
are given SIMILAR lists or every unselected row), `graph_walk.Neo4jSource` walks the Neo4j graph
(node cache, lookahead, anchor ranking from stored dot products). Both order candidates and rank
anchors by the same exact cosines (`numerics`), so on a complete graph they select the same samples
in the same order.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from g2is_graph.config import SelectionConfig
from g2is_graph.numerics import exact_descending, exact_dots, exact_matvec, top_exact, unit_filter_error
from g2is_graph.selection.admission import (
    Pick,
    Rejection,
    Selected,
    WalkResult,
    admit,
    alignment,
    center_rows,
    column_sums,
    order_by_cos,
)
from g2is_graph.selection.knowledge import Component


@dataclass
class Node:
    id: str
    row: int
    vector: np.ndarray
    similar: list[str]  # SIMILAR targets, strongest edge first (graph sources)
    conflicts: list[str]  # targets of its outgoing CONFLICT edges (at most k; graph sources)


class CandidateSource(Protocol):
    dim: int
    round_trips: int

    def prepare(self, components: list[Component]) -> str:
        """Rank every node by cos(z, K) for every component; returns how it was done."""

    def start_component(self, index: int, k: np.ndarray) -> None: ...

    def argmax_k(self, selected: Selected) -> Node | None:
        """The exact argmax cos(z, K) of the current component among unselected nodes (ties: lowest row)."""

    def candidates(self, last: Node, selected: Selected) -> Iterator[tuple[float, Node]]:
        """(exact cos(z, last), z) of the unselected candidates, best first (ties: lowest row), lazily."""

    def stored_conflict(self, node: Node, selected: Selected, scope_ids) -> str | None:
        """A selected node in the scope with a stored CONFLICT edge to `node` (a shortcut), or None."""

    def taken(self, node: Node) -> None: ...


@dataclass
class _Growing:
    """One component's set while it grows."""

    index: int
    k: np.ndarray
    total: np.ndarray  # sum of the members' vectors (float64)
    members: int = 0
    anchor_cos: float | None = None
    last: Node | None = None


def gradient_walk(source: CandidateSource, components: list[Component], config: SelectionConfig,
                  progress=None) -> WalkResult:
    """Algorithm 1 over `source`: every component grown in turn from its anchor."""
    started = time.perf_counter()
    result = WalkResult(budgets=[c.budget for c in components])
    result.scan = source.prepare(components)
    selected = Selected(sum(c.budget for c in components), source.dim)
    carry = 0
    for ci, comp in enumerate(components):
        budget = comp.budget + carry
        grow = _Growing(ci, comp.vector.astype(np.float64), np.zeros(source.dim))
        if budget > 0:
            source.start_component(ci, grow.k)
        while grow.members < budget:
            if grow.last is not None:
                result.steps += 1
                found = _step(source, config, selected, grow, result)
                if found is not None:
                    _take(result, selected, source, grow, *found, progress=progress)
                    continue
                if config.fallback != "paper":
                    break
            node = source.argmax_k(selected)
            if node is None:
                break
            _take(result, selected, source, grow, node, "anchor" if grow.last is None else "fallback",
                  progress=progress)
        result.filled.append(grow.members)
        result.alignment.append({"anchor": None if grow.anchor_cos is None else abs(grow.anchor_cos),
                                 "end": abs(alignment(grow.total, grow.k)) if grow.members else None})
        carry = budget - grow.members if config.reassign_shortfall else 0
    result.round_trips = source.round_trips
    result.seconds = time.perf_counter() - started
    return result


def _take(result: WalkResult, selected: Selected, source: CandidateSource, grow: _Growing, node: Node, how: str,
          edge: float | None = None, consistency: float | None = None, min_cos: float | None = None,
          progress=None) -> None:
    from_id = grow.last.id if grow.last is not None and how != "anchor" else None
    cos_k = float(exact_dots(node.vector, grow.k))
    if how == "anchor":
        grow.anchor_cos = cos_k
    grow.total = grow.total + node.vector.astype(np.float64)
    selected.add(node.id, node.vector, grow.index, node.conflicts)
    source.taken(node)
    result.picks.append(Pick(len(result.picks) + 1, node.id, int(node.row), grow.index, grow.members, how, from_id,
                             edge, cos_k, consistency, min_cos))
    grow.members += 1
    grow.last = node
    if progress is not None:
        progress.update(1)


def _step(source: CandidateSource, config: SelectionConfig, selected: Selected, grow: _Growing,
          result: WalkResult):
    """The first candidate the admission rule accepts, as (node, "walk", edge cos, ratio, min cos), or None;
    every candidate refused on the way is recorded."""
    scope, positions = selected.scope(None if config.conflict_scope == "all" else grow.index)
    scope_ids = selected.id_set if config.conflict_scope == "all" else {selected.ids[p] for p in positions}
    reference = grow.anchor_cos if config.consistency_reference == "anchor" else None
    for edge, z in source.candidates(grow.last, selected):
        stored = source.stored_conflict(z, selected, scope_ids)
        if stored is not None:  # a stored CONFLICT edge to the scope: rejected without the scope's products
            result.rejections.append(Rejection(grow.index, grow.members, z.id, "conflict", stored,
                                               selected.cos(stored, z.vector)))
            continue
        ok, reason, worst, value, min_cos, ratio = admit(z.vector, scope, grow.total, grow.k, config.delta, reference)
        if ok:
            return z, "walk", edge, ratio, min_cos
        other = selected.ids[positions[worst]] if worst is not None else None
        result.rejections.append(Rejection(grow.index, grow.members, z.id, reason, other, value))
    return None


class InMemorySource:
    """Unit rows `features` in memory; candidates are `neighbors[row]` (SIMILAR targets) or, when None,
    every unselected row (the literal Algorithm 1). With `center_pool` the rows are first replaced by their
    pool-mean-centred unit vectors."""

    def __init__(self, features: np.ndarray, ids: list[str], neighbors: dict[int, np.ndarray] | None = None,
                 center_pool: bool = False):
        features = np.ascontiguousarray(features, dtype=np.float32)
        if center_pool:
            features = center_rows(features, column_sums(features) / len(features))
        self.features = features
        self.ids = ids
        self.neighbors = neighbors
        self.dim = features.shape[1]
        self.round_trips = 0
        self.free = np.ones(len(features), dtype=bool)
        self.filter_error = unit_filter_error(self.dim)
        self.k: np.ndarray | None = None
        self.k_scores: np.ndarray | None = None

    def node(self, row: int) -> Node:
        return Node(self.ids[row], int(row), self.features[row], [], [])

    def prepare(self, components: list[Component]) -> str:
        return "in memory"

    def start_component(self, index: int, k: np.ndarray) -> None:
        self.k = k
        self.k_scores = self.features @ k.astype(np.float32)

    def argmax_k(self, selected: Selected) -> Node | None:
        free = np.flatnonzero(self.free)
        if not len(free):
            return None
        (best,), _ = top_exact(self.k_scores[free], self.filter_error, 1,
                               lambda pos: exact_matvec(self.features[free[pos]], self.k))
        return self.node(free[best])

    def candidates(self, last: Node, selected: Selected) -> Iterator[tuple[float, Node]]:
        if self.neighbors is None:
            for edge, row in self._all_free(last.row):
                yield edge, self.node(row)
            return
        targets = np.asarray(self.neighbors.get(last.row, ()), dtype=np.int64)
        pool = targets[self.free[targets]]
        if len(pool):
            order, cos = order_by_cos(self.features[pool], pool, self.features[last.row])
            for pos in order:
                yield float(cos[pos]), self.node(pool[pos])

    def _all_free(self, last: int, page: int = 64):
        """(exact cos to `last`, row) of every unselected row, page by page as the walk consumes them: a float32
        product orders, exact cosines decide."""
        pool = np.flatnonzero(self.free)
        approx = self.features[pool] @ self.features[last]
        by_approx = np.argsort(-approx, kind="stable")
        order, approx = pool[by_approx], approx[by_approx]

        def pages():
            for start in range(0, len(order), page):
                rows = order[start:start + page]
                yield approx[start:start + page], rows, exact_matvec(self.features[rows], self.features[last]), rows

        return exact_descending(pages(), self.filter_error)

    def stored_conflict(self, node: Node, selected: Selected, scope_ids) -> str | None:
        return None  # every conflict is computed

    def taken(self, node: Node) -> None:
        self.free[node.row] = False


def reference_walk(features: np.ndarray, ids: list[str], components: list[Component], config: SelectionConfig,
                   neighbors: dict[int, np.ndarray] | None = None) -> WalkResult:
    """Dense, in-memory Algorithm 1 over unit rows `features` (the oracle for the graph walk).

    `neighbors[row]` lists row's SIMILAR targets (candidates = neighbors); None means all unselected."""
    source = InMemorySource(features, ids, neighbors, config.center_pool)
    return gradient_walk(source, components, config)

"""The walk's record types, its growing selection and the admission rule of G2IS Algorithm 1.

A candidate z is admitted to component K's set S' when
  no conflict:  cos(z, s') >= 0 for every s' in the conflict scope (all selected, or this component's)
  consistency:  |cos(mean(S' + z), K)| >= delta * |cos(reference, K)|
where the reference is S' itself (the paper: the set before this step) or, as a labelled deviation, the
component's anchor. Every cosine that decides is exact (`numerics`): a float32 product finds the few
scope members that could hold the minimum, exact cosines decide among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from g2is_graph.numerics import exact_dots, exact_matvec, exact_norm, top_exact, unit_filter_error


@dataclass
class Pick:
    rank: int
    id: str
    row: int
    component: int
    step: int
    how: str  # anchor | walk | fallback | score | random
    from_id: str | None = None
    edge_cos: float | None = None  # cos(z, s) to the node it was reached from
    cos_k: float | None = None  # cos(z, K), or the baseline's score
    consistency: float | None = None  # |cos(mean(S'+z), K)| / |cos(reference, K)|
    min_cos_selected: float | None = None  # min cos(z, s') over the conflict scope at acceptance

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Rejection:
    component: int
    step: int
    id: str
    reason: str  # conflict | consistency
    other: str | None  # the selected node it conflicted with
    value: float  # the conflicting cosine, or the consistency ratio

    def record(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class WalkResult:
    picks: list[Pick] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    filled: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    alignment: list[dict[str, float]] = field(default_factory=list)  # |cos(S', K)| at the anchor and at the end
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


def admit(vector: np.ndarray, scope: np.ndarray, component_sum: np.ndarray, k: np.ndarray, delta: float,
          reference: float | None = None):
    """(passes, reason, worst scope position or None, value, min cos to scope, consistency ratio).

    `reference` is cos(reference set, K) for the consistency test; None: the set before this step. The
    minimum cosine to the scope is exact (ties: the earliest selected)."""
    min_cos = None
    if len(scope):
        approx = scope @ vector.astype(np.float32)
        (worst,), (neg_min,) = top_exact(-approx, unit_filter_error(len(vector)), 1,
                                         lambda rows: -exact_matvec(scope[rows], vector))
        worst, min_cos = int(worst), float(-neg_min)
        if min_cos < 0:
            return False, "conflict", worst, min_cos, min_cos, None
    before = alignment(component_sum, k) if reference is None else reference
    after = alignment(component_sum + vector, k)
    ratio = abs(after) / abs(before) if before != 0 else float("inf")
    if abs(after) < delta * abs(before):
        return False, "consistency", None, ratio, min_cos, ratio
    return True, None, None, ratio, min_cos, ratio


def alignment(vector_sum: np.ndarray, k: np.ndarray) -> float:
    """cos(sum, K) = cos(mean, K), exact; 0 for an empty sum."""
    norm = exact_norm(vector_sum)
    return float(exact_dots(vector_sum, k) / norm) if norm > 0 else 0.0


def order_by_cos(vectors: np.ndarray, rows: np.ndarray, to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `vectors` by descending exact cosine to `to`, ties by row."""
    cos = exact_matvec(vectors, to)
    return np.lexsort((rows, -cos)), cos


def best_by_k(top_rows: np.ndarray, vectors: np.ndarray, k: np.ndarray) -> tuple[int, float]:
    """Among the top entries of a coarse ranking, the exact argmax cos(z, K) (ties: lowest row)."""
    cos = exact_matvec(vectors, k)
    best = np.lexsort((top_rows, -cos))[0]
    return int(best), float(cos[best])


def column_sums(rows: np.ndarray) -> np.ndarray:
    """Exact-order float64 sums of the columns of [n, d] (a fixed pairwise tree over the rows)."""
    rows = np.asarray(rows)
    return exact_dots(rows.T, np.ones(len(rows), dtype=np.float32)) if len(rows) else np.zeros(rows.shape[1])


def center_rows(rows: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Unit float32 rows of (rows - mean): the pool-centred vectors of the `center_pool` deviation."""
    centred = rows.astype(np.float64) - mean
    norms = np.sqrt(exact_dots(centred, centred))
    return (centred / np.where(norms > 0, norms, 1.0)[:, None]).astype(np.float32)

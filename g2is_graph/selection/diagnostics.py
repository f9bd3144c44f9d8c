"""Regime diagnostics: does the walk actually run in this selection, and can its constraints act?

G2IS degenerates in two ways that a result table does not show. With a few picks per component almost
every pick is an anchor and G2IS is its own "w/o graph" ablation; with every pool cosine positive (Adam
features share the b1*m term and lie in one cone) there is no CONFLICT edge and the no-conflict
constraint never acts. Every G2IS run records the numbers that tell (docs/quality.md reads them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from g2is_graph.selection.admission import WalkResult
from g2is_graph.selection.knowledge import Component

MIN_MEDIAN_BUDGET = 5  # below this many picks per component the walk barely runs


def pool_cosine_stats(vectors: np.ndarray, sample: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Pairwise cosines of a seeded sample of the pool's unit vectors (a diagnostic, not a decision)."""
    n = len(vectors)
    if n < 2:
        return {"sample": n, "pairs": 0}
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    x = np.asarray(vectors[rows], dtype=np.float64)
    cos = (x @ x.T)[np.triu_indices(len(rows), 1)]
    q = np.percentile(cos, [1, 5, 50, 95, 99])
    return {"sample": int(len(rows)), "pairs": int(len(cos)), "mean": float(cos.mean()), "min": float(cos.min()),
            "p01": float(q[0]), "p05": float(q[1]), "p50": float(q[2]), "p95": float(q[3]), "p99": float(q[4]),
            "max": float(cos.max()), "negative_fraction": float((cos < 0).mean())}


def share_text(fraction: float) -> str:
    """A fraction as a percentage, or in scientific notation when a percentage would round a few pairs in
    millions to 0.0% (the negative-cosine share that tells whether CONFLICT edges can exist at all)."""
    return f"{fraction:.1e}" if 0 < fraction < 5e-4 else f"{fraction:.1%}"


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": float(np.min(values)), "median": float(np.median(values)), "max": float(np.max(values))}


def regime_diagnostics(walk: WalkResult, components: list[Component], pool_cosines: dict[str, Any] | None,
                       conflict_edges: int) -> dict[str, Any]:
    """The numbers that say whether the walk ran and its constraints could act, with warnings."""
    how = Counter(p.how for p in walk.picks)
    n = max(len(walk.picks), 1)
    anchors = [p for p in walk.picks if p.how == "anchor"]
    out: dict[str, Any] = {
        "components": len(components),
        "budget_per_component": _spread([c.budget for c in components]),
        "picks_per_component": _spread(walk.filled),
        "share": {kind: how.get(kind, 0) / n for kind in ("anchor", "walk", "fallback")},
        "anchors_nonpositive": sum(1 for p in anchors if (p.cos_k or 0.0) <= 0),
        "rejections": dict(Counter(r.reason for r in walk.rejections)),
        "alignment": [{"component": i, **a} for i, a in enumerate(walk.alignment)],
        "pool_cosines": pool_cosines,
        "conflict_edges": int(conflict_edges),
    }
    warnings = []
    median = out["budget_per_component"]["median"] if components else 0
    if median < MIN_MEDIAN_BUDGET:
        warnings.append(f"the walk barely runs: {median:g} picks per component (median over {len(components)} "
                        "components), so G2IS is close to no-graph here; lower tau, raise the ratio or the pool")
    if conflict_edges == 0:
        seen = "" if not pool_cosines or "min" not in pool_cosines else (
            f" (sampled pool cosines {pool_cosines['min']:.2f} to {pool_cosines['max']:.2f})")
        warnings.append(f"the graph has no CONFLICT edge{seen}: no pool pair is anti-aligned, so the no-conflict "
                        "constraint never acts; a longer warmup or --center-pool changes that")
    out["warnings"] = warnings
    return out


def describe(diagnostics: dict[str, Any]) -> str:
    """One line for the terminal."""
    d = diagnostics
    parts = [f"{d['components']} components"]
    if d["picks_per_component"]:
        p = d["picks_per_component"]
        parts.append(f"picks per component {p['min']:g}/{p['median']:g}/{p['max']:g} (min/median/max)")
    share = d["share"]
    parts.append(f"anchor {share['anchor']:.0%}, walk {share['walk']:.0%}, fallback {share['fallback']:.0%}")
    parts.append(f"{d['anchors_nonpositive']} anchors with cos(z, K) <= 0")
    rejections = d["rejections"]
    parts.append(f"rejections: conflict {rejections.get('conflict', 0)}, consistency {rejections.get('consistency', 0)}")
    pool = d.get("pool_cosines")
    if pool and "mean" in pool:
        parts.append(f"pool cosines mean {pool['mean']:.2f} [{pool['min']:.2f}, {pool['max']:.2f}], "
                     f"{share_text(pool['negative_fraction'])} negative")
    parts.append(f"{d['conflict_edges']} CONFLICT edges")
    ends = [(a["anchor"], a["end"]) for a in d["alignment"] if a.get("anchor") is not None]
    if ends:
        parts.append(f"|cos(S', K)| anchor -> end, median {np.median([a for a, _ in ends]):.2f} -> "
                     f"{np.median([e for _, e in ends]):.2f}")
    return "regime: " + "; ".join(parts)

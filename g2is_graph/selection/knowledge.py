"""Core knowledge: principal components of the validation features, their weights and budgets.

PCA keeps the fewest components whose cumulative explained-variance ratio exceeds tau; weights are
those ratios renormalised; budgets are floor(N * weight) topped up by largest remainder so they sum
to N exactly. Centred PCA (scikit-learn's default, the official code) removes the mean validation
gradient; uncentred keeps it. Component signs are arbitrary, so by default each is flipped to make
the mean projection of the (raw) validation features on it non-negative; the flip is recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from g2is_graph.config import SelectionConfig
from g2is_graph.errors import ConfigError


@dataclass(frozen=True)
class Component:
    index: int  # position among the kept components (of its task)
    task: str
    vector: np.ndarray  # unit, float64
    explained_ratio: float
    weight: float
    budget: int
    flipped: bool
    mean_projection: float  # mean of validation features . vector, after orientation

    def record(self) -> dict:
        return {"index": self.index, "task": self.task, "explained_ratio": self.explained_ratio,
                "weight": self.weight, "budget": self.budget, "flipped": self.flipped,
                "mean_projection": self.mean_projection}


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Integer budgets proportional to `weights` that sum to `total` (ties to the earlier component)."""
    weights = np.asarray(weights, dtype=np.float64)
    exact = total * weights / weights.sum()
    budgets = np.floor(exact).astype(int)
    remainder = exact - budgets
    for i in np.argsort(-remainder, kind="stable")[: total - budgets.sum()]:
        budgets[i] += 1
    return budgets.tolist()


def principal_components(features: np.ndarray, centered: bool) -> tuple[np.ndarray, np.ndarray]:
    """Unit components (rows) and explained-variance ratios, largest first."""
    x = np.asarray(features, dtype=np.float64)
    if centered:
        from sklearn.decomposition import PCA

        n_components = min(x.shape[0] - 1, x.shape[1])
        if n_components < 1:
            raise ConfigError("centred PCA needs at least 2 validation examples")
        pca = PCA(n_components=n_components, svd_solver="full").fit(x)
        keep = pca.explained_variance_ratio_ > 1e-12
        return pca.components_[keep], pca.explained_variance_ratio_[keep]
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    energy = singular ** 2
    keep = energy / energy.sum() > 1e-12
    return vt[keep], (energy / energy.sum())[keep]


def n_kept(ratios: np.ndarray, tau: float, n_components: int | None = None,
           component_fraction: float | None = None) -> int:
    """How many leading components are core knowledge. The paper reads it two ways: the fewest whose
    cumulative explained-variance ratio exceeds tau (Algorithm 1, the official code; the default), or a
    count, "the first 50% of principal components" (a fraction of the informative ones, at least one)."""
    if n_components is not None:
        return min(n_components, len(ratios))
    if component_fraction is not None:
        return max(1, min(len(ratios), int(np.ceil(component_fraction * len(ratios) - 1e-9))))
    cumulative = np.cumsum(ratios)
    return min(int(np.searchsorted(cumulative, tau, side="right")) + 1, len(ratios))


def core_knowledge(features: np.ndarray, n_select: int, tau: float, centered: bool, orient: bool,
                   task: str = "all", n_components: int | None = None,
                   component_fraction: float | None = None) -> list[Component]:
    """The kept components of one validation set with their budgets (summing to n_select)."""
    components, ratios = principal_components(features, centered)
    kept = n_kept(ratios, tau, n_components, component_fraction)
    ratios = ratios[:kept]
    weights = ratios / ratios.sum()
    budgets = largest_remainder(n_select, weights)
    out = []
    for i in range(kept):
        vector = components[i] / np.linalg.norm(components[i])
        projection = float(np.mean(features @ vector))
        flipped = bool(orient and projection < 0)
        if flipped:
            vector, projection = -vector, -projection
        out.append(Component(i, task, vector, float(ratios[i]), float(weights[i]), budgets[i], flipped, projection))
    return out


def components_for_tasks(features: np.ndarray, tasks: Sequence[str], n_select: int, tau: float, centered: bool,
                         orient: bool, multi_task: str, n_components: int | None = None,
                         component_fraction: float | None = None) -> list[Component]:
    """Pooled: one PCA over every task's examples. Per-task: the budget split equally between tasks."""
    tasks = np.asarray(tasks)
    how = {"n_components": n_components, "component_fraction": component_fraction}
    if multi_task == "pooled" or len(set(tasks)) == 1:
        return core_knowledge(features, n_select, tau, centered, orient, ",".join(sorted(set(tasks))), **how)
    names = sorted(set(tasks))
    out = []
    for name, budget in zip(names, largest_remainder(n_select, [1.0] * len(names))):
        out.extend(core_knowledge(features[tasks == name], budget, tau, centered, orient, name, **how))
    return out


def components_for_selection(features: np.ndarray, tasks: Sequence[str], n_select: int,
                             config: SelectionConfig) -> list[Component]:
    """The components a selection run asks for (every reading of core knowledge it names)."""
    return components_for_tasks(features, tasks, n_select, config.tau, config.centered, config.orient,
                                config.multi_task, config.n_components, config.component_fraction)

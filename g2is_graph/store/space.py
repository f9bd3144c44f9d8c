"""The feature space a graph lives in: which model, adapters, projector and checkpoint weights.

LESS scores with a checkpoint-weighted cosine, sum_c w_c cos(x_c, y_c). A node's vector is the
concatenation over checkpoints of sqrt(w_c) * normalized_c (weights summing to 1), which has unit norm
and whose plain cosine with another such vector is exactly that weighted cosine. With one checkpoint it
is the normalised feature itself. Every node carries the space's id; the id hashes everything that
makes two features comparable, so features from another model, adapter or projector are refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g2is_graph.config import ProjectorConfig
from g2is_graph.grads.projection import SPARSE_BLOCK_ROWS
from g2is_graph.provenance import differing
from g2is_graph.store.features import FeatureStore, StoreError

COMPARABLE_FIELDS = ("model", "projector", "parameters")


@dataclass(frozen=True)
class FeatureSpace:
    model: dict[str, Any]
    projector: dict[str, Any]
    parameters: dict[str, Any] | None
    gradient: dict[str, Any]  # of the training features (adam form); validation features are plain gradients
    checkpoints: tuple[dict[str, Any], ...]
    weights: tuple[float, ...]

    @property
    def dim(self) -> int:
        return int(self.projector["dim"]) * len(self.checkpoints)

    @property
    def id(self) -> str:
        body = json.dumps(self.describe(with_id=False), sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:16]

    def describe(self, with_id: bool = True) -> dict[str, Any]:
        out = {"model": self.model, "projector": self.projector, "parameters": self.parameters,
               "gradient": self.gradient, "checkpoints": list(self.checkpoints), "weights": list(self.weights)}
        if with_id:
            out["id"] = self.id
            out["dim"] = self.dim
        return out

    def node_properties(self) -> dict[str, Any]:
        """Flat properties for the :FeatureSpace node (Neo4j stores no maps)."""
        return {"id": self.id, "dim": self.dim, "n_checkpoints": len(self.checkpoints),
                "checkpoints": [c.get("name", "?") for c in self.checkpoints], "weights": list(self.weights),
                "description": json.dumps(self.describe(), sort_keys=True)}


def open_stores(paths: Sequence[str | Path]) -> list[FeatureStore]:
    """The stores of one split, one per checkpoint: complete, same rows, comparable features."""
    if not paths:
        raise StoreError("no feature stores given")
    stores = [FeatureStore(p) for p in paths]
    for store in stores:
        store.verify()
    first = stores[0]
    for other in stores[1:]:
        first.check_compatible(other, COMPARABLE_FIELDS)
        if other.meta["records_sha256"] != first.meta["records_sha256"]:
            raise StoreError(f"{other.path} holds different records than {first.path}; the checkpoints of one "
                             "split must be featurised from the same jsonl")
    names = [s.meta["checkpoint"].get("name") for s in stores]
    if len(set(names)) != len(names):
        raise StoreError(f"checkpoint {names} given twice: {', '.join(str(s.path) for s in stores)}")
    return stores


def lr_weights(mean_lrs: Sequence[float | None]) -> tuple[float, ...]:
    """LESS's checkpoint weights: each checkpoint's mean learning rate, renormalised to sum to 1. Equal weights
    when no rate is recorded at all (features imported from LESS files carry none); a partial record or rates
    that are all zero are refused, since weighting by them would be a guess."""
    if all(lr is None for lr in mean_lrs):
        return tuple(1.0 / len(mean_lrs) for _ in mean_lrs)
    if any(lr is None for lr in mean_lrs):
        raise StoreError(f"learning rates recorded for some checkpoints only ({list(mean_lrs)}); featurise every "
                         "checkpoint of one warmup")
    total = sum(float(lr) for lr in mean_lrs)
    if total <= 0:
        raise StoreError("the checkpoints' learning rates are all zero; cannot weight checkpoints",
                         hint="warm up with a positive learning rate, or import the stores without an lr log")
    return tuple(float(lr) / total for lr in mean_lrs)


def checkpoint_weights(stores: Sequence[FeatureStore]) -> tuple[float, ...]:
    return lr_weights([s.meta["checkpoint"].get("mean_lr") for s in stores])


def projector_config(space: dict[str, Any], where: Path) -> ProjectorConfig:
    """The ProjectorConfig that reproduces a described space's projector (`where` names the description)."""
    ident = space["projector"]
    if ident.get("generator") != "numpy-philox-v1":
        raise StoreError(f"{where}: the features come from projector {ident.get('kind')!r} "
                         f"({ident.get('generator', 'imported')}), which g2is cannot reproduce for new records")
    defaults = ProjectorConfig()
    block_rows = ident.get("block_rows", SPARSE_BLOCK_ROWS if ident["kind"] == "sparse" else defaults.block_rows)
    return ProjectorConfig(kind=ident["kind"], dim=int(ident["dim"]), seed=int(ident["seed"]),
                           sparse_nnz=int(ident.get("sparse_nnz", defaults.sparse_nnz)), block_rows=int(block_rows))


def space_of(stores: Sequence[FeatureStore]) -> FeatureSpace:
    meta = stores[0].meta
    return FeatureSpace(model=meta["model"], projector=meta["projector"], parameters=meta.get("parameters"),
                        gradient=meta["gradient"], checkpoints=tuple(s.meta["checkpoint"] for s in stores),
                        weights=checkpoint_weights(stores))


def check_in_space(space: FeatureSpace, stores: Sequence[FeatureStore], role: str) -> None:
    """Refuse stores that were not made with this space's model, projector and checkpoints."""
    reference = {"model": space.model, "projector": space.projector, "parameters": space.parameters}
    different = differing(reference, stores[0].meta, COMPARABLE_FIELDS)
    checkpoints = tuple(s.meta["checkpoint"] for s in stores)
    if [c.get("adapter_sha256", c.get("name")) for c in checkpoints] != \
            [c.get("adapter_sha256", c.get("name")) for c in space.checkpoints]:
        different.append("checkpoints")
    if different:
        raise StoreError(f"{role} features in {stores[0].path} differ from the graph's feature space {space.id} "
                         f"in {', '.join(different)}; featurise them with the same model, checkpoints and projector")


def combined_features(stores: Sequence[FeatureStore], weights: Sequence[float], rows: Sequence[int] | None = None,
                      out: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm node vectors whose cosine is the checkpoint-weighted cosine: of `rows` (sorted row numbers
    of the stores; default all), written into `out` when given. Read a chunk at a time into the one result
    array, so a million-row pool costs its vectors once, not the whole stores plus a gathered copy."""
    n_rows = stores[0].plan.n_rows
    rows = np.arange(n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
    if len(rows) > 1 and np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be sorted and distinct")
    width = sum(s.dim for s in stores)
    if out is None:
        out = np.empty((len(rows), width), dtype=np.float32)
    elif out.shape != (len(rows), width):
        raise ValueError(f"out has shape {out.shape}, expected {(len(rows), width)}")
    column = 0
    for store, weight in zip(stores, weights):
        scale = None if len(stores) == 1 else np.sqrt(weight, dtype=np.float32)
        for chunk in range(store.plan.n_chunks):
            start, stop = store.plan.bounds(chunk)
            first, last = np.searchsorted(rows, [start, stop])
            if first == last:
                continue
            block = store.read_chunk(chunk, "normalized")[rows[first:last] - start]
            out[first:last, column:column + store.dim] = block if scale is None else scale * block
        column += store.dim
    return out

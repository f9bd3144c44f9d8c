"""The graph job: feature stores -> :Sample nodes with their vectors, SIMILAR and CONFLICT edges in Neo4j.

A build computes, then writes. Its state lives in a directory next to the stores (default
`<stores' parent>/graph`):
    state.json      the feature space, settings, the segments (input stores) consumed, the node ids,
                    the build number and what the next write must cover
    index.bin       the hnswlib index over every node (extended by incremental ingests)
    neighbors.npz   each node's SIMILAR and CONFLICT lists (row indices and raw cosines)

Writes are MERGEs (nodes by id; edges by syncing each source's list exactly), so any write can be
repeated: an interrupted build, or one whose server died, is re-run and ends in the same graph. The
:FeatureSpace node records the last build written completely; a re-run of a finished build is a no-op.
A later segment adds only unseen content (by content hash), and updates the lists of existing nodes
that newcomers displace; in exact mode A then B gives exactly the graph of A+B.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from g2is_graph.config import GraphConfig, to_jsonable
from g2is_graph.diagnostics import pool_cosine_stats
from g2is_graph.graph import Graph, GraphError, validation_basis
from g2is_graph.knn import HnswIndex, HnswSettings, Neighbors, exact_topk, measure_recall
from g2is_graph.space import FeatureSpace, check_in_space, combined_features, open_stores, space_of
from g2is_graph.store import FeatureStore, StoreError

STATE_FORMAT = "g2is-graph-state-v2"  # v2: exact float64 edge weights, ties by id
# settings that shape the edges: a state built with other values cannot be extended
SHAPING = ("k", "exact", "m", "ef_construction", "ef", "ef_negative", "negative_candidates", "similar_candidates",
           "index_dim", "seed")


@dataclass
class BuildResult:
    space_id: str
    state_dir: Path
    n_nodes: int
    n_new: int
    n_duplicates: int
    n_changed: int
    recall: dict[str, float] | None
    seconds: dict[str, float] = field(default_factory=dict)
    write_rates: dict[str, float] = field(default_factory=dict)
    up_to_date: bool = False
    n_validation: int = 0
    n_dots: int = 0  # nodes given dot products with the validation vectors

    def summary(self) -> str:
        if self.up_to_date:
            return f"graph {self.space_id} is up to date: {self.n_nodes} samples (nothing written)"
        parts = [f"graph {self.space_id}: {self.n_nodes} samples ({self.n_new} new, {self.n_duplicates} "
                 f"duplicate content skipped), {self.n_changed} nodes' edges written"]
        if self.recall:
            conflict = self.recall["conflict"]
            parts.append(f"recall vs exact on {self.recall['sample']} nodes: SIMILAR {self.recall['similar']:.3f}, "
                         f"CONFLICT {'n/a (no negative cosine in the sample)' if conflict is None else f'{conflict:.3f}'}")
        if self.write_rates:
            parts.append(", ".join(f"{k} {v:,.0f}/s" for k, v in self.write_rates.items()))
        if self.n_validation:
            parts.append(f"{self.n_validation} validation examples")
        if self.n_dots:
            parts.append(f"validation dot products for {self.n_dots} nodes")
        return "; ".join(parts)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class GraphState:
    """What has been computed for one graph, on disk."""

    def __init__(self, directory: Path, data: dict[str, Any]):
        self.dir = directory
        self.data = data
        self._vectors: tuple[int, np.ndarray] | None = None  # (segments loaded, their vectors)

    @classmethod
    def open(cls, directory: str | Path, space: FeatureSpace, config: GraphConfig) -> "GraphState":
        directory = Path(directory)
        path = directory / "state.json"
        shaping = {name: getattr(config, name) for name in SHAPING}
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            return cls(directory, {"format": STATE_FORMAT, "space": space.describe(), "settings": shaping,
                                   "segments": [], "ids": [], "content_hashes": [], "build": 0,
                                   "pending": {"nodes": [], "edges": []}})
        data = json.loads(path.read_text())
        if data.get("format") != STATE_FORMAT:
            if str(data.get("format", "")).startswith("g2is-graph-state-"):
                raise StoreError(f"{path}: a graph state of format {data['format']} (an older g2is, whose edge "
                                 f"weights depend on the batching); build into a new --state directory")
            raise StoreError(f"{path}: not a g2is graph state")
        if data["space"]["id"] != space.id:
            raise StoreError(f"{path}: this graph was built in feature space {data['space']['id']}, the stores are in "
                             f"{space.id} (another model, checkpoint or projector); use another --state directory")
        saved = data["settings"]
        changed = [k for k, v in shaping.items() if saved.get(k) != v]
        if changed:
            was = ", ".join(f"{k}={saved.get(k)}" for k in changed)
            raise StoreError(f"{path}: built with different {', '.join(changed)} ({was}); "
                             "use the same settings or another --state directory")
        return cls(directory, data)

    @property
    def n(self) -> int:
        return len(self.data["ids"])

    def save(self) -> None:
        _atomic_json(self.dir / "state.json", self.data)

    def neighbors(self) -> Neighbors | None:
        path = self.dir / f"neighbors-{self.data['build']}.npz"
        return Neighbors.load(path) if self.data["build"] and path.exists() else None

    def vectors(self) -> np.ndarray:
        """Every node's vector in node order, from the segments' stores (checksums verified); read once per
        build, since computing the neighbours and writing the nodes both need them."""
        if self._vectors is not None and self._vectors[0] == len(self.data["segments"]):
            return self._vectors[1]
        parts = []
        for segment in self.data["segments"]:
            stores = open_stores(segment["stores"])
            if stores[0].meta["records_sha256"] != segment["records_sha256"]:
                raise StoreError(f"{segment['stores'][0]}: the store changed since it was added to the graph")
            parts.append(combined_features(stores, self.data["space"]["weights"])[segment["taken"]])
        dim = self.data["space"]["dim"]
        vectors = np.concatenate(parts) if parts else np.empty((0, dim), dtype=np.float32)
        self._vectors = (len(self.data["segments"]), vectors)
        return vectors


def _merge_lists(idx_a, w_a, idx_b, w_b, k: int, descending: bool, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best k of two lists of exact cosines, ties by key, as one search over both would rank them."""
    idx = np.concatenate([idx_a, idx_b], axis=1)
    w = np.concatenate([w_a, w_b], axis=1)
    order = np.lexsort((keys[idx], -w if descending else w), axis=-1)[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(w, order, 1)


def id_keys(ids: Sequence[str]) -> np.ndarray:
    """Each row's rank among the ids: equal cosines are ordered by id, whatever order the rows came in."""
    keys = np.empty(len(ids), dtype=np.int64)
    keys[np.argsort(np.asarray(ids, dtype=object), kind="stable")] = np.arange(len(ids))
    return keys


def _hnsw(config: GraphConfig) -> HnswSettings:
    return HnswSettings(M=config.m, ef_construction=config.ef_construction, ef=config.ef,
                        ef_negative=config.ef_negative, negative_candidates=config.negative_candidates,
                        similar_candidates=config.similar_candidates, index_dim=config.index_dim,
                        threads=config.threads, seed=config.seed)


def compute_neighbors(old: Neighbors | None, vectors: np.ndarray, n_old: int, config: GraphConfig,
                      index: HnswIndex | None, keys: np.ndarray) -> tuple[Neighbors, HnswIndex | None, np.ndarray]:
    """Lists for all nodes after adding rows [n_old, N); returns them, the index and the changed rows.
    `keys` orders rows of equal cosine (`id_keys`)."""
    n = len(vectors)
    k = min(config.k, n - 1)
    new_rows = np.arange(n_old, n)
    if old is None or old.similar_index.shape[1] < k:  # first build, or k was capped by a tiny graph
        if config.exact:
            lists = exact_topk(vectors, vectors, k, exclude=np.arange(n), device=config.device, keys=keys)
        else:
            index = HnswIndex.build(vectors, _hnsw(config))
            lists = index.query(vectors, vectors, np.arange(n), k, keys)
        return lists, index, np.arange(n)
    newcomers = vectors[n_old:]
    if config.exact:
        fresh = exact_topk(newcomers, vectors, k, exclude=new_rows, device=config.device, keys=keys)
        among_new = exact_topk(vectors[:n_old], newcomers, min(k, len(newcomers)), device=config.device,
                               keys=keys[n_old:])
    else:
        index.add(newcomers, n_old)
        fresh = index.query(newcomers, vectors, new_rows, k, keys)
        scratch = HnswIndex.build(newcomers, _hnsw(config))
        among_new = scratch.query(vectors[:n_old], newcomers, None, k, keys[n_old:])
    sim_i, sim_w = _merge_lists(old.similar_index, old.similar_weight, among_new.similar_index + n_old,
                                among_new.similar_weight, k, True, keys)
    con_i, con_w = _merge_lists(old.conflict_index, old.conflict_weight, among_new.conflict_index + n_old,
                                among_new.conflict_weight, k, False, keys)
    changed = np.where((sim_i != old.similar_index).any(1) | (con_i != old.conflict_index).any(1))[0]
    lists = Neighbors(np.concatenate([sim_i, fresh.similar_index]), np.concatenate([sim_w, fresh.similar_weight]),
                      np.concatenate([con_i, fresh.conflict_index]), np.concatenate([con_w, fresh.conflict_weight]))
    return lists, index, np.concatenate([changed, new_rows])


def _node_rows(state: GraphState, vectors: np.ndarray, rows: Sequence[int]) -> Iterator[dict[str, Any]]:
    """Node properties, one row at a time (a node's vector as a Python list is ~75 bytes per float)."""
    meta_rows = []
    for segment in state.data["segments"]:
        store_rows = FeatureStore(segment["stores"][0]).rows()  # the row map only: no chunk is read
        meta_rows.extend(store_rows[i] for i in segment["taken"])
    keep = ("id", "source_file", "line", "dataset", "content_hash", "n_tokens", "n_loss_tokens", "preview")
    for r in rows:
        yield {**{key: meta_rows[r].get(key) for key in keep}, "row": int(r), "gradient": vectors[r].tolist(),
               "gradient_f32": vectors[r].astype("<f4").tobytes()}


def _edge_rows(ids: Sequence[str], index: np.ndarray, weight: np.ndarray, rows: Sequence[int],
               negative_only: bool = False):
    """Sync rows; CONFLICT keeps only truly negative cosines (a tiny or one-cluster graph has fewer than k)."""
    for r in rows:
        keep = weight[r] < 0 if negative_only else np.ones(len(weight[r]), dtype=bool)
        yield {"source": ids[r], "targets": [ids[j] for j in index[r][keep]],
               "weights": [float(w) for w in weight[r][keep]]}


def _timed_write(graph: Graph, name: str, rows, total: int, batch: int, unit: str, progress: bool,
                 **params) -> float:
    started = time.perf_counter()
    with tqdm(total=total, unit=unit, desc=f"write {name}", disable=not progress) as bar:
        graph.write_rows(name, rows, batch, bar, **params)
    return time.perf_counter() - started


def check_graph_space(graph: Graph, space: FeatureSpace) -> dict[str, Any] | None:
    """The database's :FeatureSpace record if it is this space; refuse a database holding another."""
    found = graph.read("feature_space")
    others = [f for f in found if f["id"] != space.id]
    if others:
        raise GraphError(f"the database holds feature space {others[0]['id']}, not {space.id}: features from "
                         "another model, checkpoint or projector cannot share a graph; use another database "
                         "or `g2is db reset`")
    return found[0] if found else None


def graph_content_hashes(state_dir: str | Path) -> frozenset[str]:
    """Content already in a graph (for featurising only unseen records); empty for a new graph."""
    path = Path(state_dir) / "state.json"
    return frozenset(json.loads(path.read_text())["content_hashes"]) if path.exists() else frozenset()


def build_graph(graph: Graph, train_stores: Sequence[str | Path], config: GraphConfig,
                state_dir: str | Path | None = None, validation_stores: Sequence[str | Path] = (),
                echo=print, progress: bool = True) -> BuildResult:
    """Add the stores' examples to the graph (first build or incremental) and write what changed."""
    config.validate()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    stores = open_stores(train_stores)
    space = space_of(stores)
    state_dir = Path(state_dir) if state_dir else stores[0].path.parent / "graph"
    state = GraphState.open(state_dir, space, config)
    graph.init_schema()
    recorded = check_graph_space(graph, space)

    segment_key = [str(s.path.resolve()) for s in stores]
    known = {tuple(seg["stores"]) for seg in state.data["segments"]}
    n_new = n_duplicates = 0
    if tuple(segment_key) not in known:
        n_new, n_duplicates = _add_segment(state, stores, segment_key, config, timings, echo)
    timings["compute"] = time.perf_counter() - started

    result = BuildResult(space.id, state_dir, state.n, n_new, n_duplicates, 0, state.data.get("recall"), timings)
    in_sync = recorded is not None and recorded.get("build") == state.data["build"] and recorded.get("status") == "complete"
    if not in_sync:
        _write(graph, state, space, recorded, config, result, progress)
    if validation_stores:
        result.n_validation = write_validation(graph, space, validation_stores, config, progress)
    t0 = time.perf_counter()
    result.n_dots = write_validation_dots(graph, state, space, config, progress)
    if result.n_dots:
        result.seconds["validation_dots"] = time.perf_counter() - t0
    result.up_to_date = in_sync and not validation_stores and not result.n_dots
    return result


def _add_segment(state: GraphState, stores, segment_key: list[str], config: GraphConfig,
                 timings: dict[str, float], echo) -> tuple[int, int]:
    rows = stores[0].rows()
    seen = set(state.data["content_hashes"])
    known_ids = set(state.data["ids"])
    taken, duplicates = [], 0
    for i, row in enumerate(rows):
        if row["content_hash"] in seen:
            duplicates += 1
            continue
        if row["id"] in known_ids:
            raise StoreError(f"{row['source_file']}:{row['line']}: id {row['id']!r} is already in the graph with "
                             "different content; give the new record another id")
        seen.add(row["content_hash"])
        known_ids.add(row["id"])
        taken.append(i)
    if not taken:
        echo(f"{len(rows)} examples, all already in the graph: nothing to add")
        return 0, duplicates
    t0 = time.perf_counter()
    n_old = state.n
    old = state.neighbors()
    state.data["segments"].append({"stores": segment_key, "records_sha256": stores[0].meta["records_sha256"],
                                   "taken": taken})
    vectors = state.vectors()
    timings["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = None
    if not config.exact and n_old:
        index = HnswIndex.load(state.dir / "index.bin", vectors.shape[1], _hnsw(config), len(vectors))
    keys = id_keys(state.data["ids"] + [rows[i]["id"] for i in taken])
    lists, index, changed = compute_neighbors(old, vectors, n_old, config, index, keys)
    timings["neighbors"] = time.perf_counter() - t0
    if not config.exact:
        t0 = time.perf_counter()
        state.data["recall"] = measure_recall(vectors, lists, config.recall_sample, config.seed, config.device)
        timings["recall"] = time.perf_counter() - t0
        index.save(state.dir / "index.bin")
    else:
        state.data["recall"] = None
    previous = state.data["build"]
    state.data["build"] = previous + 1
    lists.save(state.dir / f"neighbors-{state.data['build']}.npz")
    state.data["ids"] += [rows[i]["id"] for i in taken]
    state.data["content_hashes"] += [rows[i]["content_hash"] for i in taken]
    state.data["pending"] = {"after_build": previous, "nodes": list(range(n_old, state.n)),
                             "edges": [int(r) for r in changed]}
    state.save()
    stale = state.dir / f"neighbors-{previous}.npz"
    if stale.exists():
        stale.unlink()
    return len(taken), duplicates


def _write(graph: Graph, state: GraphState, space: FeatureSpace, recorded: dict[str, Any] | None,
           config: GraphConfig, result: BuildResult, progress: bool) -> None:
    """Write nodes then edges: only what changed when the database holds the previous build, else all."""
    pending = state.data["pending"]
    incremental = recorded is not None and recorded.get("build") == pending.get("after_build")
    nodes = pending["nodes"] if incremental else list(range(state.n))
    edges = pending["edges"] if incremental else list(range(state.n))
    graph.write("merge_feature_space", props=space.node_properties() | {"build": recorded and recorded.get("build")},
                status="writing")
    lists = state.neighbors()
    vectors = state.vectors()
    ids = state.data["ids"]
    t_nodes = _timed_write(graph, "upsert_samples", _node_rows(state, vectors, nodes), len(nodes),
                           config.node_batch, "node", progress, space=space.id)
    k = lists.similar_index.shape[1]
    t_sim = _timed_write(graph, "sync_similar", _edge_rows(ids, lists.similar_index, lists.similar_weight, edges),
                         len(edges), config.edge_batch, "node", progress)
    t_con = _timed_write(graph, "sync_conflict", _edge_rows(ids, lists.conflict_index, lists.conflict_weight, edges, True),
                         len(edges), config.edge_batch, "node", progress)
    graph.write("merge_feature_space", props=space.node_properties() | {
        "build": state.data["build"], "n_samples": state.n, "k": k, "exact": config.exact,
        "config": json.dumps(to_jsonable(config), sort_keys=True),
        "recall_similar": (state.data.get("recall") or {}).get("similar"),
        "recall_conflict": (state.data.get("recall") or {}).get("conflict"),
        "pool_cosines": json.dumps(pool_cosine_stats(vectors, seed=config.seed))}, status="complete")
    result.n_changed = len(edges)
    result.seconds.update(write_nodes=t_nodes, write_similar=t_sim, write_conflict=t_con)
    if nodes and t_nodes > 0:
        result.write_rates["nodes"] = len(nodes) / t_nodes
    if edges and (t_sim + t_con) > 0:
        n_conflict = int((lists.conflict_weight[edges] < 0).sum())
        result.write_rates["relationships"] = (k * len(edges) + n_conflict) / (t_sim + t_con)


def write_validation(graph: Graph, space: FeatureSpace, validation_stores: Sequence[str | Path],
                     config: GraphConfig, progress: bool) -> int:
    """:Validation nodes (plain gradients of the same checkpoints, combined with the same weights)."""
    stores = open_stores(validation_stores)
    check_in_space(space, stores, "validation")
    if stores[0].meta["gradient"].get("kind") == "adam":
        raise StoreError(f"{stores[0].path}: validation features must be plain (sgd) gradients, not Adam features")
    vectors = combined_features(stores, space.weights)
    rows = stores[0].rows()
    payload = [{"id": r["id"], "task": r.get("task") or r.get("dataset") or "default", "subtask": r.get("subtask"),
                "dataset": r.get("dataset"), "source_file": r["source_file"], "line": r["line"],
                "content_hash": r["content_hash"], "preview": r.get("preview"), "gradient": vectors[i].tolist(),
                "gradient_f32": vectors[i].astype("<f4").tobytes()}
               for i, r in enumerate(rows)]
    _timed_write(graph, "upsert_validation", iter(payload), len(payload), config.node_batch, "example", progress,
                 space=space.id)
    return len(payload)


def write_validation_dots(graph: Graph, state: GraphState, space: FeatureSpace, config: GraphConfig,
                          progress: bool, chunk: int = 4096) -> int:
    """Each node's dot products with every validation vector, for the nodes that lack current ones.

    The walk's anchor and fallback ranking needs cos(z, K) of every node for every component; the
    components lie in the validation span, so these m numbers per node replace reading d floats (the
    walk checks the span and says when it cannot use them). Returns how many nodes were written."""
    validation, key = validation_basis(graph.read, space.id)
    if validation is None:
        return 0  # the walk scans vectors and says why
    (missing,) = graph.read("validation_dots_missing", space=space.id, key=key)
    if not missing["ids"]:
        return 0
    row_of = {node_id: row for row, node_id in enumerate(state.data["ids"])}
    unknown = [node_id for node_id in missing["ids"] if node_id not in row_of]
    if unknown:
        raise GraphError(f"node {unknown[0]} (and {len(unknown) - 1} more) is in the database but not in the graph "
                         f"state {state.dir}; build with the state directory this graph was built with")
    rows = sorted(row_of[node_id] for node_id in missing["ids"])
    vectors = state.vectors()
    basis = validation.astype(np.float64).T
    ids = state.data["ids"]

    def payload():
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            dots = vectors[part].astype(np.float64) @ basis
            for r, row_dots in zip(part, dots):
                yield {"id": ids[r], "dots": row_dots.astype("<f8").tobytes()}

    _timed_write(graph, "set_validation_dots", payload(), len(rows), config.edge_batch, "node", progress, key=key)
    return len(rows)

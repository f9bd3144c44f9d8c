"""The graph job: feature stores -> :Sample nodes with their vectors, SIMILAR and CONFLICT edges in Neo4j.

A build computes, then writes. Its state lives in a directory next to the stores (default
`<stores' parent>/graph`):
    state.json      the graph's id, feature space, settings, the segments (input stores) consumed, the
                    node ids, the build number and what the next write must cover; written last (the
                    commit point of a build's computation)
    index-B.bin     the hnswlib index over every node of build B (extended by incremental ingests)
    neighbors-B.npz each node's SIMILAR and CONFLICT lists of build B (row indices and raw cosines)
    lock            held (flock) by the one process that may change this directory

A large first build into an empty database of the project-managed server is written by Neo4j's offline
importer instead (`import_write`: CSV files, the server restarted); everything else goes through
transactions. Writes are MERGEs (nodes by id; edges by syncing each source's list exactly), so any write can be
repeated: an interrupted build, or one whose server died, is re-run and ends in the same graph. One
writer at a time: the state directory's lock, and the graph's write lock in the database (a :GraphLock
node with a heartbeat). What the database holds is checked on every build, never assumed: the
:FeatureSpace node names the state (id, directory, build) last written completely, and the nodes, their
rows and the edge counts must match that state before a build is called up to date; a database written
from another state directory is refused with its name, never silently left as it is.
A later segment adds only unseen content (by content hash), and updates the lists of existing nodes
that newcomers displace; in exact mode A then B gives exactly the graph of A+B.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from g2is_graph.config import GraphConfig, ProjectorConfig, to_jsonable
from g2is_graph.db.graph import Graph, GraphError, validation_basis, validation_key
from g2is_graph.db.server import LocalServer
from g2is_graph.errors import hinted
from g2is_graph.files import atomic_write_json
from g2is_graph.locks import DatabaseLock, FileLock
from g2is_graph.neighbors.knn import HnswIndex, Neighbors, exact_topk, ivf_neighbors, measure_recall
from g2is_graph.neighbors.ranks import RankedSearch
from g2is_graph.provenance import check_saved, provenance
from g2is_graph.selection.diagnostics import pool_cosine_stats
from g2is_graph.store.features import FeatureStore, StoreError
from g2is_graph.store.space import (
    FeatureSpace,
    check_in_space,
    combined_features,
    open_stores,
    projector_config,
    space_of,
)

# recall below which a build says its approximate lists are not to be trusted (the goals of issue 19)
RECALL_GOALS = {"SIMILAR": 0.95, "CONFLICT": 0.90}
STATE_FORMAT = "g2is-graph-state-v2"  # v2: exact float64 edge weights, ties by id
# settings that shape the edges: a state built with other values cannot be extended
SHAPING = ("k", "exact", "index", "ivf_cells", "ivf_probe", "m", "ef_construction", "ef", "ef_negative", "negative_candidates", "similar_candidates",
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
    import_summary: str = ""  # neo4j-admin's summary when the write went through the offline importer

    def summary(self) -> str:
        if self.up_to_date:
            return f"graph {self.space_id} is up to date: {self.n_nodes} samples (nothing written)"
        parts = [f"graph {self.space_id}: {self.n_nodes} samples ({self.n_new} new, {self.n_duplicates} "
                 f"duplicate content skipped), {self.n_changed} nodes' edges written"]
        if self.recall:
            conflict = self.recall["conflict"]
            parts.append(f"recall vs exact on {self.recall['sample']} nodes: SIMILAR {self.recall['similar']:.3f}, "
                         f"CONFLICT {'n/a (no negative cosine in the sample)' if conflict is None else f'{conflict:.3f}'}")
            low = [f"{name} {value:.3f} < {RECALL_GOALS[name]}" for name, value
                   in (("SIMILAR", self.recall["similar"]), ("CONFLICT", conflict))
                   if value is not None and value < RECALL_GOALS[name]]
            if low:
                parts.append(f"warning: approximate search recall {', '.join(low)} (real gradient features: "
                             "docs/benchmarks.md); set [graph] exact = true, or index = \"ivf\" (with ivf_probe = 12 "
                             "if CONFLICT stays low) and rebuild")
        if self.write_rates:
            parts.append(", ".join(f"{k} {v:,.0f}/s" for k, v in self.write_rates.items()))
        if self.n_validation:
            parts.append(f"{self.n_validation} validation examples")
        if self.n_dots:
            parts.append(f"validation dot products for {self.n_dots} nodes")
        return "; ".join(parts)


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
            return cls(directory, {"format": STATE_FORMAT, "graph_id": uuid.uuid4().hex, "provenance": provenance(),
                                   "space": space.describe(),
                                   "settings": shaping, "segments": [], "ids": [], "content_hashes": [], "build": 0,
                                   "pending": {"nodes": [], "edges": []}})
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: corrupted ({type(exc).__name__}): not a g2is graph state") from exc
        if data.get("format") != STATE_FORMAT:
            if str(data.get("format", "")).startswith("g2is-graph-state-"):
                raise StoreError(f"{path}: a graph state of format {data['format']} (an older g2is, whose edge "
                                 f"weights depend on the batching); build into a new --state directory")
            raise StoreError(f"{path}: not a g2is graph state")
        if data["space"]["id"] != space.id:
            raise StoreError(f"{path}: this graph was built in feature space {data['space']['id']}, the stores are in "
                             f"{space.id} (another model, checkpoint or projector); use another --state directory")
        check_saved(data["settings"], shaping, list(shaping), path, "graph build", StoreError)
        state = cls(directory, data)
        if "graph_id" not in data:  # a state from before graphs had ids: give it one for good
            data["graph_id"] = uuid.uuid4().hex
            state.save()
        return state

    @property
    def n(self) -> int:
        return len(self.data["ids"])

    @property
    def graph_id(self) -> str:
        return self.data["graph_id"]

    def save(self) -> None:
        atomic_write_json(self.dir / "state.json", self.data, indent=1, sort_keys=True)

    def neighbors(self) -> Neighbors | None:
        path = self.dir / f"neighbors-{self.data['build']}.npz"
        return Neighbors.load(path) if self.data["build"] and path.exists() else None

    def index_path(self, build: int) -> Path:
        """The hnswlib index of one build: written before state.json names that build, so a kill in between
        leaves the previous build's index untouched for the re-run."""
        return self.dir / f"index-{build}.bin"

    def load_index(self, vectors: np.ndarray, config: GraphConfig, capacity: int, echo) -> HnswIndex:
        """The index of the current build over `vectors` (every node so far); rebuilt from them when its
        file is missing or holds another number of items than the state lists."""
        for path in (self.index_path(self.data["build"]), self.dir / "index.bin"):  # index.bin: older g2is
            if path.exists():
                index = HnswIndex.load(path, vectors.shape[1], config, capacity)
                if index.count == len(vectors):
                    return index
        echo(f"rebuilding the hnswlib index of {self.dir} from its {len(vectors)} vectors (its index file is "
             "missing or out of step with state.json)")
        return HnswIndex.build(vectors, config, capacity)

    def vectors(self) -> np.ndarray:
        """Every node's vector in node order, from the segments' stores (checksums verified); read once per
        build, since computing the neighbours and writing the nodes both need them."""
        if self._vectors is not None and self._vectors[0] == len(self.data["segments"]):
            return self._vectors[1]
        segments = self.data["segments"]
        vectors = np.empty((sum(len(s["taken"]) for s in segments), self.data["space"]["dim"]), dtype=np.float32)
        filled = 0
        for segment in segments:
            stores = open_stores(segment["stores"])
            if stores[0].meta["records_sha256"] != segment["records_sha256"]:
                raise StoreError(f"{segment['stores'][0]}: the store changed since it was added to the graph")
            taken = segment["taken"]
            combined_features(stores, self.data["space"]["weights"], taken, vectors[filled:filled + len(taken)])
            filled += len(taken)
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




def compute_neighbors(old: Neighbors | None, vectors: np.ndarray, n_old: int, config: GraphConfig,
                      index: HnswIndex | None, keys: np.ndarray, search: RankedSearch | None = None
                      ) -> tuple[Neighbors, HnswIndex | None, np.ndarray]:
    """Lists for all nodes after adding rows [n_old, N); returns them, the index and the changed rows.
    `keys` orders rows of equal cosine (`id_keys`); `search` spreads exact search over a launched job's ranks."""

    def exact(queries, base, k, exclude=None, keys=None):
        if search is not None:
            return search.exact_topk(queries, base, k, exclude, keys)
        return exact_topk(queries, base, k, exclude=exclude, device=config.device, keys=keys)

    n = len(vectors)
    k = min(config.k, n - 1)
    new_rows = np.arange(n_old, n)
    if old is None or old.similar_index.shape[1] < k:  # first build, or k was capped by a tiny graph
        if config.exact:
            lists = exact(vectors, vectors, k, exclude=np.arange(n), keys=keys)
        elif config.index == "ivf":
            lists = ivf_neighbors(vectors, vectors, np.arange(n), k, config, keys)
        else:
            index = HnswIndex.build(vectors, config)
            lists = index.query(vectors, vectors, np.arange(n), k, keys)
        return lists, index, np.arange(n)
    newcomers = vectors[n_old:]
    if config.exact:
        fresh = exact(newcomers, vectors, k, exclude=new_rows, keys=keys)
        among_new = exact(vectors[:n_old], newcomers, min(k, len(newcomers)), keys=keys[n_old:])
    elif config.index == "ivf":
        fresh = ivf_neighbors(newcomers, vectors, new_rows, k, config, keys)
        among_new = ivf_neighbors(vectors[:n_old], newcomers, None, min(k, len(newcomers)), config, keys[n_old:])
    else:
        index.add(newcomers, n_old)
        fresh = index.query(newcomers, vectors, new_rows, k, keys)
        scratch = HnswIndex.build(newcomers, config)
        among_new = scratch.query(vectors[:n_old], newcomers, None, k, keys[n_old:])
    sim_i, sim_w = _merge_lists(old.similar_index, old.similar_weight, among_new.similar_index + n_old,
                                among_new.similar_weight, k, True, keys)
    con_i, con_w = _merge_lists(old.conflict_index, old.conflict_weight, among_new.conflict_index + n_old,
                                among_new.conflict_weight, k, False, keys)
    changed = np.where((sim_i != old.similar_index).any(1) | (con_i != old.conflict_index).any(1))[0]
    lists = Neighbors(np.concatenate([sim_i, fresh.similar_index]), np.concatenate([sim_w, fresh.similar_weight]),
                      np.concatenate([con_i, fresh.conflict_index]), np.concatenate([con_w, fresh.conflict_weight]))
    return lists, index, np.concatenate([changed, new_rows])


def _sorted_pick(items: Iterable[Any], positions: Iterable[int]) -> Iterator[Any]:
    """The items at `positions` (sorted), in order, without holding the others."""
    wanted = iter(positions)
    want = next(wanted, None)
    for i, item in enumerate(items):
        if want is None:
            return
        if i == want:
            yield item
            want = next(wanted, None)


def _meta_rows(state: GraphState, wanted: Sequence[int] | None = None) -> Iterator[dict[str, Any]]:
    """The record rows (id, source, line, ...) of the nodes `wanted` (sorted; default all), in node order,
    streamed from the stores' row maps (no chunk is read, and a million rows are never all held)."""
    every = (row for segment in state.data["segments"]
             for row in _sorted_pick(FeatureStore(segment["stores"][0]).iter_rows(), segment["taken"]))
    return every if wanted is None else _sorted_pick(every, wanted)


def _node_rows(state: GraphState, vectors: np.ndarray, rows: Sequence[int]) -> Iterator[dict[str, Any]]:
    """Node properties, one row at a time (the vector once, as float32 bytes)."""
    rows = sorted(int(r) for r in rows)
    keep = ("id", "source_file", "line", "dataset", "content_hash", "n_tokens", "n_loss_tokens", "preview")
    for r, meta in zip(rows, _meta_rows(state, rows)):
        yield {**{key: meta.get(key) for key in keep}, "row": r, "gradient_f32": vectors[r].astype("<f4").tobytes()}


def _edge_rows(ids: Sequence[str], index: np.ndarray, weight: np.ndarray, rows: Sequence[int],
               negative_only: bool = False):
    """Sync rows; CONFLICT keeps only truly negative cosines (a tiny or one-cluster graph has fewer than k),
    without weights (its edges carry none)."""
    for r in rows:
        keep = weight[r] < 0 if negative_only else np.ones(len(weight[r]), dtype=bool)
        row = {"source": ids[r], "targets": [ids[j] for j in index[r][keep]]}
        if not negative_only:
            row["weights"] = [float(w) for w in weight[r][keep]]
        yield row


def _timed_write(graph: Graph, name: str, rows, total: int, batch: int, unit: str, progress: bool,
                 **params) -> float:
    started = time.perf_counter()
    with tqdm(total=total, unit=unit, desc=f"write {name}", disable=not progress) as bar:
        graph.write_rows(name, rows, batch, bar, **params)
    return time.perf_counter() - started


def check_graph_space(graph: Graph, space_id: str) -> dict[str, Any] | None:
    """The database's :FeatureSpace record if it is this space; refuse a database holding another."""
    found = graph.read("feature_space")
    others = [f for f in found if f["id"] != space_id]
    if others:
        raise hinted(GraphError(f"the database holds feature space {others[0]['id']}, not {space_id}: features "
                                "from another model, checkpoint or projector cannot share a graph"),
                     "use another database (NEO4J_URI / NEO4J_DATABASE), or `g2is db reset` to empty this one")
    return found[0] if found else None


def graph_projector(state_dir: str | Path) -> ProjectorConfig | None:
    """The projector a graph's features were made with (None for a new graph), so that new records are
    featurised into the same space whatever the current default projector is."""
    path = Path(state_dir) / "state.json"
    return projector_config(json.loads(path.read_text())["space"], path) if path.exists() else None


def graph_content_hashes(state_dir: str | Path) -> frozenset[str]:
    """Content already in a graph (for featurising only unseen records); empty for a new graph."""
    path = Path(state_dir) / "state.json"
    return frozenset(json.loads(path.read_text())["content_hashes"]) if path.exists() else frozenset()


@contextmanager
def write_locks(graph: Graph, state_dir: Path, config: GraphConfig, echo) -> Iterator[DatabaseLock]:
    """One writer per state directory and per graph: a second build or ingest waits up to lock_wait_s for
    the first, then is refused with the holder's name."""
    with FileLock(state_dir / "lock", f"the graph state directory {state_dir}").acquire(config.lock_wait_s, echo):
        with DatabaseLock(graph, "the graph", config.lock_stale_s, config.heartbeat_s).acquire(
                config.lock_wait_s, echo) as lock:
            yield lock


def build_graph(graph: Graph, train_stores: Sequence[str | Path], config: GraphConfig,
                state_dir: str | Path | None = None, validation_stores: Sequence[str | Path] = (),
                echo=print, progress: bool = True, server: LocalServer | None = None,
                search: RankedSearch | None = None) -> BuildResult:
    """Add the stores' examples to the graph (first build or incremental) and write what the database lacks.
    `server`: the project-managed server `graph` is connected to, which a large first build into an empty
    database replaces offline (`neo4j-admin database import`); None for a server reached by URI. `search`:
    exact search spread over the ranks of a launched job (neighbors/ranks.py)."""
    stores = open_stores(train_stores)
    space = space_of(stores)
    state_dir = Path(state_dir) if state_dir else stores[0].path.parent / "graph"
    with write_locks(graph, state_dir, config, echo) as lock:
        return _build_locked(graph, stores, space, config, state_dir, validation_stores, lock, echo, progress, server,
                             search)


def _build_locked(graph: Graph, stores: list[FeatureStore], space: FeatureSpace, config: GraphConfig, state_dir: Path,
                  validation_stores: Sequence[str | Path], lock: DatabaseLock, echo, progress: bool,
                  server: LocalServer | None = None, search: RankedSearch | None = None) -> BuildResult:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    state = GraphState.open(state_dir, space, config)
    graph.init_schema()
    recorded = check_graph_space(graph, space.id)
    census = refuse_foreign_graph(graph, state.dir, state.graph_id, state.data["ids"], space.id, recorded,
                                  incoming=lambda: (row["id"] for row in stores[0].iter_rows()))

    segment_key = [str(s.path.resolve()) for s in stores]
    known = {tuple(seg["stores"]) for seg in state.data["segments"]}
    n_new = n_duplicates = 0
    if tuple(segment_key) not in known:
        n_new, n_duplicates = _add_segment(state, stores, segment_key, config, timings, echo, search)
    timings["compute"] = time.perf_counter() - started

    result = BuildResult(space.id, state_dir, state.n, n_new, n_duplicates, 0, state.data.get("recall"), timings)
    lists = state.neighbors()
    plan = plan_write(graph, state, space, recorded, lists, census)
    if plan is not None:
        if plan.reason:
            echo(f"writing all {state.n} nodes and their edges: {plan.reason}")
        why_not = bulk_import_refusal(graph, server, state, config, plan, recorded)
        if why_not is None:
            import_write(graph, server, state, space, config, result, lock, lists, validation_stores, echo, progress)
        else:
            if why_not:
                echo(f"writing {state.n} nodes through transactions: {why_not}")
            _write(graph, state, space, config, result, progress, lock, lists, plan)
        after = plan_write(graph, state, space, check_graph_space(graph, space.id), lists)
        if after is not None and plan.incremental:  # the previous build was damaged where this one left it alone
            echo(f"writing all {state.n} nodes and their edges: {after.reason}")
            _write(graph, state, space, config, result, progress, lock, lists, after)
            after = plan_write(graph, state, space, check_graph_space(graph, space.id), lists)
        if after is not None:
            raise GraphError(f"after writing every node of {state.dir}, {after.reason}: another process writes "
                             "to this database without the graph lock")
    if validation_stores:
        result.n_validation = write_validation(graph, space, validation_stores, config, progress)
    t0 = time.perf_counter()
    result.n_dots = write_validation_dots(graph, state, space, config, progress)
    if result.n_dots:
        result.seconds["validation_dots"] = time.perf_counter() - t0
    result.up_to_date = plan is None and not validation_stores and not result.n_dots
    return result


@dataclass(frozen=True)
class WritePlan:
    nodes: list[int]  # rows whose nodes are written
    edges: list[int]  # rows whose SIMILAR and CONFLICT lists are written
    reason: str  # why everything is written ("" for a first or incremental write)
    incremental: bool = False

    @classmethod
    def full(cls, n: int, reason: str) -> "WritePlan":
        return cls(list(range(n)), list(range(n)), reason)


def expected_edges(lists: Neighbors | None) -> tuple[int, int]:
    """SIMILAR and CONFLICT edges the lists make (CONFLICT only for negative cosines)."""
    if lists is None:
        return 0, 0
    return int(lists.similar_index.size), int((lists.conflict_weight < 0).sum())


def plan_write(graph: Graph, state: GraphState, space: FeatureSpace, recorded: dict[str, Any] | None,
               lists: Neighbors | None, census: dict[str, Any] | None = None) -> WritePlan | None:
    """What the database lacks of the state's graph (None: nothing), from what it holds now.

    Up to date only when the database names this state and build as completely written and holds exactly
    its nodes (ids' rows 0..n-1, no other) and its number of SIMILAR and CONFLICT edges. Incremental when it
    holds the previous build of this state (or an interrupted incremental write of this one); otherwise
    every node and list is written (the database holds a subset of the state's nodes: checked before)."""
    census = census or graph.read("space_census", space=space.id)[0]
    n = state.n
    pending = state.data["pending"]
    n_before = n - len(pending.get("nodes", []))

    def holds(count: int) -> bool:
        return census["n"] == census["rows"] == count and (
            count == 0 or (census["min_row"], census["max_row"]) == (0, count - 1))

    ours = recorded is not None and recorded.get("state_id") == state.graph_id
    if ours and recorded.get("status") == "complete" and recorded.get("build") == state.data["build"]:
        if holds(n) and (census["similar"], census["conflict"]) == expected_edges(lists):
            return None
        similar, conflict = expected_edges(lists)
        return WritePlan.full(n, f"the database lacks part of build {state.data['build']}: it holds {census['n']} of "
                                 f"{n} nodes ({census['rows']} distinct rows), {census['similar']} of {similar} SIMILAR "
                                 f"and {census['conflict']} of {conflict} CONFLICT edges")
    if ours and recorded.get("build") == pending.get("after_build") and (
            (recorded.get("status") == "complete" and holds(n_before))
            or (recorded.get("status") == "writing" and recorded.get("writing_build") == state.data["build"])):
        return WritePlan(pending["nodes"], pending["edges"], "", incremental=True)
    if recorded is None and census["n"] == 0:
        return WritePlan.full(n, "")
    if (recorded is not None and recorded.get("state_id") is None and recorded.get("status") == "complete"
            and recorded.get("build") == state.data["build"] and holds(n)
            and (census["similar"], census["conflict"]) == expected_edges(lists)
            and set(_database_ids(graph, space.id)) == set(state.data["ids"])):
        graph.write("claim_feature_space", id=space.id, state_id=state.graph_id, state_dir=str(state.dir.resolve()))
        return None  # written by an older g2is from this very state: adopted as it is
    was = "was not written completely" if recorded is None or recorded.get("status") != "complete" else \
        "was last written from another graph state" if not ours else "holds another build of this state"
    return WritePlan.full(n, f"the database {was} ({census['n']} of its nodes present)")


def _database_ids(graph: Graph, space_id: str) -> list[str]:
    return [r["id"] for r in graph.read("space_ids", space=space_id)]


def refuse_foreign_graph(graph: Graph, state_dir: Path, graph_id: str | None, state_ids: Sequence[str],
                         space_id: str, recorded: dict[str, Any] | None,
                         incoming: Callable[[], Iterable[str]] = tuple) -> dict[str, Any]:
    """Refuse a database that holds samples this state will not list (its `state_ids` and the `incoming`
    ones it is about to add): it holds a graph built from another state directory, and writing this state's
    lists over it would leave a graph neither state describes. Returns the census of what the database holds."""
    census = graph.read("space_census", space=space_id)[0]
    if census["foreign"]:
        raise hinted(GraphError(f"the database holds {census['foreign']} samples of another feature space"),
                     "use another database (NEO4J_URI / NEO4J_DATABASE), or `g2is db reset` to empty this one")
    ours = graph_id is not None and recorded is not None and recorded.get("state_id") == graph_id
    if census["n"] == 0 or (ours and census["n"] <= len(state_ids)):
        return census
    known = set(state_ids) | set(incoming())
    foreign = [i for i in _database_ids(graph, space_id) if i not in known]
    if not foreign:
        return census
    origin = "another graph state"
    if recorded is not None and recorded.get("state_dir"):
        origin = (f"the graph state {recorded['state_dir']} (build {recorded.get('build')}, "
                  f"{recorded.get('n_samples')} samples, status {recorded.get('status')})")
    raise hinted(GraphError(f"the database holds {len(foreign)} samples that the graph state {state_dir} does not list "
                            f"(e.g. {foreign[0]!r}): it was built from {origin}; nothing was written"),
                 "one database holds one graph: pass the --state directory it was built with, use another database "
                 "(NEO4J_URI / NEO4J_DATABASE), or `g2is db reset` to rebuild it from this state")


def check_state_against_database(graph: Graph, state_dir: str | Path) -> None:
    """Before featurising new records for a graph (ingest): refuse a database built from another state."""
    path = Path(state_dir) / "state.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    space_id = data.get("space", {}).get("id")
    found = graph.read("feature_space")
    if space_id is not None:
        recorded = check_graph_space(graph, space_id)
    else:
        recorded = found[0] if found else None
        space_id = recorded["id"] if recorded else None
    if space_id is not None:
        refuse_foreign_graph(graph, Path(state_dir), data.get("graph_id"), data.get("ids", []), space_id, recorded)


def _add_segment(state: GraphState, stores, segment_key: list[str], config: GraphConfig,
                 timings: dict[str, float], echo, search: RankedSearch | None = None) -> tuple[int, int]:
    seen = set(state.data["content_hashes"])
    known_ids = set(state.data["ids"])
    taken, new_ids, new_hashes, duplicates, n_rows = [], [], [], 0, 0
    for i, row in enumerate(stores[0].iter_rows()):  # streamed: a million row dicts would hold gigabytes
        n_rows += 1
        if row["content_hash"] in seen:
            duplicates += 1
            continue
        if row["id"] in known_ids:
            raise hinted(StoreError(f"{row['source_file']}:{row['line']}: id {row['id']!r} is already in the graph "
                                    "with different content"), "give the new record another id")
        seen.add(row["content_hash"])
        known_ids.add(row["id"])
        taken.append(i)
        new_ids.append(row["id"])
        new_hashes.append(row["content_hash"])
    del seen, known_ids
    if not taken:
        echo(f"{n_rows} examples, all already in the graph: nothing to add")
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
    if not config.exact and config.index == "hnsw" and n_old:
        index = state.load_index(vectors[:n_old], config, len(vectors), echo)
    keys = id_keys(state.data["ids"] + new_ids)
    lists, index, changed = compute_neighbors(old, vectors, n_old, config, index, keys, search)
    timings["neighbors"] = time.perf_counter() - t0
    previous = state.data["build"]
    build = previous + 1
    if not config.exact:
        t0 = time.perf_counter()
        state.data["recall"] = measure_recall(vectors, lists, config.recall_sample, config.seed, config.device)
        timings["recall"] = time.perf_counter() - t0
        if index is not None:  # hnswlib; the ivf cells are trained anew on each build
            index.save(state.index_path(build))
    else:
        state.data["recall"] = None
    lists.save(state.dir / f"neighbors-{build}.npz")
    state.data["build"] = build
    state.data["ids"] += new_ids
    state.data["content_hashes"] += new_hashes
    state.data["pending"] = {"after_build": previous, "nodes": list(range(n_old, state.n)),
                             "edges": [int(r) for r in changed]}
    state.save()  # the commit point: from here on the files of `build` are the state's
    for stale in (state.dir / f"neighbors-{previous}.npz", state.index_path(previous), state.dir / "index.bin"):
        stale.unlink(missing_ok=True)
    return len(taken), duplicates


def _write(graph: Graph, state: GraphState, space: FeatureSpace, config: GraphConfig, result: BuildResult,
           progress: bool, lock: DatabaseLock, lists: Neighbors, plan: WritePlan) -> None:
    """Write the plan's nodes then their edges; the space is `writing` (naming this state and build) until
    the last write marks it complete."""
    nodes, edges = plan.nodes, plan.edges
    recorded = check_graph_space(graph, space.id)
    previous_build = recorded.get("build") if recorded and recorded.get("state_id") == state.graph_id else None
    graph.write("merge_feature_space", props=space.node_properties() | {
        "build": previous_build, "state_id": state.graph_id, "state_dir": str(state.dir.resolve()),
        "writing_build": state.data["build"]}, status="writing")
    vectors = state.vectors()
    ids = state.data["ids"]
    t_nodes = _timed_write(graph, "upsert_samples", _node_rows(state, vectors, nodes), len(nodes),
                           config.node_batch, "node", progress, space=space.id)
    k = lists.similar_index.shape[1]
    t_sim = _timed_write(graph, "sync_similar", _edge_rows(ids, lists.similar_index, lists.similar_weight, edges),
                         len(edges), config.edge_batch, "node", progress)
    t_con = _timed_write(graph, "sync_conflict", _edge_rows(ids, lists.conflict_index, lists.conflict_weight, edges, True),
                         len(edges), config.edge_batch, "node", progress)
    lock.check()
    mark_complete(graph, state, space, config, k, vectors)
    result.n_changed = len(edges)
    result.seconds.update(write_nodes=t_nodes, write_similar=t_sim, write_conflict=t_con)
    if nodes and t_nodes > 0:
        result.write_rates["nodes"] = len(nodes) / t_nodes
    if edges and (t_sim + t_con) > 0:
        n_conflict = int((lists.conflict_weight[edges] < 0).sum())
        result.write_rates["relationships"] = (k * len(edges) + n_conflict) / (t_sim + t_con)


def mark_complete(graph: Graph, state: GraphState, space: FeatureSpace, config: GraphConfig, k: int,
                  vectors: np.ndarray) -> None:
    """The :FeatureSpace node names this state's build as completely written (the build's commit in the database)."""
    graph.write("merge_feature_space", props=space.node_properties() | {
        "build": state.data["build"], "n_samples": state.n, "k": k, "exact": config.exact,
        "state_id": state.graph_id, "state_dir": str(state.dir.resolve()), "writing_build": state.data["build"],
        "config": json.dumps(to_jsonable(config), sort_keys=True),
        "recall_similar": (state.data.get("recall") or {}).get("similar"),
        "recall_conflict": (state.data.get("recall") or {}).get("conflict"),
        "pool_cosines": json.dumps(pool_cosine_stats(vectors, seed=config.seed))}, status="complete")


def bulk_import_refusal(graph: Graph, server: LocalServer | None, state: GraphState, config: GraphConfig,
                        plan: WritePlan, recorded: dict[str, Any] | None) -> str | None:
    """None when this write goes through the offline importer: a first write of at least `bulk_import_from`
    nodes into an empty database of the project-managed server. Otherwise why not ("" when the rule does
    not ask for it: small or incremental writes)."""
    if not config.bulk_import_from or state.n < config.bulk_import_from or plan.incremental or plan.reason:
        return ""
    if server is None or server.status().uri != graph.uri:
        return ("the offline importer (neo4j-admin database import) runs only on the project-managed local "
                "server, and this database is reached by URI")
    others = graph.read("database_nodes")[0]["n"]
    if recorded is not None or others:
        return f"the database holds {others} other nodes, and the offline importer replaces a whole database"
    return None


def import_write(graph: Graph, server: LocalServer, state: GraphState, space: FeatureSpace, config: GraphConfig,
                 result: BuildResult, lock: DatabaseLock, lists: Neighbors, validation_stores: Sequence[str | Path],
                 echo, progress: bool, part_bytes: int = 64 * 2**20) -> None:
    """Every node and edge of the state through `neo4j-admin database import full`: CSV files in the
    state directory (written a group of rows at a time), the server stopped, the database replaced, the server
    started, the schema applied and the lock taken again, then the :FeatureSpace node marked complete.
    Killed before that mark, the database holds nodes but no complete build, and the re-run rewrites it
    through transactions (the importer only ever writes an empty database)."""
    from g2is_graph.db.bulk import WIDTH, byte_rows, edge_writer, null_bytes, repeated, sample_writer, write_edges

    files = state.dir / "import"
    files.mkdir(exist_ok=True)
    for stale in [*files.glob("*.csv"), *files.glob("*.parquet")]:  # parquet: left by the parquet importer
        stale.unlink()
    started = time.perf_counter()
    vectors = state.vectors()
    ids = np.asarray(state.data["ids"], dtype=object)
    meta = _meta_rows(state)
    dots_basis, dots_key = _import_validation_basis(space, validation_stores, vectors.shape[1])
    keep = ("source_file", "line", "dataset", "content_hash", "n_tokens", "n_loss_tokens", "preview")
    # rows per part from a text budget: a row's vector is 4 d bytes written as WIDTH characters each, and a
    # part's text exists about three times over (the lookup, arrow's column, the CSV writer's); 20k rows a
    # part held 1.2 GB at 1024 dims (issue 19)
    chunk = max(64, part_bytes // (WIDTH * vectors.dtype.itemsize * vectors.shape[1]))
    parts = [np.arange(i, min(i + chunk, state.n)) for i in range(0, state.n, chunk)]
    with tqdm(total=state.n, unit="node", desc="import files", disable=not progress) as bar, \
            sample_writer(files / "samples.csv") as nodes:
        for part in parts:
            part_meta = list(islice(meta, len(part)))
            columns = {key: [row.get(key) for row in part_meta] for key in keep}
            block = vectors[part[0]:part[-1] + 1]  # a view: the parts are consecutive rows
            columns.update(id=ids[part], label=repeated("Sample", len(part)), space=repeated(space.id, len(part)),
                           row=part, gradient_f32=byte_rows(block, "<f4"))
            if dots_basis is not None:
                columns.update(validation_key=repeated(dots_key, len(part)),
                               validation_dots=byte_rows(block.astype(np.float64) @ dots_basis, "<f8"))
            else:
                columns.update(validation_key=[None] * len(part), validation_dots=null_bytes(len(part)))
            nodes.write(columns)
            bar.update(len(part))
    with edge_writer(files / "similar.csv") as similar:
        n_similar = write_edges(similar, "SIMILAR", ids, lists.similar_index, lists.similar_weight, parts)
    with edge_writer(files / "conflict.csv", weighted=False) as conflict:
        n_conflict = write_edges(conflict, "CONFLICT", ids, lists.conflict_index, lists.conflict_weight, parts, True)
    result.seconds["import_files"] = time.perf_counter() - started
    echo(f"importing {state.n} nodes and {n_similar + n_conflict} relationships with neo4j-admin (the server "
         f"restarts)")
    started = time.perf_counter()
    edge_files = [f for f, n in ((files / "similar.csv", n_similar), (files / "conflict.csv", n_conflict)) if n]
    with lock.suspended():
        status, summary = server.replace_database(graph.database, [files / "samples.csv"], edge_files, echo,
                                                  multiline=any(f.line_breaks for f in (nodes, similar, conflict)))
        result.seconds["import"] = time.perf_counter() - started
        started = time.perf_counter()
        graph.reopen(status.uri)
        graph.init_schema()  # the constraints and indexes, built over the imported nodes
    result.seconds["restart_and_schema"] = time.perf_counter() - started
    for stale in files.glob("*.csv"):
        stale.unlink()
    lock.check()
    k = lists.similar_index.shape[1]
    mark_complete(graph, state, space, config, k, vectors)
    result.n_changed = state.n
    result.import_summary = summary
    written = result.seconds["import_files"] + result.seconds["import"]
    result.write_rates["nodes (import)"] = state.n / written
    result.write_rates["relationships (import)"] = (n_similar + n_conflict) / written


def _import_validation_basis(space: FeatureSpace, validation_stores: Sequence[str | Path],
                             dim: int) -> tuple[np.ndarray | None, str]:
    """The validation basis and key (`validation_basis` of the database once `write_validation` has run) when
    this build brings validation stores, so the import carries every node's dot products; (None, "") otherwise
    (then `write_validation_dots` writes them through transactions)."""
    if not validation_stores:
        return None, ""
    payload, vectors = _validation_payload(space, validation_stores)
    order = sorted(range(len(payload)), key=lambda i: (payload[i]["task"], payload[i]["id"]))
    if len(order) >= dim:
        return None, ""
    records = [payload[i] for i in order]
    ordered = vectors[order]
    return ordered.astype(np.float64).T, validation_key(records, ordered)


def _validation_payload(space: FeatureSpace, validation_stores: Sequence[str | Path]):
    stores = open_stores(validation_stores)
    check_in_space(space, stores, "validation")
    if stores[0].meta["gradient"].get("kind") == "adam":
        raise StoreError(f"{stores[0].path}: validation features must be plain (sgd) gradients, not Adam features")
    vectors = combined_features(stores, space.weights)
    rows = stores[0].rows()
    payload = [{"id": r["id"], "task": r.get("task") or r.get("dataset") or "default", "subtask": r.get("subtask"),
                "dataset": r.get("dataset"), "source_file": r["source_file"], "line": r["line"],
                "content_hash": r["content_hash"], "preview": r.get("preview"),
                "gradient_f32": vectors[i].astype("<f4").tobytes()}
               for i, r in enumerate(rows)]
    return payload, vectors


def write_validation(graph: Graph, space: FeatureSpace, validation_stores: Sequence[str | Path],
                     config: GraphConfig, progress: bool) -> int:
    """:Validation nodes (plain gradients of the same checkpoints, combined with the same weights)."""
    payload, _ = _validation_payload(space, validation_stores)
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

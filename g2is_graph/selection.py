"""A selection run: pick n samples with G2IS or a baseline, record every choice in Neo4j, write the outputs.

A :SelectionRun is created with status `running` before anything is chosen and marked `complete` only
after every SELECTED relationship is written, so an interrupted run is never mistaken for a finished
one. Outputs in the run's directory: selected.jsonl (the original records, in selection order,
byte-for-byte), ids.txt, and manifest.json (full config, feature space, components, per-source counts,
timings).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .config import ConfigError, SelectionConfig, to_jsonable
from .diagnostics import describe, regime_diagnostics
from .graph import Graph, GraphError, decode_vectors, vector_pages
from .knowledge import Component, components_for_selection
from .numerics import FLOAT32_UNIT, exact_matvec, float32_dot_error, top_exact, unit_filter_error
from .admission import Pick, WalkResult
from .graph_walk import GraphWalk
from .walk import reference_walk

@dataclass
class SpaceInfo:
    id: str
    n_samples: int
    dim: int
    pool_cosines: dict[str, Any] | None = None  # the build's sample of pairwise cosines (diagnostics)


@dataclass
class RunResult:
    id: str
    method: str
    picks: list[Pick]
    components: list[dict[str, Any]]
    out_dir: Path | None
    walk: WalkResult | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] | None = None  # regime diagnostics of a G2IS run

    def summary(self) -> str:
        counts = Counter(p.how for p in self.picks)
        line = f"run {self.id}: {self.method} selected {len(self.picks)} samples ({dict(counts)})"
        if self.walk is not None:
            line += (f"; {self.walk.steps} walk steps, {self.walk.round_trips} queries, "
                     f"{len(self.walk.rejections)} candidates rejected, shortfall {self.walk.shortfall}; "
                     f"anchor ranking from {self.walk.scan}")
        if self.diagnostics is not None:
            line += "\n" + describe(self.diagnostics)
        return line


def space_info(graph: Graph) -> SpaceInfo:
    spaces = graph.read("feature_space")
    if not spaces:
        raise GraphError("the database holds no graph yet; build one with `g2is graph build`")
    space = spaces[0]
    if space["status"] != "complete":
        raise GraphError(f"the last graph build of space {space['id']} did not finish; re-run `g2is graph build`")
    pool = space.get("pool_cosines")
    return SpaceInfo(space["id"], int(space["n_samples"]), int(space["dim"]), json.loads(pool) if pool else None)


def load_vectors(graph: Graph, space: SpaceInfo, page: int = 2000) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every node vector in row order (baselines and the reference need them all)."""
    vectors = np.empty((space.n_samples, space.dim), dtype=np.float32)
    nodes: list[dict[str, Any]] = []
    for records, page_vectors in vector_pages(graph.read, space.id, page):
        vectors[[r["row"] for r in records]] = page_vectors
        nodes += records
    if [n["row"] for n in nodes] != list(range(space.n_samples)):
        raise GraphError(f"space {space.id}: node rows are not 0..{space.n_samples - 1}; rebuild the graph")
    return vectors, nodes


def load_validation(graph: Graph, space: SpaceInfo, tasks: tuple[str, ...]) -> tuple[np.ndarray, list[dict]]:
    records = graph.read("validation_vectors", space=space.id, tasks=list(tasks) or None)
    if not records:
        raise GraphError(f"no validation examples{' for tasks ' + ', '.join(tasks) if tasks else ''} in the graph; "
                         "add them with `g2is graph build --validation`")
    vectors = decode_vectors(records)
    for r in records:
        r.pop("gradient")
    return vectors, records


def n_to_select(config: SelectionConfig, n_pool: int) -> int:
    n = config.n_select if config.n_select is not None else int(round(config.ratio * n_pool))
    if not 1 <= n <= n_pool:
        raise ConfigError(f"[select] would select {n} of {n_pool} samples; adjust ratio or n_select")
    return n


def components_of(graph: Graph, space: SpaceInfo, config: SelectionConfig, n: int) -> list[Component]:
    validation, records = load_validation(graph, space, config.tasks)
    return components_for_selection(validation, [r["task"] for r in records], n, config)


# -- baselines ------------------------------------------------------------------------------
def less_picks(train: np.ndarray, validation: np.ndarray, groups: list[str], ids: list[str], n: int) -> list[Pick]:
    """LESS: the n samples with the largest max over validation subtasks of the mean (checkpoint-weighted)
    cosine to that subtask; scores exact (`numerics`), ties by row, so the ranking is the same on any CPU."""
    groups_arr = np.asarray(groups)
    means = [validation[groups_arr == name].astype(np.float64).mean(axis=0) for name in sorted(set(groups))]
    approx = np.max([train @ mean.astype(np.float32) for mean in means], axis=0)
    scale = float(np.linalg.norm(train, axis=1).max(initial=0.0)) * max(np.linalg.norm(m) for m in means) * 1.001
    error = float32_dot_error(train.shape[1], scale) + 4 * FLOAT32_UNIT * scale
    rows, values = top_exact(approx, error, n,
                             lambda pos: np.max([exact_matvec(train[pos], mean) for mean in means], axis=0))
    return [Pick(rank + 1, ids[r], int(r), 0, rank, "score", cos_k=float(v))
            for rank, (r, v) in enumerate(zip(rows, values))]


def random_picks(ids: list[str], n: int, seed: int) -> list[Pick]:
    rows = np.random.default_rng(seed).choice(len(ids), size=n, replace=False)
    return [Pick(rank + 1, ids[r], int(r), 0, rank, "random") for rank, r in enumerate(rows)]


def no_graph_picks(vectors: np.ndarray, ids: list[str], components: list[Component]) -> list[Pick]:
    """Ablation: each component takes its budget of top exact cos(z, K) among the unselected, no walk."""
    free = np.ones(len(vectors), dtype=bool)
    error = unit_filter_error(vectors.shape[1])
    picks: list[Pick] = []
    for ci, comp in enumerate(components):
        rows = np.flatnonzero(free)
        approx = vectors[rows] @ comp.vector.astype(np.float32)
        best, values = top_exact(approx, error, comp.budget, lambda pos: exact_matvec(vectors[rows[pos]], comp.vector))
        for step, (pos, value) in enumerate(zip(best, values)):
            r = int(rows[pos])
            free[r] = False
            picks.append(Pick(len(picks) + 1, ids[r], r, ci, step, "score", cos_k=float(value)))
    return picks


# -- the run --------------------------------------------------------------------------------
def new_run_id(method: str) -> str:
    return f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{method}-{secrets.token_hex(3)}"


def start_run(graph: Graph, config: SelectionConfig, space: SpaceInfo, n: int, run_id: str | None = None,
              **extra: Any) -> str:
    """Create the :SelectionRun (status running) with its full config before anything is chosen."""
    run_id = run_id or new_run_id(config.method)
    graph.write("run_start", id=run_id, props={
        "method": config.method, "space": space.id, "n_pool": space.n_samples, "n_requested": n,
        "config": json.dumps(to_jsonable(config), sort_keys=True), **extra})
    return run_id


def select(graph: Graph, config: SelectionConfig, out_root: str | Path | None = None, echo=print,
           progress: bool = True, run_id: str | None = None) -> RunResult:
    """Run one selection and record it; the run's outputs go to out_root/<run id>."""
    config.validate()
    space = space_info(graph)
    n = n_to_select(config, space.n_samples)
    run_id = start_run(graph, config, space, n, run_id)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    walk_result = None
    components: list[Component] = []
    if config.method in ("g2is", "no-graph"):
        components = components_of(graph, space, config, n)
        timings["components"] = time.perf_counter() - started
    if config.method == "g2is":
        with tqdm(total=n, unit="pick", desc="gradient walk", disable=not progress) as bar:
            walk_result = GraphWalk(graph, space.id, config, space.dim).run(components, bar)
        picks = walk_result.picks
    elif config.method == "random":
        ids = [r["id"] for r in graph.read("space_ids", space=space.id)]
        picks = random_picks(ids, n, config.seed)
    else:
        vectors, nodes = load_vectors(graph, space)
        ids = [node["id"] for node in nodes]
        timings["load"] = time.perf_counter() - started
        if config.method == "no-graph":
            picks = no_graph_picks(vectors, ids, components)
        elif config.method == "less":
            validation, records = load_validation(graph, space, config.tasks)
            picks = less_picks(vectors, validation, [r["subtask"] or r["task"] for r in records], ids, n)
        else:
            raise ConfigError(f"method {config.method!r} needs sample texts; run it through g2is_graph.embedding")
    timings["select"] = time.perf_counter() - started - timings.get("components", 0.0)
    result = RunResult(run_id, config.method, picks, [c.record() for c in components], None, walk_result, timings)
    if walk_result is not None:
        result.diagnostics = regime_diagnostics(walk_result, components, space.pool_cosines, graph.counts()["conflict"])
    return record_run(graph, result, config, space, out_root, echo)


def record_run(graph: Graph, result: RunResult, config: SelectionConfig, space: SpaceInfo,
               out_root: str | Path | None, echo=print) -> RunResult:
    """SELECTED relationships, then the outputs, then status complete (the last write)."""
    graph.write_rows("run_selected", (p.record() for p in result.picks), 1000, run=result.id)
    walk = result.walk
    props = {"n_selected": len(result.picks), "components": json.dumps(result.components),
             "seconds": json.dumps(result.seconds)}
    if walk is not None:
        props.update(steps=walk.steps, round_trips=walk.round_trips, shortfall=walk.shortfall, scan=walk.scan,
                     filled=walk.filled, budgets=walk.budgets,
                     rejections=json.dumps([list(r.__dict__.values()) for r in walk.rejections]))
    if result.diagnostics is not None:
        props.update(diagnostics=json.dumps(result.diagnostics), warnings=result.diagnostics["warnings"])
    if out_root is not None:
        result.out_dir = write_outputs(graph, result, config, space, Path(out_root) / result.id, props)
        props["out_dir"] = str(result.out_dir)
    graph.write("run_finish", id=result.id, props=props, status="complete")
    for warning in (result.diagnostics or {}).get("warnings", ()):
        echo(f"warning: {warning}")
    if walk is not None and walk.shortfall:
        echo(f"warning: the walk under-filled by {walk.shortfall} samples (components filled {walk.filled} of "
             f"{walk.budgets}); use --fallback paper or --reassign-shortfall to fill the budget")
    return result


def write_outputs(graph: Graph, result: RunResult, config: SelectionConfig, space: SpaceInfo, out_dir: Path,
                  props: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = graph.read("run_picks", id=result.id)
    lines = original_lines([(p["source_file"], p["line"]) for p in picks])
    (out_dir / "selected.jsonl").write_text("".join(lines), encoding="utf-8")
    (out_dir / "ids.txt").write_text("".join(p["pick"]["id"] + "\n" for p in picks), encoding="utf-8")
    manifest = {"run": result.id, "method": result.method, "space": space.id, "n_pool": space.n_samples,
                "n_selected": len(picks), "config": to_jsonable(config), "components": result.components,
                "per_source": dict(Counter(p["dataset"] or p["source_file"] for p in picks)),
                "how": dict(Counter(p["pick"]["how"] for p in picks)), "seconds": result.seconds,
                "walk": {k: v for k, v in props.items() if k in ("steps", "round_trips", "shortfall", "filled", "budgets", "scan")},
                "diagnostics": result.diagnostics,
                "selected_sha256": hashlib.sha256("".join(lines).encode()).hexdigest()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out_dir


def original_lines(locations: list[tuple[str, int]]) -> list[str]:
    """The exact source lines (with their newline) of (file, 1-based line) pairs, in the given order."""
    wanted: dict[str, set[int]] = {}
    for path, line in locations:
        wanted.setdefault(path, set()).add(line)
    text: dict[tuple[str, int], str] = {}
    for path, lines in wanted.items():
        try:
            with open(path, encoding="utf-8") as fh:
                for number, content in enumerate(fh, start=1):
                    if number in lines:
                        text[(path, number)] = content if content.endswith("\n") else content + "\n"
        except FileNotFoundError as exc:
            raise ConfigError(f"{path}: the source file of selected samples is gone; run from the directory the "
                              "pool was ingested from, or restore the file") from exc
    missing = [loc for loc in locations if loc not in text]
    if missing:
        raise ConfigError(f"{missing[0][0]}:{missing[0][1]}: line not found; the source file changed since ingest")
    return [text[loc] for loc in locations]


def reference_for_graph(graph: Graph, config: SelectionConfig) -> WalkResult:
    """The dense Algorithm 1 on the graph's own vectors (and SIMILAR lists unless candidates = all)."""
    space = space_info(graph)
    vectors, nodes = load_vectors(graph, space)
    components = components_of(graph, space, config, n_to_select(config, space.n_samples))
    neighbors = None
    if config.candidates == "neighbors":
        neighbors = {r["source"]: np.asarray(r["targets"]) for r in graph.read("similar_rows", space=space.id)}
    return reference_walk(vectors, [n["id"] for n in nodes], components, config, neighbors)

"""A selection run: pick n samples with G2IS or a baseline, record every choice in Neo4j, write the outputs.

A :SelectionRun is created with status `running` before anything is chosen and marked `complete` only
after every SELECTED relationship and output is written, so an interrupted run is never mistaken for a
finished one; any error marks it `failed` with the reason, and a run whose process was killed is marked
`failed` by the next command that looks at it. Outputs in the run's directory: manifest.json (written
first, with `status`: running, then failed or complete), and, only once the run is complete,
selected.jsonl (the original records, in selection order, byte-for-byte) and ids.txt; until then they are
`*.partial` (with the complete manifest beside them, so a run killed right after it was marked complete is
published by the next command that lists it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from g2is_graph.config import SelectionConfig, to_jsonable
from g2is_graph.db.graph import Graph, GraphError, GraphUnavailable, decode_vectors, vector_pages
from g2is_graph.errors import ConfigError, hinted
from g2is_graph.files import atomic_write_json, atomic_write_text
from g2is_graph.locks import ProcessIdentity
from g2is_graph.numerics import FLOAT32_UNIT, exact_matvec, float32_dot_error, top_exact, unit_filter_error
from g2is_graph.selection.admission import Pick, WalkResult
from g2is_graph.selection.diagnostics import describe, regime_diagnostics
from g2is_graph.selection.graph_walk import GraphWalk
from g2is_graph.selection.knowledge import Component, components_for_selection
from g2is_graph.selection.walk import reference_walk


@dataclass
class SpaceInfo:
    id: str
    n_samples: int
    dim: int
    build: int | None = None
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
        raise hinted(GraphError("the database holds no graph yet"), "build one with `g2is graph build`")
    space = spaces[0]
    if space["status"] != "complete":
        raise hinted(GraphError(f"the last graph build of space {space['id']} did not finish (or is running)"),
                     "re-run the same `g2is graph build` (it resumes), or wait for the one running")
    pool = space.get("pool_cosines")
    return SpaceInfo(space["id"], int(space["n_samples"]), int(space["dim"]), space.get("build"),
                     json.loads(pool) if pool else None)


def load_vectors(graph: Graph, space: SpaceInfo, page: int = 2000) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every node vector in row order (baselines and the reference need them all)."""
    vectors = np.empty((space.n_samples, space.dim), dtype=np.float32)
    nodes: list[dict[str, Any]] = []
    for records, page_vectors in vector_pages(graph.read, space.id, page):
        vectors[[r["row"] for r in records]] = page_vectors
        nodes += records
    if [n["row"] for n in nodes] != list(range(space.n_samples)):
        raise hinted(GraphError(f"space {space.id}: node rows are not 0..{space.n_samples - 1}"),
                     "re-run `g2is graph build` with the graph's --state: it rewrites what the database lacks")
    return vectors, nodes


def check_validation(graph: Graph, space: SpaceInfo, tasks: tuple[str, ...]) -> list[dict[str, Any]]:
    """The validation examples of `tasks` (provenance only), or a clear error naming the tasks the graph has."""
    records = graph.read("validation_nodes", space=space.id, tasks=list(tasks) or None)
    if not records:
        known = sorted({r["task"] for r in graph.read("validation_nodes", space=space.id, tasks=None)})
        what = f" for task(s) {', '.join(tasks)}" if tasks else ""
        raise hinted(GraphError(f"no validation examples{what} in the graph"
                                + (f" (it has tasks: {', '.join(known)})" if known else "")),
                     "pass --task with one of the graph's tasks" if known else
                     "add them with `g2is graph build --validation`")
    return records


def load_validation(graph: Graph, space: SpaceInfo, tasks: tuple[str, ...]) -> tuple[np.ndarray, list[dict]]:
    records = graph.read("validation_vectors", space=space.id, tasks=list(tasks) or None)
    if not records:
        check_validation(graph, space, tasks)
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


class PagedScores:
    """Float32 scores of every node against a few vectors, from one paged read of the graph (memory: a page
    of vectors plus N scores per vector, never N d), and the exact re-scoring of the few nodes whose scores
    decide a ranking, read back by id. The baselines rank a million nodes this way without holding them."""

    def __init__(self, graph: Graph, space: SpaceInfo, against: np.ndarray, page: int = 2000):
        self.graph = graph
        against32 = np.asarray(against, dtype=np.float32)
        self.ids: list[str] = []
        rows, scores, self.max_norm = [], [], 0.0
        for records, vectors in vector_pages(graph.read, space.id, page):
            self.ids += [r["id"] for r in records]
            rows.append([r["row"] for r in records])
            scores.append(vectors @ against32.T)
            self.max_norm = max(self.max_norm, float(np.linalg.norm(vectors, axis=1).max(initial=0.0)))
        self.rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        if not np.array_equal(np.sort(self.rows), np.arange(space.n_samples)):
            raise hinted(GraphError(f"space {space.id}: node rows are not 0..{space.n_samples - 1}"),
                         "re-run `g2is graph build` with the graph's --state: it rewrites what the database lacks")
        self.scores = np.concatenate(scores) if scores else np.empty((0, len(against32)), dtype=np.float32)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """The vectors at `positions` (of this pass's order), read by id."""
        wanted = [self.ids[p] for p in positions]
        found = {}
        for start in range(0, len(wanted), 2000):
            records = self.graph.read("sample_vectors", ids=wanted[start:start + 2000])
            found.update(zip([r["id"] for r in records], decode_vectors(records)))
        return np.stack([found[i] for i in wanted]) if wanted else np.empty((0, 0), dtype=np.float32)


def less_picks_paged(graph: Graph, space: SpaceInfo, validation: np.ndarray, groups: list[str], n: int) -> list[Pick]:
    """`less_picks` over the graph without loading it: the same exact scores and ranking (ties by row)."""
    groups_arr = np.asarray(groups)
    means = [validation[groups_arr == name].astype(np.float64).mean(axis=0) for name in sorted(set(groups))]
    paged = PagedScores(graph, space, np.stack(means))
    approx = paged.scores.max(axis=1)
    scale = paged.max_norm * max(np.linalg.norm(m) for m in means) * 1.001
    error = float32_dot_error(space.dim, scale) + 4 * FLOAT32_UNIT * scale
    found, values = top_exact(approx, error, n, lambda pos: np.max(
        [exact_matvec(paged.vectors(pos), mean) for mean in means], axis=0), keys=paged.rows)
    return [Pick(rank + 1, paged.ids[p], int(paged.rows[p]), 0, rank, "score", cos_k=float(v))
            for rank, (p, v) in enumerate(zip(found, values))]


def no_graph_picks_paged(graph: Graph, space: SpaceInfo, components: list[Component]) -> list[Pick]:
    """`no_graph_picks` over the graph without loading it: the same exact scores and picks."""
    paged = PagedScores(graph, space, np.stack([c.vector for c in components]))
    free = np.ones(len(paged.ids), dtype=bool)
    error = unit_filter_error(space.dim)
    picks: list[Pick] = []
    for ci, comp in enumerate(components):
        positions = np.flatnonzero(free)
        best, values = top_exact(paged.scores[positions, ci], error, comp.budget,
                                 lambda pos: exact_matvec(paged.vectors(positions[pos]), comp.vector),
                                 keys=paged.rows[positions])
        for step, (pos, value) in enumerate(zip(best, values)):
            p = int(positions[pos])
            free[p] = False
            picks.append(Pick(len(picks) + 1, paged.ids[p], int(paged.rows[p]), ci, step, "score",
                              cos_k=float(value)))
    return picks


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


OUTPUT_FILES = ("selected.jsonl", "ids.txt")
PARTIAL = ".partial"  # outputs carry this suffix until the run is complete


class OpenRun:
    """One :SelectionRun from its start to its end, as a context: the output directory and its manifest
    (status running) first, so an unwritable --out is refused before any run exists; then the run node;
    on any exception the run is marked failed with the reason, in the database and the manifest."""

    def __init__(self, graph: Graph, config: SelectionConfig, space: SpaceInfo, n: int,
                 out_root: str | Path | None, run_id: str | None = None, **extra: Any):
        self.graph, self.config, self.space, self.n, self.extra = graph, config, space, n, extra
        self.id = run_id or new_run_id(config.method)
        self.out_dir = Path(out_root) / self.id if out_root is not None else None
        self.process = ProcessIdentity.current()
        self.finished = False

    def manifest_head(self, status: str) -> dict[str, Any]:
        return {"run": self.id, "status": status, "method": self.config.method, "space": self.space.id,
                "n_pool": self.space.n_samples, "n_requested": self.n, "config": to_jsonable(self.config),
                "process": self.process.as_dict()}

    def __enter__(self) -> "OpenRun":
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / "manifest.json", self.manifest_head("running"), indent=2, sort_keys=True)
        self.graph.write("run_start", id=self.id, props={
            "method": self.config.method, "space": self.space.id, "n_pool": self.space.n_samples,
            "n_requested": self.n, "config": json.dumps(to_jsonable(self.config), sort_keys=True),
            "process": json.dumps(self.process.as_dict()), "graph_build": self.space.build, **self.extra})
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and not self.finished:
            self.fail(exc)
        return False

    def fail(self, exc: BaseException) -> None:
        """Mark the run failed (best effort: with the database down it stays `running` until a later command
        finds its process gone) and take its partial outputs away."""
        reason = "interrupted (SIGINT)" if isinstance(exc, KeyboardInterrupt) else \
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        try:
            self.graph.write("run_finish", id=self.id, props={"reason": reason}, status="failed")
        except (GraphError, GraphUnavailable):
            pass
        if self.out_dir is not None:
            try:
                for name in OUTPUT_FILES + ("manifest.json",):
                    (self.out_dir / (name + PARTIAL)).unlink(missing_ok=True)
                atomic_write_json(self.out_dir / "manifest.json", self.manifest_head("failed") | {"reason": reason},
                                  indent=2, sort_keys=True)
            except OSError:
                pass  # the directory itself is what failed (full or read-only disk)


def select(graph: Graph, config: SelectionConfig, out_root: str | Path | None = None, echo=print,
           progress: bool = True, run_id: str | None = None) -> RunResult:
    """Run one selection and record it; the run's outputs go to out_root/<run id>."""
    space = space_info(graph)
    n = n_to_select(config, space.n_samples)
    if config.method != "random":
        check_validation(graph, space, config.tasks)
    with OpenRun(graph, config, space, n, out_root, run_id) as run:
        return _select(graph, config, space, n, run, echo, progress)


def _select(graph: Graph, config: SelectionConfig, space: SpaceInfo, n: int, run: OpenRun, echo,
            progress: bool) -> RunResult:
    run_id = run.id
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
        if config.method == "no-graph":
            picks = no_graph_picks_paged(graph, space, components)
        elif config.method == "less":
            validation, records = load_validation(graph, space, config.tasks)
            picks = less_picks_paged(graph, space, validation, [r["subtask"] or r["task"] for r in records], n)
        else:
            raise ConfigError(f"method {config.method!r} needs sample texts; run it through g2is_graph.selection.embedding")
    timings["select"] = time.perf_counter() - started - timings.get("components", 0.0)
    result = RunResult(run_id, config.method, picks, [c.record() for c in components], None, walk_result, timings)
    if walk_result is not None:
        result.diagnostics = regime_diagnostics(walk_result, components, space.pool_cosines, graph.counts()["conflict"])
    return record_run(run, result, echo)


def record_run(run: OpenRun, result: RunResult, echo=print) -> RunResult:
    """SELECTED relationships, then the outputs (as *.partial), then status complete, then the outputs under
    their names and the manifest's status complete: a run is never complete-looking before it is complete."""
    graph, config, space = run.graph, run.config, run.space
    graph.write_rows("run_selected", (p.record() for p in result.picks), 1000, run=result.id)
    walk = result.walk
    if walk is not None:
        graph.write_rows("run_rejected", ({"order": i, **r.record()} for i, r in enumerate(walk.rejections)), 5000,
                         run=result.id)
    props = {"n_selected": len(result.picks), "components": json.dumps(result.components),
             "seconds": json.dumps(result.seconds)}
    if walk is not None:
        props.update(steps=walk.steps, round_trips=walk.round_trips, shortfall=walk.shortfall, scan=walk.scan,
                     filled=walk.filled, budgets=walk.budgets, n_rejections=len(walk.rejections))
    if result.diagnostics is not None:
        props.update(diagnostics=json.dumps(result.diagnostics), warnings=result.diagnostics["warnings"])
    if run.out_dir is not None:
        manifest = write_outputs(graph, result, config, space, run.out_dir, props) | run.manifest_head("complete")
        atomic_write_json(run.out_dir / ("manifest.json" + PARTIAL), manifest, indent=2, sort_keys=True)
        props["out_dir"] = str(run.out_dir.resolve())
    now = space_info(graph)
    if now.build != space.build or now.n_samples != space.n_samples:
        raise hinted(GraphError(f"the graph was rebuilt while the run was selecting (build {space.build} -> "
                                f"{now.build}): its picks may mix both graphs"), "run the selection again")
    graph.write("run_finish", id=result.id, props=props, status="complete")
    run.finished = True
    if run.out_dir is not None:
        publish_outputs(run.out_dir)
        result.out_dir = run.out_dir
    for warning in (result.diagnostics or {}).get("warnings", ()):
        echo(f"warning: {warning}")
    if walk is not None and walk.shortfall:
        echo(f"warning: the walk under-filled by {walk.shortfall} samples (components filled {walk.filled} of "
             f"{walk.budgets}); use --fallback paper or --reassign-shortfall to fill the budget")
    return result


def publish_outputs(out_dir: Path) -> bool:
    """Give a complete run's outputs their names, the manifest last (idempotent); False when there was nothing
    to publish."""
    if not (out_dir / ("manifest.json" + PARTIAL)).exists():
        return False
    for name in OUTPUT_FILES + ("manifest.json",):
        if (out_dir / (name + PARTIAL)).exists():
            os.replace(out_dir / (name + PARTIAL), out_dir / name)
    return True


def write_outputs(graph: Graph, result: RunResult, config: SelectionConfig, space: SpaceInfo, out_dir: Path,
                  props: dict[str, Any]) -> dict[str, Any]:
    """selected.jsonl and ids.txt as *.partial files (renamed once the run is complete); returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    picks = graph.read("run_picks", id=result.id)
    lines = original_lines([(p["source_file"], p["line"]) for p in picks])
    atomic_write_text(out_dir / ("selected.jsonl" + PARTIAL), "".join(lines))
    atomic_write_text(out_dir / ("ids.txt" + PARTIAL), "".join(p["pick"]["id"] + "\n" for p in picks))
    manifest = {"run": result.id, "method": result.method, "space": space.id, "n_pool": space.n_samples,
                "n_selected": len(picks), "config": to_jsonable(config), "components": result.components,
                "per_source": dict(Counter(p["dataset"] or p["source_file"] for p in picks)),
                "how": dict(Counter(p["pick"]["how"] for p in picks)), "seconds": result.seconds,
                "walk": {k: v for k, v in props.items() if k in ("steps", "round_trips", "shortfall", "filled", "budgets", "scan")},
                "diagnostics": result.diagnostics,
                "selected_sha256": hashlib.sha256("".join(lines).encode()).hexdigest()}
    return manifest


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

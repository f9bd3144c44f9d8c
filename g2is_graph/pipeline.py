"""The stage sequence and its rules, written once; the CLI, the demo and the quality study all go through it.

    records --warmup--> checkpoints --features--> stores --graph--> Neo4j --select--> runs
            --finetune--> adapters --evaluate--> results

Rules that hold whoever runs the stages: validation gradients are plain (sgd) gradients of answers without
the EOS LESS appends to training answers; the embedding methods need the samples' texts and the sentence
encoder, the others only the graph.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from g2is_graph.config import EMBEDDING_METHODS, DataConfig, GradientConfig, ProjectorConfig, SelectionConfig

STAGES = ("warmup", "features", "graph", "select", "finetune", "evaluate")


def validation_data(data: DataConfig) -> DataConfig:
    """The data config of validation examples: LESS renders them without EOS after the answer."""
    return dataclasses.replace(data, eos_after_assistant=False)


def data_for(kind: str, data: DataConfig, eos_set_explicitly: bool = False) -> DataConfig:
    """The data config a gradient job of `kind` uses (sgd = validation, unless EOS was set on purpose)."""
    return validation_data(data) if kind == "sgd" and not eos_set_explicitly else data


def warmup(pool: Sequence[str | Path], model: str | Path, out_dir: Path, config, data: DataConfig, echo=print,
           progress: bool = True) -> list:
    """The warmup stage (LESS recipe): LoRA checkpoints with name-keyed Adam state, one per epoch."""
    from ingest.warmup import run_warmup

    return run_warmup(list(pool), model, out_dir, config, data, echo, progress)


def build_graph(graph, train_stores, config, state_dir: Path, validation_stores=(), echo=print, progress: bool = True,
                server=None):
    """The graph stage: feature stores -> :Sample nodes, SIMILAR / CONFLICT edges, validation dots; `server`
    the project-managed server (a large first build is imported offline), None for one reached by URI."""
    from ingest import graph_build

    return graph_build.build_graph(graph, train_stores, config, state_dir, validation_stores, echo, progress, server)


@dataclass
class Features:
    train: object  # ingest.gradients.GradientJobResult of the pool
    validation: object  # ... of the validation sets


def featurize(pool: Sequence[str | Path], validation: Sequence[str | Path], model: str | Path,
              checkpoints: Sequence[Path], out_dir: Path, projector: ProjectorConfig, data: DataConfig,
              gradients: GradientConfig = GradientConfig(), echo=print, progress: bool = True) -> Features:
    """Adam features of the pool and plain gradients of the validation sets, same checkpoints and projector."""
    from ingest.gradients import run_gradients

    train = run_gradients(list(pool), model, list(checkpoints), out_dir / "train", gradients, projector, data,
                          echo=echo, progress=progress)
    val = run_gradients(list(validation), model, list(checkpoints), out_dir / "validation",
                        dataclasses.replace(gradients, kind="sgd"), projector, validation_data(data), echo=echo,
                        progress=progress)
    return Features(train, val)


def select_run(graph, config: SelectionConfig, out_root: str | Path | None, echo=print, progress: bool = True,
               sharegpt=None):
    """One selection run by any method: the embedding baselines read texts and embed them, the rest the graph."""
    if config.method in EMBEDDING_METHODS:
        from g2is_graph.selection.embedding import select_by_embedding

        return select_by_embedding(graph, config, out_root, echo, progress, sharegpt=sharegpt)
    from g2is_graph.selection.runs import select

    return select(graph, config, out_root, echo, progress)

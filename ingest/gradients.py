"""The gradient job: per-example LoRA gradient features for one split, per warmup checkpoint.

Training pool: Adam-adjusted features (LESS form by default). Validation: plain (SGD) gradients.
For each checkpoint a feature store is written chunk by chunk; an interrupted job continues with the
missing chunks, a finished one is a no-op, and `shard=(i, n)` computes only chunks c with c % n == i so
many processes can split a pool into the same store. Within a chunk, examples are batched by length
(less padding, same result: padding does not change an example's gradient) and written in row order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from g2is_graph.config import DataConfig, GradientConfig, ProjectorConfig
from g2is_graph.data.records import collate, load_pool
from g2is_graph.errors import ConfigError
from g2is_graph.grads.gradients import PerExampleGradients, adam_feature
from g2is_graph.grads.projection import Projector
from g2is_graph.model.loading import load_tokenizer, load_with_adapter, model_identity, pick_device
from g2is_graph.store.features import FeatureStore, StoreError, normalize_rows, record_row

from .warmup import Checkpoint


@dataclass(frozen=True)
class GradientJobResult:
    stores: list[Path]
    rows: int
    chunks_computed: int
    seconds: float


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), not {text!r}") from exc
    if count <= 0 or not 0 <= index < count:
        raise ConfigError(f"--shard {text}: need 0 <= i < n")
    return (index, count)


def run_gradients(paths: Sequence[str | Path], model_spec: str | Path, checkpoints: Sequence[str | Path],
                  out_dir: str | Path, config: GradientConfig, projector_config: ProjectorConfig,
                  data_config: DataConfig, shard: tuple[int, int] = (0, 1), echo=print,
                  progress: bool = True, skip_content: frozenset[str] = frozenset()) -> GradientJobResult:
    """Features of every record of `paths` (except those whose content hash is in `skip_content`,
    already in a graph) for each checkpoint, into out_dir/<checkpoint name>."""
    if not checkpoints:
        raise ConfigError("at least one warmup checkpoint is needed (g2is warmup makes them)")
    for checkpoint_path in checkpoints:
        Checkpoint.load(checkpoint_path)  # a folder that is not a checkpoint is refused before any work
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    tokenizer = load_tokenizer(model_spec)
    records, encoded = load_pool(paths, tokenizer, data_config, out_dir, echo)
    if skip_content:
        kept = [i for i, r in enumerate(records) if r.content_hash not in skip_content]
        echo(f"{len(records) - len(kept)} of {len(records)} records are already in the graph; featurising {len(kept)}")
        records, encoded = [records[i] for i in kept], [encoded[i] for i in kept]
    if not records:
        raise ConfigError("no usable records in " + ", ".join(str(p) for p in paths))
    rows = [record_row(r, e) for r, e in zip(records, encoded)]
    identity = model_identity(model_spec).as_dict()
    stores, computed = [], 0
    for checkpoint_path in checkpoints:
        checkpoint = Checkpoint.load(checkpoint_path)
        model = load_with_adapter(model_spec, checkpoint.path, config.dtype, device, trainable=True)
        model.eval()
        extractor = PerExampleGradients(model)
        adam = checkpoint.adam_state(extractor.spec.names) if config.kind == "adam" else None
        if adam is not None:
            adam = type(adam)(adam.exp_avg.to(device), adam.exp_avg_sq.to(device), adam.step, adam.beta1,
                              adam.beta2, adam.eps)
        projector = Projector(projector_config, extractor.spec.dim, device)
        meta = {"model": identity, "checkpoint": checkpoint.identity(), "projector": projector.identity(),
                "gradient": {"kind": config.kind, "adam_form": config.adam_form if config.kind == "adam" else None,
                             "loss": "mean over loss tokens"},
                "parameters": {"dim": extractor.spec.dim, "count": len(extractor.spec.names),
                               "first": extractor.spec.names[0]},
                "chunk_rows": config.chunk_rows, "store_dtype": config.store_dtype, "model_dtype": config.dtype,
                "data": data_config.identity() | {"skip_bad": None}}
        store = FeatureStore.create_or_open(out_dir / checkpoint.name, meta, rows)
        todo = store.missing_chunks(shard)
        bar = tqdm(total=sum(stop - start for start, stop in map(store.plan.bounds, todo)), unit="ex",
                   desc=f"{config.kind} gradients {checkpoint.name}", disable=not progress)
        for chunk in todo:
            start, stop = store.plan.bounds(chunk)
            raw = _chunk_features(extractor, projector, adam, config, encoded[start:stop], tokenizer.pad_token_id,
                                  records[start:stop], bar)
            store.write_chunk(chunk, raw, normalize_rows(raw), device)
            computed += 1
        bar.close()
        stores.append(store.path)
        del model, extractor
    return GradientJobResult(stores, len(rows), computed, time.perf_counter() - started)


def _chunk_features(extractor: PerExampleGradients, projector: Projector, adam, config: GradientConfig,
                    encoded, pad_id: int, records, bar) -> np.ndarray:
    """Projected features [len(encoded), dim] for one chunk, in row order."""
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_tokens)
    out = np.zeros((len(encoded), projector.dim), dtype=np.float32)
    pending_rows: list[int] = []
    pending_grads: list[torch.Tensor] = []

    def flush():
        if not pending_grads:
            return
        projected = projector.project(torch.cat(pending_grads)).cpu().numpy()
        out[pending_rows] = projected
        pending_rows.clear()
        pending_grads.clear()

    batch_size = config.batch_for(str(projector.device))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, labels, attention = collate([encoded[i] for i in idx], pad_id)
        grads, losses = extractor.compute(ids, labels, attention)
        if adam is not None:
            grads = adam_feature(grads, adam, config.adam_form)
        finite = torch.isfinite(grads).all(dim=1) & torch.isfinite(losses)
        if not bool(finite.all()):
            bad = idx[int((~finite).nonzero()[0])]
            raise StoreError(f"{records[bad].source_file}:{records[bad].line}: non-finite gradient for id "
                             f"{records[bad].id!r} (loss {float(losses[int((~finite).nonzero()[0])]):.3g}); "
                             "nothing was written for its chunk")
        pending_rows.extend(idx)
        pending_grads.append(grads)
        if len(pending_rows) >= config.projection_batch:
            flush()
        bar.update(len(idx))
    flush()
    return out

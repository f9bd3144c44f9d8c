"""The gradient job: per-example LoRA gradient features for one split, per warmup checkpoint.

Training pool: Adam-adjusted features (LESS form by default). Validation: plain (SGD) gradients.
For each checkpoint a feature store is written chunk by chunk; an interrupted job continues with the
missing chunks, a finished one is a no-op, and `shard=(i, n)` computes only chunks c with c % n == i so
many processes can split a pool into the same store. Under torchrun or `accelerate launch` the shard is
the process's (RANK, WORLD_SIZE) and rank 0 checks the finished stores after a barrier. Within a chunk,
examples are batched by length (less padding, same result: padding does not change an example's
gradient) and written in row order; each example's gradient exists only one LoRA weight at a time.
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from g2is_graph.config import DataConfig, GradientConfig, ProjectorConfig
from g2is_graph.data.records import collate, load_pool
from g2is_graph.distributed import Ranks, all_reduce_sum, process_group, rank_device, ranks_from_env
from g2is_graph.errors import ConfigError
from g2is_graph.grads.gradients import GradientFeaturizer, PerExampleGradients, featurize_batches, resolve_autocast
from g2is_graph.grads.projection import Projector
from g2is_graph.model.loading import load_tokenizer, load_with_adapter, model_identity
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
                  progress: bool = True, skip_content: frozenset[str] = frozenset(),
                  ranks: Ranks | None = None) -> GradientJobResult:
    """Features of every record of `paths` (except those whose content hash is in `skip_content`,
    already in a graph) for each checkpoint, into out_dir/<checkpoint name>.

    `ranks` (default: from the launcher's environment) makes this process one shard of a launched job."""
    if not checkpoints:
        raise ConfigError("at least one warmup checkpoint is needed (g2is warmup makes them)")
    for checkpoint_path in checkpoints:
        Checkpoint.load(checkpoint_path)  # a folder that is not a checkpoint is refused before any work
    ranks = ranks_from_env() if ranks is None else ranks
    if ranks.distributed:
        if shard != (0, 1):
            raise ConfigError(f"--shard {shard[0]}/{shard[1]} under a launcher with WORLD_SIZE={ranks.world_size}: "
                              "the ranks are the shards; drop --shard")
        shard = (ranks.rank, ranks.world_size)
    device = rank_device(ranks, config.device)
    with process_group(ranks, device):
        result = _run(paths, model_spec, checkpoints, Path(out_dir), config, projector_config, data_config, shard,
                      device, echo if ranks.is_main else _silent, progress and ranks.is_main, skip_content,
                      ranks.is_main)
        if ranks.distributed:
            counts = torch.tensor([result.chunks_computed], device=device)
            all_reduce_sum(ranks, counts)  # also the barrier: every rank has written its chunks
            result = dataclasses.replace(result, chunks_computed=int(counts.item()))
    if ranks.distributed and ranks.is_main:
        for path in result.stores:
            FeatureStore(path).verify()
    return result


def _silent(message: str) -> None:
    """The echo of ranks other than 0 (rank 0 speaks for the job)."""


def _run(paths, model_spec, checkpoints, out_dir: Path, config: GradientConfig, projector_config: ProjectorConfig,
         data_config: DataConfig, shard: tuple[int, int], device: str, echo, progress: bool,
         skip_content: frozenset[str], writes_report: bool) -> GradientJobResult:
    # Python's cyclic collector is off while the job imports transformers and peft and loads its model: about
    # a quarter of a million long-lived objects, which its full collections walked 4 times on the way (0.6 s of
    # a 64-record SmolLM2 run). `loaded` turns it back on once the featurizer exists; the end restores it.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _featurize(paths, model_spec, checkpoints, out_dir, config, projector_config, data_config, shard,
                          device, echo, progress, skip_content, writes_report,
                          loaded=gc.enable if enabled else lambda: None)
    finally:
        if enabled:
            gc.enable()


def _featurize(paths, model_spec, checkpoints, out_dir: Path, config: GradientConfig,
               projector_config: ProjectorConfig, data_config: DataConfig, shard: tuple[int, int], device: str, echo,
               progress: bool, skip_content: frozenset[str], writes_report: bool,
               loaded) -> GradientJobResult:
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    autocast, why = resolve_autocast(config.autocast, device)
    echo(f"gradients on {device}, model matrix products in {autocast} ({why}); features accumulate in float32")
    tokenizer = load_tokenizer(model_spec)
    with tempfile.TemporaryDirectory() as elsewhere:  # one skip report per job: rank 0's
        records, encoded = load_pool(paths, tokenizer, data_config, out_dir if writes_report else Path(elsewhere), echo)
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
        adam = checkpoint.adam_state(extractor.spec.names).to(device) if config.kind == "adam" else None
        projector = Projector(projector_config, extractor.spec.dim, device)
        featurizer = GradientFeaturizer(extractor, projector, adam, config.adam_form, autocast)
        echo(extractor.layer_path())
        loaded()
        meta = {"model": identity, "checkpoint": checkpoint.identity(), "projector": projector.identity(),
                "gradient": {"kind": config.kind, "adam_form": config.adam_form if config.kind == "adam" else None,
                             "loss": "mean over loss tokens"},
                "parameters": {"dim": extractor.spec.dim, "count": len(extractor.spec.names),
                               "first": extractor.spec.names[0]},
                "chunk_rows": config.chunk_rows, "store_dtype": config.store_dtype, "model_dtype": config.dtype,
                "autocast": autocast, "data": data_config.identity() | {"skip_bad": None}}
        store = FeatureStore.create_or_open(out_dir / checkpoint.name, meta, rows)
        todo = store.missing_chunks(shard)
        bar = tqdm(total=sum(stop - start for start, stop in map(store.plan.bounds, todo)), unit="ex",
                   desc=f"{config.kind} gradients {checkpoint.name}", disable=not progress)
        for chunk in todo:
            start, stop = store.plan.bounds(chunk)
            raw = _chunk_features(featurizer, config, encoded[start:stop], tokenizer.pad_token_id,
                                  records[start:stop], bar)
            store.write_chunk(chunk, raw, normalize_rows(raw), device, shard)
            computed += 1
        bar.close()
        stores.append(store.path)
        del model, extractor, featurizer
    return GradientJobResult(stores, len(rows), computed, time.perf_counter() - started)


def _chunk_features(featurizer: GradientFeaturizer, config: GradientConfig, encoded, pad_id: int, records,
                    bar) -> np.ndarray:
    """Projected features [len(encoded), dim] for one chunk, in row order."""
    # longest first: the streams' last batches are short ones (no stream idles behind a long one at the end)
    order = sorted(range(len(encoded)), key=lambda i: -encoded[i].n_tokens)
    out = np.zeros((len(encoded), featurizer.dim), dtype=np.float32)
    device = str(featurizer.projector.device)
    batch_size = config.batch_for(device)
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    results = featurize_batches(featurizer, (collate([encoded[i] for i in idx], pad_id) for idx in batches),
                                config.streams_for(device, torch.get_num_threads()))
    for idx, (features, losses, finite) in zip(batches, results):
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0])
            bad = idx[first]
            raise StoreError(f"{records[bad].source_file}:{records[bad].line}: non-finite gradient for id "
                             f"{records[bad].id!r} (loss {float(losses[first]):.3g}); "
                             "nothing was written for its chunk")
        out[idx] = features.cpu().numpy()
        bar.update(len(idx))
    return out

"""LoRA warmup (the LESS recipe): train on a seeded random fraction of the pool, one checkpoint per epoch.

Each checkpoint directory holds the peft adapter, `adam_state.safetensors` with exp_avg/exp_avg_sq keyed
by parameter name (plain HF Trainer checkpoints key them by integer index, which is LESS's most reported
failure), and `trainer_state.json` with the step count and the learning rate of every optimizer step, from
which checkpoint weights (mean lr per epoch, renormalised) are computed. An interrupted warmup resumes from
its last complete epoch. Under torchrun or `accelerate launch` it is data-parallel over the ranks (see
g2is_graph/training.py) and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from g2is_graph.config import DataConfig, WarmupConfig, to_jsonable
from g2is_graph.data.records import load_pool
from g2is_graph.distributed import Ranks, barrier, process_group, rank_device, ranks_from_env
from g2is_graph.errors import hinted
from g2is_graph.grads.gradients import AdamState
from g2is_graph.model.loading import load_tokenizer, model_identity
from g2is_graph.provenance import write_or_check
from g2is_graph.store.features import StoreError
from g2is_graph.store.space import lr_weights
from g2is_graph.train.loop import ADAM_FILE, STATE_FILE, train_lora

CHECKPOINT_HINT = "pass a checkpoint-epochN folder that `g2is warmup` wrote (it holds trainer_state.json)"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    epoch: int
    step: int
    epoch_lrs: tuple[float, ...]  # learning rate of each optimizer step taken in this checkpoint's epoch

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        try:
            state = json.loads((path / STATE_FILE).read_text())
            lrs = state["lrs"]
            start, stop = state["epoch_steps"]
            return cls(path, state["epoch"], state["step"], tuple(lrs[start:stop]))
        except FileNotFoundError as exc:
            raise hinted(StoreError(f"{path}: not a g2is warmup checkpoint (no {STATE_FILE})"), CHECKPOINT_HINT) from exc
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise hinted(StoreError(f"{path / STATE_FILE}: corrupted or not written by g2is warmup "
                                    f"({type(exc).__name__})"), CHECKPOINT_HINT) from exc

    @property
    def name(self) -> str:
        return self.path.name

    def adam_state(self, names: Sequence[str]) -> AdamState:
        """The moments flattened in the order of `names` (the gradient's coordinate order)."""
        from safetensors.torch import load_file

        state = json.loads((self.path / STATE_FILE).read_text())
        tensors = load_file(self.path / ADAM_FILE)
        missing = [n for n in names if f"{n}::exp_avg" not in tensors]
        if missing:
            raise hinted(StoreError(f"{self.path / ADAM_FILE}: no Adam state for {len(missing)} parameters, "
                                    f"e.g. {missing[0]}; the adapter and the state do not match"), CHECKPOINT_HINT)
        exp_avg = torch.cat([tensors[f"{n}::exp_avg"].float().reshape(-1) for n in names])
        exp_avg_sq = torch.cat([tensors[f"{n}::exp_avg_sq"].float().reshape(-1) for n in names])
        return AdamState(exp_avg, exp_avg_sq, state["step"], state["beta1"], state["beta2"], state["eps"])

    def identity(self) -> dict:
        from g2is_graph.model.loading import weights_sha256

        return {"name": self.name, "epoch": self.epoch, "step": self.step,
                "mean_lr": float(np.mean(self.epoch_lrs)) if self.epoch_lrs else 0.0,
                "adapter_sha256": weights_sha256(self.path)}


def checkpoint_weights(checkpoints: Sequence[Checkpoint]) -> list[float]:
    """LESS checkpoint weights of warmup checkpoints (`store.space.lr_weights` of their mean epoch rates)."""
    return list(lr_weights([float(np.mean(c.epoch_lrs)) if c.epoch_lrs else 0.0 for c in checkpoints]))


def sample_warmup_indices(n: int, config: WarmupConfig) -> list[int]:
    count = max(1, round(config.fraction * n))
    if config.max_examples is not None:
        count = min(count, config.max_examples)
    rng = np.random.default_rng(config.seed)
    return sorted(int(i) for i in rng.choice(n, size=count, replace=False))


def run_warmup(pool: Sequence[str | Path], model_spec: str | Path, out_dir: str | Path, config: WarmupConfig,
               data_config: DataConfig, echo=print, progress: bool = True, ranks: Ranks | None = None) -> list[Checkpoint]:
    """`ranks` (default: from the launcher's environment) makes this process one data-parallel rank."""
    ranks = ranks_from_env() if ranks is None else ranks
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = rank_device(ranks, config.device)
    if not ranks.is_main:
        echo, progress = (lambda message: None), False
    tokenizer = load_tokenizer(model_spec)
    with tempfile.TemporaryDirectory() as elsewhere:  # one skip report per job: rank 0's
        records, encoded = load_pool(pool, tokenizer, data_config, out_dir if ranks.is_main else Path(elsewhere), echo)
    chosen = sample_warmup_indices(len(records), config)
    manifest = {"config": to_jsonable(config), "data": data_config.identity(), "pool": [str(p) for p in pool],
                "model": model_identity(model_spec).as_dict(), "warmup_ids": [records[i].id for i in chosen],
                "device": device.split(":")[0] if ranks.distributed else device}
    manifest_path = out_dir / "warmup.json"
    with process_group(ranks, device):
        if ranks.is_main:
            write_or_check(manifest_path, manifest, ("config", "data", "model", "warmup_ids"), "warmup")
        barrier(ranks)
        if not ranks.is_main:  # every rank checks that it resumes the run rank 0 described
            write_or_check(manifest_path, manifest, ("config", "data", "model", "warmup_ids"), "warmup")
        paths = train_lora(encoded, chosen, tokenizer.pad_token_id, model_spec, out_dir, config, "warmup", echo,
                           progress, ranks, device)
    return [Checkpoint.load(p) for p in paths]

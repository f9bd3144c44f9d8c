"""LoRA warmup (the LESS recipe): train on a seeded random fraction of the pool, one checkpoint per epoch.

Each checkpoint directory holds the peft adapter, `adam_state.safetensors` with exp_avg/exp_avg_sq keyed
by parameter name (plain HF Trainer checkpoints key them by integer index, which is LESS's most reported
failure), and `trainer_state.json` with the step count and the learning rate of every optimizer step, from
which checkpoint weights (mean lr per epoch, renormalised) are computed. An interrupted warmup resumes from
its last complete epoch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from g2is_graph.config import ConfigError, DataConfig, WarmupConfig, to_jsonable
from g2is_graph.data import collate, load_pool
from g2is_graph.gradients import AdamState, per_example_loss
from g2is_graph.model import add_lora, load_base_model, load_tokenizer, lora_parameters, model_identity, pick_device

ADAM_FILE = "adam_state.safetensors"
STATE_FILE = "trainer_state.json"


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
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path}: not a g2is warmup checkpoint (no {STATE_FILE})") from exc
        lrs = state["lrs"]
        start, stop = state["epoch_steps"]
        return cls(path, state["epoch"], state["step"], tuple(lrs[start:stop]))

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
            raise KeyError(f"{self.path / ADAM_FILE}: no Adam state for {len(missing)} parameters, "
                           f"e.g. {missing[0]}; the adapter and the state do not match")
        exp_avg = torch.cat([tensors[f"{n}::exp_avg"].float().reshape(-1) for n in names])
        exp_avg_sq = torch.cat([tensors[f"{n}::exp_avg_sq"].float().reshape(-1) for n in names])
        return AdamState(exp_avg, exp_avg_sq, state["step"], state["beta1"], state["beta2"], state["eps"])

    def identity(self) -> dict:
        from g2is_graph.model import weights_sha256

        return {"name": self.name, "epoch": self.epoch, "step": self.step,
                "mean_lr": float(np.mean(self.epoch_lrs)) if self.epoch_lrs else 0.0,
                "adapter_sha256": weights_sha256(self.path)}


def checkpoint_weights(checkpoints: Sequence[Checkpoint]) -> list[float]:
    """LESS checkpoint weights: each epoch's mean learning rate, renormalised to sum to 1."""
    means = [float(np.mean(c.epoch_lrs)) if c.epoch_lrs else 0.0 for c in checkpoints]
    total = sum(means)
    if total <= 0:
        raise ValueError("checkpoint learning rates are all zero; cannot weight checkpoints")
    return [m / total for m in means]


def linear_schedule(step: int, total: int, warmup: int, lr: float) -> float:
    """HF's linear schedule with warmup: lr at optimizer step `step` (0-based)."""
    if step < warmup:
        return lr * (step + 1) / max(1, warmup) if warmup else lr
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def sample_warmup_indices(n: int, config: WarmupConfig) -> list[int]:
    count = max(1, round(config.fraction * n))
    if config.max_examples is not None:
        count = min(count, config.max_examples)
    rng = np.random.default_rng(config.seed)
    return sorted(int(i) for i in rng.choice(n, size=count, replace=False))


def run_warmup(pool: Sequence[str | Path], model_spec: str | Path, out_dir: str | Path, config: WarmupConfig,
               data_config: DataConfig, echo=print, progress: bool = True) -> list[Checkpoint]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device)
    tokenizer = load_tokenizer(model_spec)
    records, encoded = load_pool(pool, tokenizer, data_config, out_dir, echo)
    chosen = sample_warmup_indices(len(records), config)
    manifest = {"config": to_jsonable(config), "data": to_jsonable(data_config), "pool": [str(p) for p in pool],
                "model": model_identity(model_spec).as_dict(), "warmup_ids": [records[i].id for i in chosen],
                "device": device}
    manifest_path = out_dir / "warmup.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        changed = [k for k in ("config", "data", "model", "warmup_ids") if previous.get(k) != manifest[k]]
        if changed:
            raise ConfigError(f"{manifest_path}: an earlier warmup in this directory used different "
                             f"{', '.join(changed)}; use a new output directory")
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2))

    torch.manual_seed(config.seed)
    model = add_lora(load_base_model(model_spec, config.dtype, device), config.lora)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=config.lr, betas=(config.beta1, config.beta2),
                                  eps=config.eps, weight_decay=config.weight_decay)
    per_step = config.batch_size * config.grad_accumulation
    steps_per_epoch = math.ceil(len(chosen) / per_step)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = math.ceil(config.warmup_ratio * total_steps)
    lrs: list[float] = []
    step = 0
    start_epoch = 0
    done = sorted(out_dir.glob("checkpoint-epoch*"), key=lambda p: int(p.name.removeprefix("checkpoint-epoch")))
    done = [p for p in done if (p / STATE_FILE).exists()]
    if done:
        last = done[-1]
        state = json.loads((last / STATE_FILE).read_text())
        _restore(model, optimizer, params, last, state)
        lrs, step, start_epoch = list(state["lrs"]), state["step"], state["epoch"]
        echo(f"resuming warmup after epoch {start_epoch} ({last})")

    model.train()
    checkpoints = [Checkpoint.load(p) for p in done]
    for epoch in range(start_epoch, config.epochs):
        order = np.random.default_rng(config.seed + 1 + epoch).permutation(chosen).tolist()
        torch.manual_seed(config.seed * 1009 + epoch)  # dropout masks per epoch: a resumed run draws the same
        epoch_start = step
        bar = tqdm(total=steps_per_epoch, desc=f"warmup epoch {epoch + 1}/{config.epochs}", unit="step",
                   disable=not progress)
        for s in range(steps_per_epoch):
            group = order[s * per_step:(s + 1) * per_step]
            lr = linear_schedule(step, total_steps, warmup_steps, config.lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            for m in range(0, len(group), config.batch_size):
                batch = [encoded[i] for i in group[m:m + config.batch_size]]
                ids, labels, attention = collate(batch, tokenizer.pad_token_id)
                logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
                loss = per_example_loss(logits, labels.to(device)).sum() / len(group)
                loss.backward()
            optimizer.step()
            lrs.append(lr)
            step += 1
            bar.set_postfix(loss=f"{loss.item() * len(group) / max(1, len(batch)):.3f}", lr=f"{lr:.2e}")
            bar.update(1)
        bar.close()
        path = _save_checkpoint(out_dir, model, optimizer, params, config, epoch + 1, step, lrs, (epoch_start, step))
        checkpoints.append(Checkpoint.load(path))
    return checkpoints


def _save_checkpoint(out_dir: Path, model, optimizer, params, config: WarmupConfig, epoch: int, step: int,
                     lrs: list[float], epoch_steps: tuple[int, int]) -> Path:
    from safetensors.torch import save_file

    final = out_dir / f"checkpoint-epoch{epoch}"
    staging = out_dir / f".checkpoint-epoch{epoch}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging)
    moments = {}
    for name, p in params:
        state = optimizer.state[p]
        moments[f"{name}::exp_avg"] = state["exp_avg"].detach().cpu().contiguous()
        moments[f"{name}::exp_avg_sq"] = state["exp_avg_sq"].detach().cpu().contiguous()
    save_file(moments, staging / ADAM_FILE)
    state = {"epoch": epoch, "step": step, "lrs": lrs, "epoch_steps": list(epoch_steps), "beta1": config.beta1,
             "beta2": config.beta2, "eps": config.eps, "parameter_names": [n for n, _ in params],
             "config": to_jsonable(config)}
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def _restore(model, optimizer, params, path: Path, state: dict) -> None:
    from safetensors.torch import load_file

    adapter = load_file(path / "adapter_model.safetensors")
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, adapter)
    moments = load_file(path / ADAM_FILE)
    for name, p in params:
        optimizer.state[p] = {"step": torch.tensor(float(state["step"])),
                              "exp_avg": moments[f"{name}::exp_avg"].to(p.device, p.dtype),
                              "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device, p.dtype)}

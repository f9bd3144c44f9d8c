"""The LoRA training loop shared by the warmup (LESS recipe) and fine-tuning (G2IS appendix B).

One checkpoint per epoch: the peft adapter, `adam_state.safetensors` with exp_avg/exp_avg_sq keyed by
parameter name (plain HF Trainer checkpoints key them by integer index, LESS's most reported failure), and
`trainer_state.json` with the step count and the learning rate of every optimizer step. A run resumes
from its last complete epoch, with the same data order and dropout masks as an uninterrupted one. Every
optimizer step appends {step, epoch, lr, loss} to `train_log.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from g2is_graph.config import to_jsonable
from g2is_graph.data.records import Encoded, collate
from g2is_graph.errors import ConfigError
from g2is_graph.grads.gradients import per_example_loss
from g2is_graph.model.loading import add_lora, load_base_model, lora_parameters, pick_device

ADAM_FILE = "adam_state.safetensors"
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"



def linear_schedule(step: int, total: int, warmup: int, lr: float) -> float:
    """HF's linear schedule with warmup: lr at optimizer step `step` (0-based)."""
    if step < warmup:
        return lr * (step + 1) / max(1, warmup) if warmup else lr
    return lr * max(0.0, (total - step) / max(1, total - warmup))


def cosine_schedule(step: int, total: int, warmup: int, lr: float) -> float:
    """HF's cosine schedule with linear warmup."""
    if step < warmup:
        return lr * (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def train_lora(encoded: Sequence[Encoded], chosen: Sequence[int], pad_id: int, model_spec: str | Path,
               out_dir: Path, config, label: str, echo=print, progress: bool = True) -> list[Path]:
    """Train a fresh LoRA adapter on encoded[chosen]; `config` is a WarmupConfig or FinetuneConfig."""
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, not {config.schedule!r}")
    if not chosen:
        raise ConfigError(f"no examples to {label} on")
    schedule = SCHEDULES[config.schedule]
    device = pick_device(config.device)
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
        state = json.loads((done[-1] / STATE_FILE).read_text())
        _restore(model, optimizer, params, done[-1], state)
        lrs, step, start_epoch = list(state["lrs"]), state["step"], state["epoch"]
        echo(f"resuming {label} after epoch {start_epoch} ({done[-1]})")
    _truncate_log(out_dir / LOG_FILE, step)

    model.train()
    paths = list(done)
    with open(out_dir / LOG_FILE, "a") as log:
        for epoch in range(start_epoch, config.epochs):
            order = np.random.default_rng(config.seed + 1 + epoch).permutation(list(chosen)).tolist()
            torch.manual_seed(config.seed * 1009 + epoch)  # dropout masks per epoch: a resumed run draws the same
            epoch_start = step
            bar = tqdm(total=steps_per_epoch, desc=f"{label} epoch {epoch + 1}/{config.epochs}", unit="step",
                       disable=not progress)
            for s in range(steps_per_epoch):
                group = order[s * per_step:(s + 1) * per_step]
                lr = schedule(step, total_steps, warmup_steps, config.lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                total_loss = 0.0
                for m in range(0, len(group), config.batch_size):
                    batch = [encoded[i] for i in group[m:m + config.batch_size]]
                    ids, labels, attention = collate(batch, pad_id)
                    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
                    loss = per_example_loss(logits, labels.to(device)).sum() / len(group)
                    loss.backward()
                    total_loss += loss.item()
                optimizer.step()
                lrs.append(lr)
                step += 1
                log.write(json.dumps({"step": step, "epoch": epoch + 1, "lr": lr, "loss": total_loss}) + "\n")
                bar.set_postfix(loss=f"{total_loss:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
            bar.close()
            log.flush()
            paths.append(_save_checkpoint(out_dir, model, optimizer, params, config, epoch + 1, step, lrs,
                                          (epoch_start, step)))
    return paths


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the restored checkpoint (they will be run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _save_checkpoint(out_dir: Path, model, optimizer, params, config, epoch: int, step: int,
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
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    moments = load_file(path / ADAM_FILE)
    for name, p in params:
        optimizer.state[p] = {"step": torch.tensor(float(state["step"])),
                              "exp_avg": moments[f"{name}::exp_avg"].to(p.device, p.dtype),
                              "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device, p.dtype)}

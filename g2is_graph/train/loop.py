"""The LoRA training loop shared by the warmup (LESS recipe) and fine-tuning (G2IS appendix B).

One checkpoint per epoch: the peft adapter, `adam_state.safetensors` with exp_avg/exp_avg_sq keyed by
parameter name (plain HF Trainer checkpoints key them by integer index, LESS's most reported failure), and
`trainer_state.json` with the step count and the learning rate of every optimizer step. A run resumes
from its last complete epoch, with the same data order and dropout masks as an uninterrupted one. Every
optimizer step appends {step, epoch, lr, loss} to `train_log.jsonl`.

Under torchrun or `accelerate launch` the run is data-parallel: micro-batch m of every optimizer step goes
to rank m % WORLD_SIZE, the ranks' summed LoRA gradients are all-reduced once per step (what DDP does,
written out so that a step with fewer micro-batches than ranks works and parameter names stay those of
the plain model), every rank takes the same optimizer step, and rank 0 writes checkpoints and the log.
Dropout masks are drawn per micro-batch from (seed, epoch, step, micro-batch), so the ranks draw the
masks one process would: the run differs from a single-process one only by the order of the sums.
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
from g2is_graph.distributed import Ranks, all_reduce_sum, barrier
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


def micro_batch_seed(seed: int, epoch: int, step: int, micro: int) -> int:
    """The torch seed of one micro-batch's dropout masks: the same whichever rank runs it."""
    return int(np.random.SeedSequence([seed, epoch, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def train_lora(encoded: Sequence[Encoded], chosen: Sequence[int], pad_id: int, model_spec: str | Path,
               out_dir: Path, config, label: str, echo=print, progress: bool = True, ranks: Ranks = Ranks(),
               device: str | None = None) -> list[Path]:
    """Train a fresh LoRA adapter on encoded[chosen]; `config` is a WarmupConfig or FinetuneConfig.

    With `ranks` of a launched job (inside its process group) this process is one data-parallel rank."""
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, not {config.schedule!r}")
    if not chosen:
        raise ConfigError(f"no examples to {label} on")
    schedule = SCHEDULES[config.schedule]
    device = device or pick_device(config.device)
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
    if ranks.is_main:
        _truncate_log(out_dir / LOG_FILE, step)

    model.train()
    paths = list(done)
    with open(out_dir / LOG_FILE, "a") if ranks.is_main else open(os.devnull, "w") as log:
        for epoch in range(start_epoch, config.epochs):
            order = np.random.default_rng(config.seed + 1 + epoch).permutation(list(chosen)).tolist()
            epoch_start = step
            bar = tqdm(total=steps_per_epoch, desc=f"{label} epoch {epoch + 1}/{config.epochs}", unit="step",
                       disable=not progress or not ranks.is_main)
            for s in range(steps_per_epoch):
                group = order[s * per_step:(s + 1) * per_step]
                lr = schedule(step, total_steps, warmup_steps, config.lr)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                total_loss = torch.zeros((), dtype=torch.float64, device=device)
                for micro, m in enumerate(range(0, len(group), config.batch_size)):
                    if micro % ranks.world_size != ranks.rank:
                        continue
                    torch.manual_seed(micro_batch_seed(config.seed, epoch, step, micro))
                    batch = [encoded[i] for i in group[m:m + config.batch_size]]
                    ids, labels, attention = collate(batch, pad_id)
                    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
                    loss = per_example_loss(logits, labels.to(device)).sum() / len(group)
                    loss.backward()
                    total_loss += loss.detach()
                if ranks.distributed:
                    total_loss = _sum_over_ranks(ranks, params, total_loss)
                optimizer.step()
                lrs.append(lr)
                step += 1
                log.write(json.dumps({"step": step, "epoch": epoch + 1, "lr": lr, "loss": float(total_loss)}) + "\n")
                bar.set_postfix(loss=f"{float(total_loss):.3f}", lr=f"{lr:.2e}")
                bar.update(1)
            bar.close()
            log.flush()
            final = out_dir / f"checkpoint-epoch{epoch + 1}"
            if ranks.is_main:
                _save_checkpoint(out_dir, model, optimizer, params, config, epoch + 1, step, lrs, (epoch_start, step))
            barrier(ranks)  # the checkpoint exists for every rank before any goes on
            paths.append(final)
    return paths


def _sum_over_ranks(ranks: Ranks, params, total_loss: torch.Tensor) -> torch.Tensor:
    """Sum every LoRA gradient (a rank without micro-batches in this step contributes zeros) and the step's
    loss over the ranks, in one all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [total_loss.float().reshape(1)])
    all_reduce_sum(ranks, flat)
    offset = 0
    for (_, p), g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(p.dtype)
        offset += g.numel()
    return flat[-1].double()


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines of steps after the restored checkpoint (they will be run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _save_checkpoint(out_dir: Path, model, optimizer, params, config, epoch: int, step: int,
                     lrs: list[float], epoch_steps: tuple[int, int]) -> None:
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


def _restore(model, optimizer, params, path: Path, state: dict) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    moments = load_file(path / ADAM_FILE)
    for name, p in params:
        optimizer.state[p] = {"step": torch.tensor(float(state["step"])),
                              "exp_avg": moments[f"{name}::exp_avg"].to(p.device, p.dtype),
                              "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device, p.dtype)}

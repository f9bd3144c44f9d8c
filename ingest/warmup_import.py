"""Reuse a warmup someone already ran: HF Trainer / TRL / LLaMA-Factory LoRA checkpoints as g2is checkpoints.

Those trainers save `optimizer.pt`, torch's optimizer state_dict, whose Adam moments are keyed by integer
position, not by parameter name (LESS's most reported failure is that it cannot use them). The positions follow
the Trainer's parameter groups: the trainable parameters in `named_parameters()` order, those with weight decay
first and those without (biases, norms) after. The names are recovered by loading the adapter on the base
model exactly as the gradient job will, rebuilding that order, and checking every group size and every moment's
shape against it; anything that does not line up is refused, never guessed. The learning rates are the ones
`trainer_state.json` logged (HF logs the rate each logged step used): a checkpoint's "epoch" is the interval
since the previous imported checkpoint, and its LESS weight is the mean rate logged in it; an interval without
a logged rate takes the scheduler's last rate from `scheduler.pt` and says so.

Output per checkpoint, in the layout of the g2is warmup (`g2is_graph/training.py`): the adapter files,
`adam_state.safetensors` (name::exp_avg / name::exp_avg_sq) and `trainer_state.json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from g2is_graph.errors import WarmupImportError
from g2is_graph.model.loading import ModelError, load_with_adapter, model_identity
from g2is_graph.train.finetune import ADAPTER_FILES
from g2is_graph.train.loop import ADAM_FILE, STATE_FILE

from .warmup import Checkpoint

TRAINER_FILES = ADAPTER_FILES + ("optimizer.pt", "trainer_state.json")
NO_DECAY_PATTERNS = [re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                             r"_norm(?:$|\.)")]
IMPORT_MANIFEST = "import.json"


@dataclass(frozen=True)
class TrainerCheckpoint:
    path: Path
    step: int
    epoch: float
    log_history: tuple[dict[str, Any], ...]

    @classmethod
    def read(cls, path: str | Path) -> "TrainerCheckpoint":
        path = Path(path)
        if not path.is_dir():
            raise WarmupImportError(f"{path}: not a directory")
        missing = [name for name in TRAINER_FILES if not (path / name).is_file()]
        if missing:
            hint = (" (DeepSpeed and FSDP checkpoints keep the optimizer elsewhere; save with the plain Trainer "
                    "optimizer, or consolidate first)" if "optimizer.pt" in missing else "")
            raise WarmupImportError(f"{path}: missing {', '.join(missing)}; expected a LoRA checkpoint of the HF "
                                    f"Trainer (TRL, LLaMA-Factory){hint}")
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            return cls(path, int(state["global_step"]), float(state.get("epoch") or 0.0),
                       tuple(state.get("log_history") or ()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise WarmupImportError(f"{path / 'trainer_state.json'}: unreadable ({exc})") from exc


def decays(name: str) -> bool:
    """Whether the HF Trainer puts this parameter in its weight-decay group (not a bias or a norm)."""
    return not any(p.search(name.lower()) for p in NO_DECAY_PATTERNS)


def trainer_order(model) -> tuple[list[tuple[str, torch.nn.Parameter]], int]:
    """The trainable parameters in the position order of the Trainer's optimizer state, and how many of them
    (the first ones) are in its weight-decay group."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in trainable if decays(n) and id(p) not in norm_params]
    rest = [(n, p) for n, p in trainable if not (decays(n) and id(p) not in norm_params)]
    return decay + rest, len(decay)


def named_moments(checkpoint: TrainerCheckpoint, order: list[tuple[str, torch.nn.Parameter]], n_decay: int
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{name::exp_avg, name::exp_avg_sq} from optimizer.pt, and the Adam hyper-parameters it records."""
    source = checkpoint.path / "optimizer.pt"
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise WarmupImportError(f"{source}: not a torch optimizer state ({exc})") from exc
    if not isinstance(saved, dict) or "state" not in saved or "param_groups" not in saved:
        raise WarmupImportError(f"{source}: not a torch optimizer state_dict (no state / param_groups)")
    groups = saved["param_groups"]
    positions = [i for g in groups for i in g["params"]]
    sizes = [len(g["params"]) for g in groups]
    if len(positions) != len(order):
        raise WarmupImportError(f"{source}: the optimizer holds {len(positions)} parameters in groups of {sizes}, "
                                f"but the adapter on this base model has {len(order)} trainable parameters; "
                                "it is not this adapter's optimizer, or --model is not its base model")
    if len(groups) == 2 and sizes[0] != n_decay:
        raise WarmupImportError(f"{source}: the weight-decay group holds {sizes[0]} parameters, the adapter has "
                                f"{n_decay} that decay; the parameter order cannot be trusted")
    moments: dict[str, torch.Tensor] = {}
    steps = set()
    for position, (name, param) in zip(positions, order):
        state = saved["state"].get(position)
        if state is None:
            raise WarmupImportError(f"{source}: no optimizer state for parameter {position} ({name}); it was "
                                    "never updated")
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            raise WarmupImportError(f"{source}: parameter {position} has state {sorted(state)}, not Adam's exp_avg "
                                    "and exp_avg_sq (Adafactor, 8-bit and other optimizers cannot be used)")
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(state[key].shape) != tuple(param.shape):
                raise WarmupImportError(f"{source}: {key} of parameter {position} has shape {tuple(state[key].shape)}"
                                        f", but {name} has shape {tuple(param.shape)} on this base model")
            moments[f"{name}::{key}"] = state[key].detach().float().contiguous()
        steps.add(int(float(state["step"])))
    if len(steps) != 1:
        raise WarmupImportError(f"{source}: parameters were stepped different numbers of times ({sorted(steps)})")
    first = groups[0]
    betas = first.get("betas", (0.9, 0.999))
    hyper = {"step": steps.pop(), "beta1": float(betas[0]), "beta2": float(betas[1]), "eps": float(first["eps"]),
             "weight_decay": [float(g.get("weight_decay", 0.0)) for g in groups]}
    return moments, hyper


def interval_lrs(checkpoint: TrainerCheckpoint, history: Sequence[dict[str, Any]], after_step: int
                 ) -> tuple[list[int], list[float], str]:
    """(steps, learning rates) logged in (after_step, checkpoint.step], and where they came from."""
    logged = [(int(e["step"]), float(e["learning_rate"])) for e in history
              if "learning_rate" in e and after_step < int(e.get("step", -1)) <= checkpoint.step]
    if logged:
        return [s for s, _ in logged], [lr for _, lr in logged], "trainer_state.json log_history"
    scheduler = checkpoint.path / "scheduler.pt"
    try:
        last = torch.load(scheduler, map_location="cpu", weights_only=True)["_last_lr"]
    except Exception as exc:  # noqa: BLE001
        raise WarmupImportError(f"{checkpoint.path}: no learning rate was logged between steps {after_step} and "
                                f"{checkpoint.step} and {scheduler} is unreadable ({exc}); train with a "
                                "logging_steps no larger than the checkpoint interval") from exc
    return [checkpoint.step], [float(last[0])], "scheduler.pt _last_lr (none logged in the interval)"


def import_checkpoints(sources: Sequence[str | Path], model_spec: str | Path, out_dir: str | Path,
                       echo=print) -> list[Checkpoint]:
    """Each trainer checkpoint of one run (any order) as a g2is checkpoint under out_dir, by step."""
    checkpoints = sorted((TrainerCheckpoint.read(s) for s in sources), key=lambda c: c.step)
    steps = [c.step for c in checkpoints]
    if len(set(steps)) != len(steps):
        raise WarmupImportError(f"two checkpoints at the same step: {steps}")
    names = [c.path.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise WarmupImportError(f"checkpoint folder names must differ (they name the g2is checkpoints): {names}")
    history = max((c.log_history for c in checkpoints), key=len)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[Checkpoint] = []
    all_steps: list[int] = []
    all_lrs: list[float] = []
    previous = 0
    for ordinal, checkpoint in enumerate(checkpoints, start=1):
        try:
            model = load_with_adapter(model_spec, checkpoint.path, trainable=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            if isinstance(exc, ModelError):
                raise
            raise WarmupImportError(f"{checkpoint.path}: the adapter does not fit the base model {model_spec} "
                                    f"({str(exc).splitlines()[0][:300]})") from exc
        order, n_decay = trainer_order(model)
        moments, hyper = named_moments(checkpoint, order, n_decay)
        lora = [n for n, _ in order if "lora_" in n]
        others = [n for n, _ in order if "lora_" not in n]
        if not lora:
            raise WarmupImportError(f"{checkpoint.path}: the adapter has no LoRA parameters")
        if others:
            echo(f"{checkpoint.path.name}: {len(others)} trainable non-LoRA parameters (e.g. {others[0]}) are kept "
                 "in the adapter but are not part of the gradient features")
        lr_steps, lrs, lr_source = interval_lrs(checkpoint, history, previous)
        start = len(all_lrs)
        all_steps += lr_steps
        all_lrs += lrs
        state = {"epoch": ordinal, "step": hyper["step"], "lrs": list(all_lrs), "lr_steps": list(all_steps),
                 "epoch_steps": [start, len(all_lrs)], "beta1": hyper["beta1"], "beta2": hyper["beta2"],
                 "eps": hyper["eps"], "parameter_names": lora,
                 "config": {"imported_from": str(checkpoint.path.resolve()), "trainer_global_step": checkpoint.step,
                            "trainer_epoch": checkpoint.epoch, "weight_decay": hyper["weight_decay"],
                            "lr_source": lr_source}}
        done.append(Checkpoint.load(_write(out_dir, checkpoint, moments, lora, state)))
        previous = checkpoint.step
        del model
    manifest = {"sources": [str(c.path.resolve()) for c in checkpoints], "model": model_identity(model_spec).as_dict(),
                "checkpoints": [c.path.name for c in done]}
    (out_dir / IMPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return done


def _write(out_dir: Path, checkpoint: TrainerCheckpoint, moments: dict[str, torch.Tensor], names: list[str],
           state: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    final = out_dir / checkpoint.path.name
    staging = out_dir / f".{checkpoint.path.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy2(checkpoint.path / name, staging / name)
    save_file({f"{n}::{k}": moments[f"{n}::{k}"] for n in names for k in ("exp_avg", "exp_avg_sq")},
              staging / ADAM_FILE)
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final

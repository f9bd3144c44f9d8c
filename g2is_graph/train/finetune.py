"""LoRA fine-tuning on a selection (or any jsonl): the G2IS paper's appendix B recipe, resumable.

Output directory: checkpoint-epochN/ (resumable state), train_log.jsonl (every optimizer step),
finetune.json (the effective config, data, model identity and the records' hash) and adapter/, the
final adapter, which loads with plain peft: PeftModel.from_pretrained(base_model, "<out>/adapter").

The adapter travels: adapter_config.json names the base model by an identity that means the same on another
machine (a hub id, or the sha256 of its weights; never a local cache path), the tokenizer (with its chat
template) is saved beside it, and README.md is a model card with the base, the LoRA shape, the training data
and recipe, and how to serve it (vLLM needs --max-lora-rank at least r) and evaluate it (lm-eval with
--apply_chat_template renders prompts as training did).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from g2is_graph.config import DataConfig, FinetuneConfig, to_jsonable
from g2is_graph.data.records import load_pool
from g2is_graph.errors import ConfigError
from g2is_graph.model.loading import load_tokenizer, model_identity, resolve_model
from g2is_graph.provenance import write_or_check
from g2is_graph.store.features import records_sha256
from g2is_graph.train.loop import LOG_FILE, train_lora

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
HUB_CACHE_FOLDER = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]+)")
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values (default 16)


@dataclass
class FinetuneResult:
    adapter: Path
    n_examples: int
    steps: int
    final_loss: float | None


def run_finetune(paths: Sequence[str | Path], model_spec: str | Path, out_dir: str | Path, config: FinetuneConfig,
                 data_config: DataConfig, echo=print, progress: bool = True) -> FinetuneResult:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_spec)
    records, encoded = load_pool(paths, tokenizer, data_config, out_dir, echo)
    if not records:
        raise ConfigError("no usable records in " + ", ".join(str(p) for p in paths))
    manifest = {"config": to_jsonable(config), "data": data_config.identity(), "records": [str(p) for p in paths],
                "records_sha256": records_sha256([{"id": r.id, "content_hash": r.content_hash} for r in records]),
                "n_examples": len(records), "model": model_identity(model_spec).as_dict()}
    manifest_path = out_dir / "finetune.json"
    write_or_check(manifest_path, manifest, ("config", "data", "records_sha256", "model"), "fine-tuning")
    checkpoints = train_lora(encoded, list(range(len(records))), tokenizer.pad_token_id, model_spec, out_dir, config,
                             "finetune", echo, progress)
    log = [json.loads(line) for line in (out_dir / LOG_FILE).read_text().splitlines() if line.strip()]
    base = base_model_identity(model_spec, config.base_model)
    adapter = out_dir / "adapter"
    staging = out_dir / ".adapter.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy2(checkpoints[-1] / name, staging / name)
    adapter_config = json.loads((staging / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base["name"]
    adapter_config["revision"] = base.get("revision")
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    tokenizer.save_pretrained(staging)
    (staging / "README.md").write_text(model_card(base, config, data_config, manifest, paths, log))
    if adapter.exists():
        shutil.rmtree(adapter)
    staging.rename(adapter)
    return FinetuneResult(adapter, len(records), len(log), log[-1]["loss"] if log else None)


def base_model_identity(model_spec: str | Path, name: str | None = None) -> dict[str, Any]:
    """How the adapter names its base: the given hub id, the id of a Hugging Face cache folder, or the weights'
    sha256; with the weights' sha256 and the file or folder name (not its path) for the model card."""
    identity = model_identity(model_spec)
    out: dict[str, Any] = {"weights_sha256": identity.weights_sha256, "source": Path(model_spec).name}
    cached = HUB_CACHE_FOLDER.search(str(resolve_model(model_spec).resolve()))
    if name:
        out["name"] = name
    elif cached:
        out.update(name=f"{cached.group(1)}/{cached.group(2)}", revision=cached.group(3))
    else:
        out["name"] = f"sha256:{identity.weights_sha256}"
    out["hub_id"] = not out["name"].startswith("sha256:")
    return out


def vllm_rank(r: int) -> int:
    return next((v for v in VLLM_LORA_RANKS if v >= r), r)


def model_card(base: dict[str, Any], config: FinetuneConfig, data: DataConfig, manifest: dict[str, Any],
               records: Sequence[str | Path], log: list[dict[str, Any]]) -> str:
    """README.md of the adapter: what it is, what it was trained on and how, and how to use it elsewhere."""
    run = _selection_of(records)
    lora = config.lora
    header = ["---", "library_name: peft", "pipeline_tag: text-generation", "tags:", "- lora", "- g2is"]
    if base["hub_id"]:
        header.insert(1, f"base_model: {base['name']}")
    header.append("---")
    base_line = (f"`{base['name']}`" + (f" (revision `{base['revision']}`)" if base.get("revision") else "")
                 if base["hub_id"] else "not a hub model")
    serve_base = base["name"] if base["hub_id"] else "BASE_MODEL"
    selection = (f"the selection of g2is run `{run['run']}` (method `{run['method']}`, {run['n_selected']} of "
                 f"{run['n_pool']} pool samples)" if run else ", ".join(Path(r).name for r in records))
    lines = header + [
        "", "# LoRA adapter trained by g2is", "",
        f"- Base model: {base_line}; weights sha256 `{base['weights_sha256']}` (from `{base['source']}`). "
        "Load the adapter on exactly these weights.",
        f"- LoRA: r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, target modules "
        f"{', '.join(lora.target_modules)}.",
        f"- Training data: {selection}; {manifest['n_examples']} examples, records sha256 "
        f"`{manifest['records_sha256'][:16]}`.",
        f"- Recipe: {config.epochs} epochs, lr {config.lr}, {config.schedule} schedule, warmup ratio "
        f"{config.warmup_ratio}, effective batch {config.batch_size * config.grad_accumulation}, {len(log)} optimizer "
        f"steps, last loss {log[-1]['loss']:.4f}." if log else "- Recipe: no optimizer step was logged.",
        f"- Rendering: {'the tokenizer chat template' if data.template == 'model' else 'the tulu form'} (saved "
        f"beside the adapter), loss on the assistant answers, max length {data.max_length} tokens.",
        "", "## Use", ""]
    if not base["hub_id"]:
        where = (f"for a `.gguf` it is the folder g2is converted it to, `$G2IS_CACHE/models/{Path(base['source']).stem}-"
                 f"{base['weights_sha256'][:16]}` (default cache `~/.cache/g2is`)" if base["source"].endswith(".gguf")
                 else "a folder whose weights have that sha256")
        lines += [f"`BASE_MODEL` below is a local Hugging Face folder of the base: {where}.", ""]
    lines += [
        "peft:", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'base = AutoModelForCausalLM.from_pretrained("{serve_base}")',
        'model = PeftModel.from_pretrained(base, "path/to/this/adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")',
        "```", "",
        f"vLLM (its default --max-lora-rank is 16; this adapter has r {lora.r}):", "", "```",
        f"vllm serve {serve_base} --enable-lora --max-lora-rank {vllm_rank(lora.r)} "
        "--lora-modules g2is=path/to/this/adapter",
        "```", "",
        "lm-eval (the chat template renders prompts as in training):", "", "```",
        f"lm_eval --model hf --model_args pretrained={serve_base},peft=path/to/this/adapter "
        "--apply_chat_template --tasks TASK",
        "```", ""]
    return "\n".join(lines)


def _selection_of(records: Sequence[str | Path]) -> dict[str, Any] | None:
    """The run that wrote these records, when they are one run's selected.jsonl next to its manifest."""
    if len(records) != 1:
        return None
    manifest = Path(records[0]).parent / "manifest.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if {"run", "method", "n_selected", "n_pool"} <= set(data) else None

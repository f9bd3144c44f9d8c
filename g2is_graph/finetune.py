"""LoRA fine-tuning on a selection (or any jsonl): the G2IS paper's appendix B recipe, resumable.

Output directory: checkpoint-epochN/ (resumable state), train_log.jsonl (every optimizer step),
finetune.json (the effective config, data, model identity and the records' hash) and adapter/, the
final adapter, which loads with plain peft: PeftModel.from_pretrained(base_model, "<out>/adapter").
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, DataConfig, FinetuneConfig, to_jsonable
from .data import load_pool
from .model import load_tokenizer, model_identity
from .store import records_sha256
from .training import LOG_FILE, train_lora, write_or_check_manifest

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass
class FinetuneResult:
    adapter: Path
    n_examples: int
    steps: int
    final_loss: float | None


def run_finetune(paths: Sequence[str | Path], model_spec: str | Path, out_dir: str | Path, config: FinetuneConfig,
                 data_config: DataConfig, echo=print, progress: bool = True) -> FinetuneResult:
    config.validate()
    data_config.validate()
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
    write_or_check_manifest(manifest_path, manifest, ("config", "data", "records_sha256", "model"), "fine-tuning")
    checkpoints = train_lora(encoded, list(range(len(records))), tokenizer.pad_token_id, model_spec, out_dir, config,
                             "finetune", echo, progress)
    adapter = out_dir / "adapter"
    staging = out_dir / ".adapter.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy2(checkpoints[-1] / name, staging / name)
    if adapter.exists():
        shutil.rmtree(adapter)
    staging.rename(adapter)
    log = [json.loads(line) for line in (out_dir / LOG_FILE).read_text().splitlines() if line.strip()]
    return FinetuneResult(adapter, len(records), len(log), log[-1]["loss"] if log else None)

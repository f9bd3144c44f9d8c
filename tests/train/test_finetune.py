"""Fine-tuned adapters that travel: the base named by an identity, not a local path; the tokenizer beside the
adapter; a model card; and the folder loads on the base with plain peft and transformers."""

from __future__ import annotations

import json
import shutil

from conftest import write_pool

from g2is_graph.config import DataConfig, FinetuneConfig, LoraSettings
from g2is_graph.model.loading import load_base_model, model_identity
from g2is_graph.train.finetune import base_model_identity, run_finetune

TINY = FinetuneConfig(epochs=1, lr=1e-3, grad_accumulation=4, lora=LoraSettings(r=4, alpha=8))


def test_adapter_names_its_base_carries_its_tokenizer_and_a_model_card(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer

    pool = write_pool(tmp_path / "pool.jsonl", 8, seed=2)
    result = run_finetune([pool], tiny_model, tmp_path / "ft", TINY, DataConfig(max_length=48), echo=lambda m: None,
                          progress=False)
    adapter = result.adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"sha256:{model_identity(tiny_model).weights_sha256}"
    assert str(tmp_path) not in (adapter / "adapter_config.json").read_text()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.chat_template and tokenizer("abc")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model)("abc")["input_ids"]
    card = (adapter / "README.md").read_text()
    assert "library_name: peft" in card and "r 4, alpha 8" in card and "--max-lora-rank 8" in card
    assert "--apply_chat_template" in card and "base_model:" not in card  # no hub id to name
    model = PeftModel.from_pretrained(load_base_model(tiny_model), str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_base_identity_is_a_hub_id_when_known(tiny_model, tmp_path):
    cache = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model, cache)
    found = base_model_identity(cache)
    assert found["name"] == "acme/tiny-chat" and found["revision"] == "0123abcd" and found["hub_id"]
    given = base_model_identity(tiny_model, "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert given["name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and given["source"] == tiny_model.name

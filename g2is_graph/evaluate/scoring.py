"""Evaluation of a base model and adapters on held-out test jsonl.

Metrics:
- answer loss: the mean over test items of each item's mean cross-entropy on its answer tokens (the
  same loss the gradients use), with a 95% bootstrap interval; sensitive even where accuracy is at chance;
- choice accuracy, for items with `choices` (list of strings) and `answer` (index or the choice text):
  the choice whose answer tokens have the largest summed log-likelihood (lm-eval's `acc`).
Outputs: results.json, a table on the terminal, and comparison.png.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from g2is_graph.config import DataConfig, EvaluateConfig, to_jsonable
from g2is_graph.data.records import IGNORE_INDEX, Message, Record, RecordError, collate, encode, read_many
from g2is_graph.errors import ConfigError
from g2is_graph.grads.gradients import per_example_loss
from g2is_graph.model.loading import load_base_model, load_tokenizer, load_with_adapter, model_identity, pick_device


def _choice_items(records: Sequence[Record]) -> list[tuple[Record, list[str], int]]:
    items = []
    for record in records:
        obj = json.loads(record.raw)
        choices = obj.get("choices")
        if choices is None:
            continue
        answer = obj.get("answer")
        if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices) or len(choices) < 2:
            raise RecordError(record.source_file, record.line, "choices", "must be a list of at least 2 non-empty strings")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise RecordError(record.source_file, record.line, "answer", "must be a choice index or one of the choices")
        items.append((record, choices, answer))
    return items


@torch.no_grad()
def answer_losses(model, encoded, pad_id: int, batch_size: int, reduce: str = "mean") -> np.ndarray:
    """Per-example loss over answer tokens: mean (default) or sum (log-likelihood for choices)."""
    device = next(model.parameters()).device
    out = np.empty(len(encoded))
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_tokens)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        ids, labels, attention = collate([encoded[i] for i in idx], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        loss = per_example_loss(logits, labels.to(device))
        if reduce == "sum":
            loss = loss * (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(device)
        out[idx] = loss.float().cpu().numpy()
    return out


def bootstrap_interval(values: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, len(values), len(values))].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate_model(model, tokenizer, records: Sequence[Record], data_config: DataConfig, config: EvaluateConfig,
                   label: str, progress: bool) -> dict[str, Any]:
    model.eval()
    encoded = [encode(r, tokenizer, data_config) for r in records]
    losses = answer_losses(model, encoded, tokenizer.pad_token_id, config.batch_size)
    low, high = bootstrap_interval(losses, config.bootstrap, config.seed)
    result: dict[str, Any] = {"answer_loss": float(losses.mean()), "answer_loss_ci95": [low, high],
                              "n_items": len(records), "item_losses": [float(x) for x in losses]}
    items = _choice_items(records) if config.choices else []
    if items:
        correct = []
        for record, choices, answer in tqdm(items, desc=f"choices {label}", disable=not progress):
            prompt = [m for m in record.messages if m.role != "assistant"]
            start = len(prompt) if record.completion_from is not None else None
            variants = [dataclasses.replace(record, messages=tuple(prompt) + (Message("assistant", c),),
                                            completion_from=start) for c in choices]
            loglik = -answer_losses(model, [encode(v, tokenizer, data_config) for v in variants],
                                    tokenizer.pad_token_id, config.batch_size, reduce="sum")
            correct.append(int(np.argmax(loglik)) == answer)
        result.update(choice_accuracy=float(np.mean(correct)), n_choice_items=len(items),
                      chance=float(np.mean([1 / len(c) for _, c, _ in items])))
    return result


def load_for_evaluation(model_spec: str | Path, adapter: str | Path | None, config: EvaluateConfig, device):
    """The base model (adapter None) or the base with a frozen adapter, in the evaluation dtype."""
    if adapter is None:
        return load_base_model(model_spec, config.dtype, device)
    return load_with_adapter(model_spec, adapter, config.dtype, device, trainable=False)


def run_evaluate(model_spec: str | Path, adapters: dict[str, Path], test_paths: Sequence[str | Path],
                 out_dir: str | Path, data_config: DataConfig, config: EvaluateConfig, include_base: bool = True,
                 progress: bool = True) -> dict[str, Any]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_many(test_paths, sharegpt=data_config.sharegpt, limits=data_config).records
    if not records:
        raise ConfigError("no test records in " + ", ".join(str(p) for p in test_paths))
    device = pick_device(config.device)
    tokenizer = load_tokenizer(model_spec)
    results: dict[str, Any] = {}
    models = ({"base": None} if include_base else {}) | dict(adapters)
    for name, adapter in models.items():
        model = load_for_evaluation(model_spec, adapter, config, device)
        results[name] = evaluate_model(model, tokenizer, records, data_config, config, name, progress)
        results[name]["adapter"] = str(adapter) if adapter else None
        del model
    report = {"model": model_identity(model_spec).as_dict(), "test": [str(p) for p in test_paths],
              "config": to_jsonable(config), "data": to_jsonable(data_config), "results": results}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out_dir / "comparison.png")
    return report


def table(results: dict[str, Any]) -> str:
    lines = [f"{'model':24s} {'answer loss':>12s} {'95% CI':>19s} {'choice acc':>11s}"]
    for name, r in results.items():
        acc = f"{r['choice_accuracy']:.3f}" if "choice_accuracy" in r else "-"
        low, high = r["answer_loss_ci95"]
        lines.append(f"{name:24s} {r['answer_loss']:12.4f} {f'[{low:.4f}, {high:.4f}]':>19s} {acc:>11s}")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    losses = [results[n]["answer_loss"] for n in names]
    errors = np.array([[results[n]["answer_loss"] - results[n]["answer_loss_ci95"][0],
                        results[n]["answer_loss_ci95"][1] - results[n]["answer_loss"]] for n in names]).T
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names)), 3.5))
    ax.bar(names, losses, yerr=errors, capsize=4, color="#4C72B0")
    ax.set_ylabel("mean answer loss (lower is better)")
    ax.set_ylim(min(losses) * 0.95, max(losses) * 1.03)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Featurisation throughput: the batched per-example path vs LESS's batch-size-1 loop, same process.

    python bench/featurize.py --model smollm2 --n 48 --lora-r 8 --dim 8192

Runs, on the same model, LoRA adapter and GSM8K training examples:
  baseline  batch-size-1 autograd per example + dense Rademacher projection every 16 examples (LESS)
  batched   hooks-based per-example gradients in batches + the same projection (every 64 examples)
  batched + sparse   the same with the sparse JL projector
  gradients only     both gradient paths without any projection
and prints examples/s and the ratio to the baseline, plus the largest feature difference between the
baseline and the batched path (they must agree). Timings exclude model loading and the first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.config import DataConfig, LoraSettings, ProjectorConfig  # noqa: E402
from g2is_graph.data.records import collate, encode_all, read_jsonl  # noqa: E402
from g2is_graph.grads.gradients import PerExampleGradients, reference_gradient  # noqa: E402
from g2is_graph.grads.projection import Projector  # noqa: E402
from g2is_graph.model.loading import (  # noqa: E402
    add_lora,
    build_tiny_model,
    load_base_model,
    load_tokenizer,
    pick_device,
    smollm2_gguf,
)

GSM8K = Path(os.environ.get("G2IS_GSM8K", Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"))


def gsm8k_pool(path: Path, n: int) -> Path:
    source = sorted(GSM8K.glob("*train*"))[0]
    with open(source) as fh, open(path, "w") as out:
        for i, line in enumerate(fh):
            if i >= n:
                break
            obj = json.loads(line)
            out.write(json.dumps({"id": f"gsm8k-train-{i}", "prompt": obj["question"], "completion": obj["answer"]}) + "\n")
    return path


def same_shape_random(folder: Path, out: Path) -> Path:
    """A model with `folder`'s config and tokenizer and seeded random weights: the same FLOPs as the real one
    where its weights cannot travel (the GPU machine takes 64 MiB)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(folder, out)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).save_pretrained(out)
    return out


def timed(fn, *args):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or an HF folder")
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--projection-batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--baseline-projector", default="rademacher", choices=["rademacher", "sparse"],
                        help="projector of the baseline and of the 'batched + baseline projector' run; sparse when "
                             "a dense matrix is too large to generate (LoRA r=128: D x dim = 1.2e11 entries)")
    args = parser.parse_args()
    device = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp())
    spec = {"smollm2": smollm2_gguf, "tiny": lambda: build_tiny_model(tmp / "tiny")}.get(args.model, lambda: args.model)()
    if str(spec).startswith("shape:"):
        spec = same_shape_random(Path(str(spec)[6:]), tmp / "shape")
    tokenizer = load_tokenizer(spec)
    records = read_jsonl(gsm8k_pool(tmp / "pool.jsonl", 4 * (args.n + args.batch_size))).records
    records, encoded, _ = encode_all(records, tokenizer, DataConfig(max_length=args.max_length, skip_bad=True))
    warm, encoded = encoded[: args.batch_size], encoded[args.batch_size: args.batch_size + args.n]
    torch.manual_seed(0)
    model = add_lora(load_base_model(spec, args.dtype, device), LoraSettings(r=args.lora_r, alpha=4 * args.lora_r))
    for name, p in model.named_parameters():  # a trained-looking adapter: B is zero at init
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    extractor = PerExampleGradients(model)
    in_dim = extractor.spec.dim
    pad = tokenizer.pad_token_id
    print(f"model {args.model} on {device} ({args.dtype}), LoRA r={args.lora_r}: D = {in_dim:,} gradient "
          f"coordinates, projected to {args.dim}; {len(encoded)} GSM8K examples, mean "
          f"{sum(e.n_tokens for e in encoded) / len(encoded):.0f} tokens")

    def baseline(projector):
        out, pending = [], []
        for e in encoded:
            ids, labels, _ = collate([e], pad)
            pending.append(reference_gradient(model, ids, labels))
            if len(pending) == 16:
                out.append(projector.project(torch.stack(pending)))
                pending = []
        if pending:
            out.append(projector.project(torch.stack(pending)))
        return torch.cat(out)

    def batched(projector):
        order = sorted(range(len(encoded)), key=lambda i: encoded[i].n_tokens)
        out = torch.empty(len(encoded), args.dim, device=projector.device)
        rows, grads = [], []
        for b in range(0, len(order), args.batch_size):
            idx = order[b: b + args.batch_size]
            rows += idx
            grads.append(extractor.compute(*collate([encoded[i] for i in idx], pad))[0])
            if len(rows) >= args.projection_batch or b + args.batch_size >= len(order):
                out[rows] = projector.project(torch.cat(grads))
                rows, grads = [], []
        return out

    dense = Projector(ProjectorConfig(kind=args.baseline_projector, dim=args.dim), in_dim, device)
    sparse = Projector(ProjectorConfig(kind="sparse", dim=args.dim), in_dim, device)
    extractor.compute(*collate(warm, pad))  # warm-up: kernels, allocator
    results = {}
    base_name = f"baseline (bs1 + {args.baseline_projector})"
    base_features, results[base_name] = timed(baseline, dense)
    batch_features, results[f"batched + {args.baseline_projector}"] = timed(batched, dense)
    diff = (base_features - batch_features).abs().max().item() / base_features.abs().max().item()
    print(f"max |baseline - batched| / max |feature| = {diff:.2e}")
    if args.baseline_projector != "sparse":
        _, results["batched + sparse"] = timed(batched, sparse)
    _, results["gradients only, bs1 loop"] = timed(lambda: [reference_gradient(model, *collate([e], pad)[:2])
                                                           for e in encoded])
    by_length = sorted(encoded, key=lambda e: e.n_tokens)
    _, results["gradients only, batched"] = timed(lambda: [extractor.compute(*collate(by_length[b:b + args.batch_size], pad))
                                                          for b in range(0, len(by_length), args.batch_size)])
    reference = results[base_name]
    for name, seconds in results.items():
        rate = len(encoded) / seconds
        ratio = f"{reference / seconds:6.2f}x baseline"
        print(f"{name:28s} {seconds:8.2f} s  {rate:8.2f} ex/s  {ratio}")
    g_ratio = results["gradients only, bs1 loop"] / results["gradients only, batched"]
    print(f"gradients only: batched is {g_ratio:.2f}x the batch-size-1 loop")


if __name__ == "__main__":
    main()

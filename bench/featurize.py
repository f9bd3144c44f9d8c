"""Featurisation: speed, memory and fidelity of the streamed per-example path vs LESS's procedure, same process.

    python bench/featurize.py --model smollm2 --n 32 --lora-r 8 --dim 8192
    python bench/featurize.py --model smollm2 --n 32 --lora-r 128 --dim 8192

Runs, on the same model, LoRA adapter and GSM8K training examples:
  baseline        LESS's procedure: batch-size-1 autograd per example, the whole gradients of 16 examples
                  projected together (dense Rademacher; sparse at r=128, where a dense matrix is 1.2e11 entries)
  default         the job's path (g2is_graph.gradients.GradientFeaturizer) with the default projector and
                  autocast: each LoRA weight's per-example gradient projected as it is formed
  <projector> <dtype>   the same path with every projector and model precision asked for (--projectors,
                  --autocasts); the dense projectors regenerate their matrix for every batch (it is D x dim)
  gradients only  the bs1 loop and the batched backward without any projection
Speed: examples/s and the ratio to the baseline; timings exclude model loading and the first batch.
Memory: how far each path raises the process's peak resident set (Linux VmHWM) above where it started.
Fidelity: exact float32 gradients from plain batch-size-1 autograd of --fidelity-n examples (SGD) and their
Adam features (moments from --adam-steps real AdamW steps on other examples); per path, the Pearson
correlation between the exact and the projected features' pairwise cosines, and the largest cosine error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from g2is_graph.config import DataConfig, GradientConfig, LoraSettings, ProjectorConfig  # noqa: E402
from g2is_graph.data.records import collate, encode_all, read_jsonl  # noqa: E402
from g2is_graph.grads.gradients import (  # noqa: E402
    AdamState,
    GradientFeaturizer,
    PerExampleGradients,
    adam_feature,
    per_example_loss,
    reference_gradient,
    resolve_autocast,
)
from g2is_graph.grads.projection import Projector  # noqa: E402
from g2is_graph.model.loading import (  # noqa: E402
    add_lora,
    build_tiny_model,
    load_base_model,
    load_tokenizer,
    lora_parameters,
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


def peak_rss_growth(fn, label: str = "", n: int = 0):
    """(fn's value, seconds, bytes by which the peak resident set rose above the resident set at the start);
    with a label, also printed at once (a long run shows its figures as they come)."""
    def rss(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    before = rss("VmRSS:")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grown = rss("VmHWM:") - before
    if torch.cuda.is_available():
        grown = torch.cuda.max_memory_allocated()
    if label:
        print(f"  {label}: {seconds:.2f} s, {n / seconds:.2f} examples/s, peak RSS growth {grown / 2**20:,.0f} MiB "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
    return value, seconds, grown


def pairwise_fidelity(exact: torch.Tensor, projected: torch.Tensor) -> tuple[float, float]:
    """(Pearson r of the pairwise cosines, max |cosine error|) over the upper triangle."""
    def cosines(x):
        x = x.double()
        x = x / x.norm(dim=1, keepdim=True)
        return (x @ x.T).numpy()

    iu = np.triu_indices(exact.shape[0], 1)
    a, b = cosines(exact)[iu], cosines(projected)[iu]
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).max())


def real_adam_state(model, examples, pad: int, steps: int, lr: float = 2e-5) -> AdamState:
    """Moments after `steps` AdamW steps (batch size 1, LESS's betas) on `examples`; the adapter is restored."""
    params = lora_parameters(model)
    saved = [p.detach().clone() for _, p in params]
    optimizer = torch.optim.AdamW([p for _, p in params], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    device = next(model.parameters()).device
    for step in range(steps):
        ids, labels, attention = collate([examples[step % len(examples)]], pad)
        optimizer.zero_grad(set_to_none=True)
        per_example_loss(model(input_ids=ids.to(device)).logits, labels.to(device)).sum().backward()
        optimizer.step()
    state = [optimizer.state[p] for _, p in params]
    adam = AdamState(torch.cat([s["exp_avg"].reshape(-1) for s in state]).float(),
                     torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]).float(), steps, 0.9, 0.999, 1e-8)
    with torch.no_grad():
        for (_, p), value in zip(params, saved):
            p.copy_(value)
            p.grad = None
    return adam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, shape:<HF folder> or an HF folder")
    parser.add_argument("--n", type=int, default=32, help="timed examples")
    parser.add_argument("--fidelity-n", type=int, default=16, help="examples with exact gradients (n(n-1)/2 pairs)")
    parser.add_argument("--adam-steps", type=int, default=8)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=0, help="0: the job's default for the device")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--baseline-projector", default=None, choices=["rademacher", "sparse"],
                        help="default: rademacher (LESS), sparse when a dense matrix would exceed 2e10 entries")
    parser.add_argument("--projectors", default="sparse,rademacher",
                        help="comma list of projectors to time besides the default (dense ones only when D x dim "
                             "is under 2e10 entries)")
    parser.add_argument("--autocasts", default="float32,bfloat16,base-bfloat16")
    parser.add_argument("--skip-gradients-only", action="store_true")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    spec = {"smollm2": smollm2_gguf, "tiny": lambda: build_tiny_model(tmp / "tiny")}.get(args.model, lambda: args.model)()
    if str(spec).startswith("shape:"):
        spec = same_shape_random(Path(str(spec)[6:]), tmp / "shape")
    tokenizer = load_tokenizer(spec)
    need = args.batch_size or 8
    records = read_jsonl(gsm8k_pool(tmp / "pool.jsonl", 4 * (args.n + need + args.adam_steps))).records
    records, encoded, _ = encode_all(records, tokenizer, DataConfig(max_length=args.max_length, skip_bad=True))
    warm, adam_examples = encoded[:need], encoded[need:need + args.adam_steps]
    encoded = encoded[need + args.adam_steps:need + args.adam_steps + args.n]
    model = add_lora(load_base_model(spec, "float32", device), LoraSettings(r=args.lora_r, alpha=4 * args.lora_r))
    for name, p in model.named_parameters():  # a trained-looking adapter: B is zero at init
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    pad = tokenizer.pad_token_id
    adam = real_adam_state(model, adam_examples, pad, args.adam_steps).to(device)
    model.eval()
    extractor = PerExampleGradients(model)
    extractors = {}

    def extractor_for(autocast):
        """A featurizer prepares its model in place (float32: LoRA merged; base-bfloat16: base layers
        converted): those get a copy each; the baseline (the exact gradients) and torch.autocast use the
        untouched model."""
        if autocast not in ("float32", "base-bfloat16"):
            return extractor
        if autocast not in extractors:
            extractors[autocast] = PerExampleGradients(copy.deepcopy(model))
        return extractors[autocast]
    in_dim = extractor.spec.dim
    batch_size = args.batch_size or GradientConfig().batch_for(device)
    dense_ok = in_dim * args.dim <= 2e10
    default_projector = ProjectorConfig(dim=args.dim)
    default_autocast, why = resolve_autocast(GradientConfig().autocast, device)
    baseline_kind = args.baseline_projector or ("rademacher" if dense_ok else "sparse")
    print(f"model {args.model} on {device}, LoRA r={args.lora_r}: D = {in_dim:,} gradient coordinates, projected "
          f"to {args.dim}; {len(encoded)} GSM8K examples, mean {sum(e.n_tokens for e in encoded) / len(encoded):.0f} "
          f"tokens; batch size {batch_size}; default projector {default_projector.kind}, autocast "
          f"{default_autocast} ({why}); threads {torch.get_num_threads()}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    def baseline(projector, examples, with_adam=False):
        out, pending = [], []
        for e in examples:
            ids, labels, _ = collate([e], pad)
            g = reference_gradient(model, ids, labels)
            pending.append(adam_feature(g.unsqueeze(0), adam)[0] if with_adam else g)
            if len(pending) == 16:
                out.append(projector.project(torch.stack(pending)))
                pending = []
        if pending:
            out.append(projector.project(torch.stack(pending)))
        return torch.cat(out)

    def streamed(featurizer, examples):
        order = sorted(range(len(examples)), key=lambda i: examples[i].n_tokens)
        out = torch.empty(len(examples), args.dim, device=featurizer.projector.device)
        for b in range(0, len(order), batch_size):
            idx = order[b: b + batch_size]
            out[idx] = featurizer.features(*collate([examples[i] for i in idx], pad))[0]
        return out

    paths = {"default": (default_projector, default_autocast)}
    for kind in args.projectors.split(","):
        for autocast in args.autocasts.split(","):
            if kind and (kind == "sparse" or dense_ok):
                paths[f"{kind} {autocast}"] = (ProjectorConfig(kind=kind, dim=args.dim), autocast)
    projectors = {}

    def projector_for(config):
        if config not in projectors:
            projectors[config] = Projector(config, in_dim, device)
        return projectors[config]

    # warm-up: kernels, allocator, the projectors' caches
    for config, autocast in paths.values():
        GradientFeaturizer(extractor_for(autocast), projector_for(config), adam,
                           autocast=autocast).features(*collate(warm[:batch_size], pad))

    results = {}
    base_projector = projector_for(ProjectorConfig(kind=baseline_kind, dim=args.dim))
    base_name = f"baseline: bs1 + {baseline_kind} every 16 (LESS)"
    base_features, *results[base_name] = peak_rss_growth(lambda: baseline(base_projector, encoded, True), base_name,
                                                         len(encoded))
    for name, (config, autocast) in paths.items():
        featurizer = GradientFeaturizer(extractor_for(autocast), projector_for(config), adam, autocast=autocast)
        features, *results[name] = peak_rss_growth(lambda: streamed(featurizer, encoded), name, len(encoded))
        if name == f"{baseline_kind} float32":  # the same numbers computed another way: they must agree
            diff = (base_features - features).abs().max().item() / base_features.abs().max().item()
            print(f"max |baseline - {name}| / max |feature| = {diff:.2e}", flush=True)
    if not args.skip_gradients_only:
        _, *results["gradients only, bs1 loop"] = peak_rss_growth(
            lambda: [reference_gradient(model, *collate([e], pad)[:2]) for e in encoded], "gradients only, bs1 loop",
            len(encoded))
        by_length = sorted(encoded, key=lambda e: e.n_tokens)
        for autocast in args.autocasts.split(","):
            _, *results[f"gradients only, batched {autocast}"] = peak_rss_growth(lambda: [
                extractor_for(autocast).stream(*collate(by_length[b:b + batch_size], pad), lambda i, s, g: None,
                                               autocast)
                for b in range(0, len(by_length), batch_size)], f"gradients only, batched {autocast}", len(encoded))
    reference = results[base_name][0]
    print("\n| path | s | examples/s | vs baseline | peak RSS growth |\n|---|---|---|---|---|")
    for name, (seconds, grown) in results.items():
        print(f"| {name} | {seconds:.2f} | {len(encoded) / seconds:.2f} | {reference / seconds:.2f}x | "
              f"{grown / 2**20:,.0f} MiB |")

    fid = encoded[:args.fidelity_n]
    print(f"\nfidelity on {len(fid)} examples ({len(fid) * (len(fid) - 1) // 2} pairs), exact = float32 bs1 autograd",
          flush=True)
    exact_sgd = torch.stack([reference_gradient(model, *collate([e], pad)[:2]).cpu() for e in fid])
    exact_adam = torch.stack([adam_feature(g.unsqueeze(0).to(device), adam)[0].cpu() for g in exact_sgd])
    print("| path | Pearson sgd | max cos err sgd | Pearson adam | max cos err adam |\n|---|---|---|---|---|")
    rows = {base_name: None, **paths}
    for name, setting in rows.items():
        cells = []
        for exact, state in ((exact_sgd, None), (exact_adam, adam)):
            if setting is None:
                projected = baseline(base_projector, fid, state is not None)
            else:
                config, autocast = setting
                projected = streamed(GradientFeaturizer(extractor_for(autocast), projector_for(config), state,
                                                        autocast=autocast), fid)
            cells += pairwise_fidelity(exact, projected.cpu())
        print(f"| {name} | {cells[0]:.4f} | {cells[1]:.4f} | {cells[2]:.4f} | {cells[3]:.4f} |", flush=True)
    print(f"\nprocess peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          f"(includes the exact gradients held for fidelity); load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

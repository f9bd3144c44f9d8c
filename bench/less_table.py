"""Issue 17's table at LESS's own settings: whole `g2is gradients` processes, their peak RSS and fidelity.

    python bench/less_table.py --work /tmp/less-table --n 64 --lora-r 128

On the first N GSM8K training problems: `g2is warmup` with LESS's recipe (LoRA r / alpha 4r on q,k,v,o,
lr 2e-5, batch 1 x 8 accumulation, one epoch on all of them, tulu template; done once per work folder),
then for each --runs entry a fresh `g2is gradients` process over the same N records (timed from start to
exit, peak RSS from wait4), and exact float32 gradients from plain batch-size-1 autograd of the first
--fidelity-n records with the same checkpoint (SGD, and Adam features with the checkpoint's moments),
whose pairwise cosines are compared with those of the stored features (Pearson r, as in the issue).
LESS's own row is quoted from the issue (measured on this class of machine) unless --less-code names a LESS
checkout (github.com/princeton-nlp/LESS; with --less-path for its `trak` and `datasets` if this venv lacks
them): then LESS's own `less.data_selection.get_info` runs too, in a fresh process on the same checkpoint
and records (as `messages`, which its tulu format renders as our tulu template does), timed and scored the
same way. Three shims, all in LESS_WRAPPER below: its `prepare_batch` moves batches to cuda:0
unconditionally, so the wrapper sends them to the model's device; it passes `max_batch_size` to trak
0.1.3's CPU `BasicProjector`, which does not take it (only the CUDA projector uses it), so the wrapper drops
it; and for Adam features its `optimizer.bin` is written from the checkpoint's name-keyed moments.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from featurize import gsm8k_pool, pairwise_fidelity  # noqa: E402

from g2is_graph.config import DataConfig  # noqa: E402
from g2is_graph.data.records import collate, encode_all, read_jsonl  # noqa: E402
from g2is_graph.grads.gradients import PerExampleGradients, adam_feature, reference_gradient  # noqa: E402
from g2is_graph.model.loading import load_tokenizer, load_with_adapter, resolve_model, smollm2_gguf  # noqa: E402
from g2is_graph.store.features import FeatureStore  # noqa: E402
from ingest.warmup import ADAM_FILE, Checkpoint  # noqa: E402

LESS_RATE = 0.151  # examples/s of LESS's own code at r=128 (quoted from issue 17; LESS is not installed here)
LESS_QUOTED = "| LESS's own code on this class of machine (bs 1, TRAK CPU projector, bf16; quoted from the issue) " \
              f"| {LESS_RATE} | 1.0x | 10.6-14.6 GiB | 0.981 / 0.985 |"
# name -> extra `g2is gradients` flags
RUNS = {"default": [],
        "before": ["--autocast", "float32", "--sparse-nnz", "4"],  # the default until 2026-12-06 (sparse, 4 non-zeros)
        "float32": ["--autocast", "float32"],
        "nnz-4": ["--sparse-nnz", "4"],
        "autocast-bfloat16": ["--autocast", "bfloat16"],
        "model-bfloat16": ["--dtype", "bfloat16", "--autocast", "float32"],
        "batch-2": ["--batch-size", "2"],
        "one-stream": ["--streams", "1"]}  # one batch at a time on all cores (the default until 2026-12-07)


def g2is(args: list[str], log: Path) -> tuple[float, int]:
    """Run `python -m g2is_graph.cli ARGS` to its end: (seconds, peak RSS bytes)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "g2is_graph.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"g2is {' '.join(args)} failed; see {log}")
    return seconds, usage.ru_maxrss * 1024


LESS_WRAPPER = """
import runpy, sys
import less.data_selection.collect_grad_reps as reps
plain = reps.prepare_batch
def prepare_batch(batch, device=None):  # LESS moves every batch to cuda:0; this CPU has none
    import torch
    return plain(batch, device=torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
reps.prepare_batch = prepare_batch
class BasicProjector(reps.BasicProjector):  # trak 0.1.3's CPU projector takes no max_batch_size (CUDA's does)
    def __init__(self, *args, max_batch_size=None, **kwargs):
        super().__init__(*args, **kwargs)
reps.BasicProjector = BasicProjector
sys.argv = ["get_info", *sys.argv[1:]]
runpy.run_module("less.data_selection.get_info", run_name="__main__")
"""


def less_code(args, pool: Path, checkpoint: Path, kind: str, log: Path) -> tuple[float, int, torch.Tensor]:
    """LESS's own get_info over the same records and checkpoint: (seconds, peak RSS bytes, features)."""
    work = args.work / "less-code"
    base = resolve_model(smollm2_gguf())
    adapter = work / f"checkpoint-{kind}"
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(checkpoint, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (base / name).exists() and not (adapter / name).exists():
            shutil.copy(base / name, adapter / name)
    if kind == "adam":  # LESS reads HF Trainer's optimizer.bin: {"state": {parameter name: moments}}
        from safetensors.torch import load_file

        tensors = load_file(checkpoint / ADAM_FILE)
        torch.save({"state": {key[:-len("::exp_avg")]: {"exp_avg": value,
                                                        "exp_avg_sq": tensors[key + "_sq"]}
                              for key, value in tensors.items() if key.endswith("::exp_avg")}},
                   adapter / "optimizer.bin")
    records = work / "train.jsonl"
    with open(pool) as src, open(records, "w") as out:
        for line in src:
            r = json.loads(line)
            out.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["completion"]}]}) + "\n")
    out_dir = work / f"grads-{kind}"
    shutil.rmtree(out_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(args.less_code), *args.less_path])}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", LESS_WRAPPER, "--train_file", str(records), "--info_type",
                                 "grads", "--model_path", str(adapter), "--output_path", str(out_dir),
                                 "--gradient_projection_dimension", str(args.dim), "--gradient_type", kind,
                                 "--max_samples", str(args.n)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"LESS's get_info failed; see {log}")
    return seconds, usage.ru_maxrss * 1024, torch.load(out_dir / f"dim{args.dim}" / "all_unormalized.pt").float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--fidelity-n", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    parser.add_argument("--kinds", default="sgd,adam")
    parser.add_argument("--less-code", type=Path, default=None,
                        help="a LESS checkout (the folder holding less/): also run LESS's own get_info")
    parser.add_argument("--less-path", nargs="*", default=[], help="extra import paths for LESS (trak, datasets)")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pool = gsm8k_pool(work / "pool.jsonl", args.n)
    model = smollm2_gguf()
    load = lambda: " ".join(f"{x:.2f}" for x in os.getloadavg())  # noqa: E731
    print(f"{args.n} GSM8K records, LoRA r={args.lora_r}, {args.dim} dims; {os.cpu_count()} CPUs; load average "
          f"{load()}", flush=True)

    checkpoint = work / "warmup" / "checkpoint-epoch1"
    if not (checkpoint / "trainer_state.json").exists():
        seconds, rss = g2is(["warmup", str(pool), "--model", str(model), "--out", str(work / "warmup"),
                             "--lora-r", str(args.lora_r), "--lora-alpha", str(4 * args.lora_r), "--lr", "2e-5",
                             "--batch-size", "1", "--grad-accumulation", "8", "--epochs", "1", "--fraction", "1.0",
                             "--template", "tulu"], work / "warmup.log")
        print(f"warmup: {seconds:.0f} s, peak RSS {rss / 2**30:.2f} GiB", flush=True)

    measured = {}
    for name in args.runs.split(","):
        for kind in args.kinds.split(","):
            out = work / f"features-{name}-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            seconds, rss = g2is(["gradients", str(pool), "--model", str(model), "--checkpoint", str(checkpoint),
                                 "--out", str(out), "--kind", kind, "--dim", str(args.dim), "--template", "tulu",
                                 *RUNS[name]], work / f"{name}-{kind}.log")
            measured[name, kind] = (seconds, rss, FeatureStore(out / checkpoint.name))
            print(f"{name} {kind}: {seconds:.1f} s = {args.n / seconds:.3f} examples/s, peak RSS {rss / 2**30:.2f} GiB "
                  f"(load {load()})", flush=True)

    kinds = args.kinds.split(",")
    less_measured = {}
    if args.less_code:
        for kind in kinds:
            seconds, rss, feats = less_code(args, pool, checkpoint, kind, work / f"less-code-{kind}.log")
            less_measured[kind] = (seconds, rss, feats)
            print(f"LESS's own get_info {kind}: {seconds:.1f} s = {args.n / seconds:.3f} examples/s, peak RSS "
                  f"{rss / 2**30:.2f} GiB (load {load()})", flush=True)

    # exact features of the first records, encoded exactly as each store says it encoded them
    tokenizer = load_tokenizer(model)
    lora = load_with_adapter(model, checkpoint, "float32", "cpu", trainable=True).eval()
    names = PerExampleGradients(lora).spec.names
    adam = Checkpoint.load(checkpoint).adam_state(names)
    records = read_jsonl(pool).records[:args.fidelity_n]
    exact, exact_seconds = {}, 0.0
    for kind in args.kinds.split(","):
        store = next(s for (_, k), (_, _, s) in measured.items() if k == kind)
        data = DataConfig(**{k: v for k, v in store.meta["data"].items() if k != "skip_bad"})
        _, encoded, _ = encode_all(records, tokenizer, data)
        start = time.perf_counter()
        grads = torch.stack([reference_gradient(lora, *collate([e], tokenizer.pad_token_id)[:2]) for e in encoded])
        exact_seconds = time.perf_counter() - start
        exact[kind] = torch.cat([adam_feature(g.unsqueeze(0), adam) for g in grads]) if kind == "adam" else grads
    print(f"\nplain bs1 autograd (float32, no projection): {len(records) / exact_seconds:.2f} examples/s "
          f"(in this process, load {load()})\n")

    # the reference rate: LESS measured here when it ran, else the r=128 figure (only at r=128)
    if less_measured:
        reference = {k: args.n / less_measured[k][0] for k in kinds}
        against = "LESS's get_info measured here"
    else:
        reference = {k: LESS_RATE for k in kinds} if args.lora_r == 128 else None
        against = f"LESS's {LESS_RATE} (r=128)"
    print(f"| | examples/s, whole process | vs {against} | peak RSS | Pearson(pairwise cosines, exact fp32), "
          f"{args.fidelity_n * (args.fidelity_n - 1) // 2} pairs ({' / '.join(kinds)}) |")
    print("|---|---|---|---|---|")
    if less_measured:
        runs = [less_measured[k] for k in kinds]
        fidelity = " / ".join(f"{pairwise_fidelity(exact[k], f[:args.fidelity_n])[0]:.4f}"
                              for k, (_, _, f) in zip(kinds, runs))
        print(f"| LESS's own get_info, this machine (bs 1, TRAK BasicProjector, bf16) | "
              f"{' / '.join(f'{args.n / sec:.3f}' for sec, _, _ in runs)} | 1.0x | "
              f"{' / '.join(f'{r / 2**30:.2f} GiB' for _, r, _ in runs)} | {fidelity} |")
    else:
        print(LESS_QUOTED)
    for name in args.runs.split(","):
        runs = [measured[name, k] for k in kinds]
        rate = " / ".join(f"{args.n / s:.2f}" for s, _, _ in runs)
        ratio = " / ".join(f"{args.n / s / reference[k]:.1f}x" for k, (s, _, _) in zip(kinds, runs)) \
            if reference else "-"
        rss = " / ".join(f"{r / 2**30:.2f} GiB" for _, r, _ in runs)
        fidelity = " / ".join(f"{pairwise_fidelity(exact[k], torch.from_numpy(st.load('raw')[:args.fidelity_n]))[0]:.4f}"
                              for k, (_, _, st) in zip(kinds, runs))
        meta = runs[0][2].meta
        print(f"| `g2is gradients` {name} ({meta['projector']['kind']} {meta['projector'].get('sparse_nnz', '')}, "
              f"autocast {meta.get('autocast', 'float32')}) "
              f"| {rate} | {ratio} | {rss} | {fidelity} |")
    print(f"| plain batch-size-1 autograd, no projection (in process) | {len(records) / exact_seconds:.2f} | - | - | exact |")
    print(f"\nload average at the end: {load()}")


if __name__ == "__main__":
    main()

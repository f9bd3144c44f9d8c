"""Issue 17's table at LESS's own settings: whole `g2is gradients` processes, their peak RSS and fidelity.

    python bench/less_table.py --work /tmp/less-table --n 64 --lora-r 128

On the first N GSM8K training problems: `g2is warmup` with LESS's recipe (LoRA r / alpha 4r on q,k,v,o,
lr 2e-5, batch 1 x 8 accumulation, one epoch on all of them, tulu template; done once per work folder),
then for each --runs entry a fresh `g2is gradients` process over the same N records (timed from start to
exit, peak RSS from wait4), and exact float32 gradients from plain batch-size-1 autograd of the first
--fidelity-n records with the same checkpoint (SGD, and Adam features with the checkpoint's moments),
whose pairwise cosines are compared with those of the stored features (Pearson r, as in the issue).
LESS's own row is quoted from the issue (measured on this class of machine; LESS is not installed here).
"""

from __future__ import annotations

import argparse
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
from g2is_graph.model.loading import load_tokenizer, load_with_adapter, smollm2_gguf  # noqa: E402
from g2is_graph.store.features import FeatureStore  # noqa: E402
from ingest.warmup import Checkpoint  # noqa: E402

LESS_RATE = 0.151  # examples/s of LESS's own code at r=128 (quoted from issue 17; LESS is not installed here)
LESS_QUOTED = "| LESS's own code on this class of machine (bs 1, TRAK CPU projector, bf16; quoted from the issue) " \
              f"| {LESS_RATE} | 1.0x | 10.6-14.6 GiB | 0.981 / 0.985 |"
# name -> extra `g2is gradients` flags
RUNS = {"default": [], "sparse-float32": ["--projector", "sparse", "--autocast", "float32"],
        "sparse-bfloat16": ["--projector", "sparse", "--autocast", "bfloat16"],
        "model-bfloat16": ["--projector", "sparse", "--dtype", "bfloat16", "--autocast", "float32"],
        "batch-2": ["--batch-size", "2"]}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--fidelity-n", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    parser.add_argument("--kinds", default="sgd,adam")
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

    print(f"| | examples/s, whole process | vs LESS's {LESS_RATE} (r=128) | peak RSS | Pearson(pairwise cosines, exact fp32), "
          f"{args.fidelity_n * (args.fidelity_n - 1) // 2} pairs ({' / '.join(args.kinds.split(','))}) |")
    print("|---|---|---|---|---|")
    print(LESS_QUOTED)
    for name in args.runs.split(","):
        runs = [measured[name, k] for k in args.kinds.split(",")]
        rate = " / ".join(f"{args.n / s:.2f}" for s, _, _ in runs)
        ratio = " / ".join(f"{args.n / s / LESS_RATE:.1f}x" for s, _, _ in runs) if args.lora_r == 128 else "-"
        rss = " / ".join(f"{r / 2**30:.2f} GiB" for _, r, _ in runs)
        fidelity = " / ".join(f"{pairwise_fidelity(exact[k], torch.from_numpy(st.load('raw')[:args.fidelity_n]))[0]:.4f}"
                              for k, (_, _, st) in zip(args.kinds.split(","), runs))
        meta = runs[0][2].meta
        print(f"| `g2is gradients` {name} ({meta['projector']['kind']}, autocast {meta.get('autocast', 'float32')}) "
              f"| {rate} | {ratio} | {rss} | {fidelity} |")
    print(f"| plain batch-size-1 autograd, no projection (in process) | {len(records) / exact_seconds:.2f} | - | - | exact |")
    print(f"\nload average at the end: {load()}")


if __name__ == "__main__":
    main()

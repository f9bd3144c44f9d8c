"""The quality grid end to end on a tiny model against the real server: rows, sharing, resume, refusal."""

from __future__ import annotations

import json
import shutil

import pytest

from g2is_graph import pipeline
from g2is_graph.db.graph import Graph
from g2is_graph.errors import ConfigError
from g2is_graph.study import quality
from g2is_graph.train import finetune as finetune_module


def _gsm8k_folder(root):
    """GSM8K-format train/test files (the real ones live outside the repository, in ../shared/data)."""
    root.mkdir()
    for split, n in (("train", 40), ("test", 10)):
        with open(root / f"{split}.jsonl", "w") as fh:
            for i in range(n):
                a, b = 3 + i, 7 + 2 * i
                fh.write(json.dumps({"question": f"{split} {i}: Tom has {a} apples and buys {b}. How many now?",
                                     "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}) + "\n")
    return root


@pytest.fixture()
def tiny_config(tmp_path, tiny_model):
    return quality.load_config("cpu-hour", {
        "model": str(tiny_model), "gsm8k_dir": str(_gsm8k_folder(tmp_path / "gsm8k")),
        "pool": [["gsm8k", 12], ["asdiv", 8], ["boolq", 8]], "targets": ["gsm8k", "mmlu"], "test_items": 5,
        "gsm8k_validation": 6, "mmlu_per_subject": 1, "ratios": [0.1, 0.2], "seeds": [0, 1],
        "ablations": ["unoriented", "all-candidates"], "ablation_targets": ["gsm8k"], "ablation_ratios": [0.2],
        "max_length": 1024, "eval_max_length": 8192, "dim": 256, "lora": {"r": 2, "alpha": 4},
        "warmup": {"fraction": 0.2, "epochs": 2}, "finetune": {"epochs": 1},
    })


def test_grid_runs_shares_identical_units_and_resumes_without_redoing_work(tmp_path, graph, neo4j_uri, tiny_config,
                                                                            monkeypatch):
    work = tmp_path / "work"
    calls = []
    real_finetune = finetune_module.run_finetune

    def counting_finetune(paths, *args, **kwargs):
        calls.append(str(paths[0]))
        return real_finetune(paths, *args, **kwargs)

    monkeypatch.setattr(finetune_module, "run_finetune", counting_finetune)
    state = quality.run_study(work, tiny_config, "test", echo=lambda m: None, progress=False,
                              graph_factory=lambda: Graph(neo4j_uri))
    plan = quality.selection_plan(tiny_config)
    assert len(plan) == len(state["selections"]) == 2 * 2 * (5 + 2) + 2
    # random draws are the same for both targets: trained once per (draw, seed)
    naive = sum(len(quality.finetune_seeds(s, tiny_config.seeds)) for s in state["selections"].values()) + 1
    assert len(calls) == len(state["adapters"]) < naive
    methods = {(r["method"], r["variant"]) for r in state["rows"]}
    assert {("base", "default"), ("full-pool", "default"), ("g2is", "unoriented")} <= methods
    assert {m for m, _ in methods} >= set(quality.METHODS)
    g2is = [s for s in state["summary"] if s["method"] == "g2is" and s["variant"] == "default"]
    assert len(g2is) == 2 * 2 and all(s["n_runs"] == 2 and s["answer_loss_std"] >= 0 for s in g2is)
    mmlu = [s for s in state["summary"] if s["test"] == "mmlu"]
    assert mmlu and all("choice_accuracy_mean" in s for s in mmlu)
    # every selection's rows are evaluated on its own target's test only
    assert {r["test"] for r in state["rows"] if r["target"] == "gsm8k"} == {"gsm8k"}
    assert state["overlap"] and all(0 <= o["shared"] <= 1 for o in state["overlap"])
    assert set(state["stage_seconds"]) == {"data", "warmup", "gradients", "graph", "select", "finetune", "evaluate"}
    table = quality.markdown_table(state)
    assert "| g2is |" in table and "| g2is/unoriented |" in table
    selections = quality.selection_table(state)
    assert selections.count("\n") >= len([s for s in state["selections"].values() if s["seed"] == 0]) + 1
    quality.plot(state, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").stat().st_size > 1000

    # interrupted after some fine-tunes and evaluations: only the missing ones are redone
    saved = json.loads((work / "results.json").read_text())
    dropped_adapter = next(iter(saved["adapters"]))
    del saved["adapters"][dropped_adapter]
    dropped_evals = [k for k in saved["evaluations"] if k.startswith(dropped_adapter)]
    for key in dropped_evals:
        del saved["evaluations"][key]
    (work / "results.json").write_text(json.dumps(saved))
    calls.clear()
    again = quality.run_study(work, tiny_config, "test", echo=lambda m: None, progress=False,
                              graph_factory=lambda: Graph(neo4j_uri))
    assert len(calls) == 1 and set(again["evaluations"]) == set(state["evaluations"])
    assert len(again["rows"]) == len(state["rows"])

    with pytest.raises(ConfigError, match="another config.*seeds"):
        quality.run_study(work, quality.load_config("cpu-hour", {**json.loads(json.dumps({})), "seeds": [5]}),
                          "test", echo=lambda m: None, progress=False, graph_factory=lambda: Graph(neo4j_uri))


def test_config_overrides_are_checked():
    with pytest.raises(ConfigError, match="unknown keys.*colour"):
        quality.load_config("cpu-hour", {"colour": "red"})
    with pytest.raises(ConfigError, match="unknown method"):
        quality.load_config("cpu-hour", {"methods": ["magic"]})
    config = quality.load_config("full", {"warmup": {"epochs": 2}})
    assert config.warmup.epochs == 2 and config.warmup.fraction == 0.05
    with pytest.raises(ConfigError, match="warmup.lora: set lora at the top level"):
        quality.load_config("cpu-hour", {"warmup": {"lora": {"r": 4}}})


def test_saved_config_shows_the_lora_that_ran_and_older_results_still_resume(tmp_path):
    config = quality.load_config("cpu-scarce", {"lora": {"r": 4, "alpha": 16}})
    saved = quality.to_jsonable(config)
    assert saved["warmup"]["lora"] == saved["finetune"]["lora"] == saved["lora"]
    assert saved["lora"]["r"] == 4
    # results.json written before this showed the nested configs' unused default (r 128) there
    older = json.loads(json.dumps(saved))
    older["warmup"]["lora"] = older["finetune"]["lora"] = {**saved["lora"], "r": 128, "alpha": 512}
    (tmp_path / "results.json").write_text(json.dumps({"config": older, "data": {}, "selections": {}}))
    study = quality.Study(tmp_path, config, "cpu-scarce")
    assert study.state["config"] == saved
    with pytest.raises(ConfigError, match="another config"):
        quality.Study(tmp_path, quality.load_config("cpu-scarce", {"lora": {"r": 8}}), "cpu-scarce")


def test_scarce_target_study_draws_validation_sets_disjointly_and_pairs_against_less(tmp_path, graph, neo4j_uri,
                                                                                      tiny_model, monkeypatch):
    """The cpu-scarce shape on a tiny model: disjoint validation draws (one selection and one fine-tuning seed
    each), the format-free GSM8K test, paired differences against LESS, the target-count regression and the
    diagnostics of every G2IS selection."""
    config = quality.load_config("cpu-scarce", {
        "model": str(tiny_model), "gsm8k_dir": str(_gsm8k_folder(tmp_path / "gsm8k")),
        "pool": [["gsm8k", 6], ["asdiv", 10], ["boolq", 10]], "test_items": 4, "gsm8k_validation": 5,
        "validation_draws": 2, "ratios": [0.3], "methods": ["less", "g2is", "random"],
        "ablations": ["anchor-consistency", "pool-centred"], "ablation_ratios": [0.3],
        "max_length": 1024, "eval_max_length": 8192, "dim": 256, "lora": {"r": 2, "alpha": 4},
        "warmup": {"max_examples": 6, "epochs": 1, "grad_accumulation": 2}, "finetune": {"epochs": 1},
    })
    state = quality.run_study(tmp_path / "work", config, "test", echo=lambda m: None, progress=False,
                              graph_factory=lambda: Graph(neo4j_uri))
    data = state["data"]
    draws = [set(json.loads(line)["id"] for line in open(data["validation"][f"gsm8k-d{d}"])) for d in range(2)]
    assert len(draws[0]) == len(draws[1]) == 5 and not draws[0] & draws[1]
    plain = [json.loads(line)["completion"] for line in open(data["test"][quality.PLAIN_TEST])]
    assert plain and not any("<<" in a or "####" in a for a in plain)
    selections = list(state["selections"].values())
    # the preset's ablations run on the first draw only, after every draw's methods
    assert len(selections) == 2 * 3 + 2 and {s["draw"] for s in selections} == {0, 1}
    assert {s["draw"] for s in selections if s["variant"] != "default"} == {0}
    assert [s["variant"] for s in selections][-2:] == ["anchor-consistency", "pool-centred"]
    assert all(quality.finetune_seeds(s, config.seeds) == (s["draw"],) for s in selections)
    assert all(s["diagnostics"] for s in selections if s["method"] == "g2is")
    assert {r["test"] for r in state["rows"] if r["method"] != "base"} == {"gsm8k", quality.PLAIN_TEST}
    paired = {(p["test"], p["method"]): p for p in state["paired"]}
    g2is = paired[("gsm8k", "g2is")]
    assert g2is["n_draws"] == 2 and g2is["n_pairs"] == 2 * 4 and g2is["ci95"][0] <= g2is["mean_difference"] <= g2is["ci95"][1]
    assert ("gsm8k", "g2is/pool-centred") in paired and ("gsm8k", "base") in paired
    assert paired[("gsm8k", "g2is/pool-centred")]["n_draws"] == 1
    table = quality.study_table(state)
    assert "| g2is |" in table and "vs LESS" in table
    assert quality.diagnostics_table(state).count("| gsm8k |") == 2 + 2
    assert quality.analyse_saved(tmp_path / "work", config, "test")["paired"] == state["paired"]

    # carried elsewhere with its data, selections and results only (no warmup, features, database or one
    # adapter, whose evaluations are lost): it resumes at fine-tuning, redoing that adapter alone
    carried = tmp_path / "carried"
    shutil.copytree(tmp_path / "work", carried, ignore=shutil.ignore_patterns("warmup", "features", "neo4j", "graph"))
    dropped = next(iter(state["adapters"]))
    shutil.rmtree(carried / "adapters" / dropped)
    saved = json.loads((carried / "results.json").read_text())
    saved["evaluations"] = {k: v for k, v in saved["evaluations"].items() if not k.startswith(dropped)}
    (carried / "results.json").write_text(json.dumps(saved))

    def no_ingest(*args, **kwargs):
        raise AssertionError("a study whose selections are all made ran an ingest stage again")

    calls = []
    real_finetune = finetune_module.run_finetune
    monkeypatch.setattr(pipeline, "warmup", no_ingest)
    monkeypatch.setattr(pipeline, "featurize", no_ingest)
    monkeypatch.setattr(finetune_module, "run_finetune", lambda paths, *a, **k: calls.append(paths) or real_finetune(
        paths, *a, **k))
    again = quality.run_study(carried, config, "test", echo=lambda m: None, progress=False,
                              graph_factory=lambda: pytest.fail("a carried study opened the database"))
    assert len(calls) == 1 and str(calls[0][0]).startswith(str(carried))
    assert set(again["evaluations"]) == set(state["evaluations"]) and again["work"] == str(carried)
    assert all(s["out_dir"].startswith(str(carried)) for s in again["selections"].values())
    for key in state["evaluations"]:
        if key.startswith(dropped):
            assert again["evaluations"][key]["answer_loss"] == pytest.approx(state["evaluations"][key]["answer_loss"],
                                                                             rel=1e-4)

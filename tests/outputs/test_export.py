"""`g2is export` against real runs on the test server: each trainer format holds the same conversations and
loss as g2is read, the scores file re-ranks the whole pool and gives back the run's picks, paths travel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import build_selection_graph

from g2is_graph.config import DataConfig, SelectionConfig, ShareGPTConfig
from g2is_graph.data.records import read_jsonl
from g2is_graph.outputs.export import ExportError, export_run, llama_factory_row, trl_row
from g2is_graph.selection.runs import load_validation, load_vectors, select, space_info

LF_MESSAGES = ShareGPTConfig(messages="messages", system="system", role_tag="role", content_tag="content",
                             user_tag="user", assistant_tag="assistant", system_tag="system")


@pytest.fixture()
def runs(graph, tmp_path, monkeypatch):
    """A pool of every schema in the graph and one run per scored and unscored method, made from `tmp_path`."""
    monkeypatch.chdir(tmp_path)
    pool = build_selection_graph(graph, tmp_path)
    made = {}
    for method in ("g2is", "less", "no-graph"):
        made[method] = select(graph, SelectionConfig(method=method, n_select=8), tmp_path / "runs",
                              echo=lambda m: None, progress=False).id
    return pool, made


def test_llama_factory_export_holds_the_records_g2is_read(graph, runs, tmp_path, monkeypatch):
    pool, made = runs
    originals = {r.id: r for r in read_jsonl(pool).records}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded source path is relative to tmp_path
    with pytest.raises(ExportError, match="--source-root"):
        export_run(graph, made["g2is"], "llama-factory", tmp_path / "lf", DataConfig())
    data_dir = tmp_path / "lf"
    data_dir.mkdir()
    (data_dir / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    result = export_run(graph, made["g2is"], "llama-factory", data_dir, DataConfig(), source_root=tmp_path,
                        echo=lambda m: None)
    info = json.loads((data_dir / "dataset_info.json").read_text())
    entry = info[result.files["data"].removesuffix(".jsonl")]
    assert "alpaca_en_demo" in info  # the folder's other entries are kept
    assert entry["formatting"] == "sharegpt" and entry["file_name"] == result.files["data"]
    assert entry["tags"]["role_tag"] == "role" and entry["columns"] == {"messages": "messages"}
    # read back with LLaMA-Factory's sharegpt rule and the entry's tags: the same conversations, in run order
    exported = read_jsonl(data_dir / entry["file_name"], sharegpt=LF_MESSAGES).records
    ids = (tmp_path / "runs" / made["g2is"] / "ids.txt").read_text().split()
    assert [r.id for r in exported] == ids
    for record in exported:
        assert record.messages == originals[record.id].messages
    manifest = json.loads((data_dir / result.files["manifest"]).read_text())
    assert manifest["sources"] == [{"recorded": "pool.jsonl", "resolved": str(tmp_path / "pool.jsonl")}]
    assert not manifest["scores"]["written"] and "budget" in manifest["scores"]["why"]
    assert all(not Path(p).is_absolute() for p in manifest["files"].values())


def test_hf_export_is_a_parquet_datasets_folder_of_trl_prompt_completion_rows(graph, runs, tmp_path):
    pool, made = runs
    originals = {r.id: r for r in read_jsonl(pool).records}
    result = export_run(graph, made["less"], "hf", tmp_path / "hf", DataConfig(), echo=lambda m: None)
    table = pq.read_table(tmp_path / "hf" / result.files["data"]).to_pylist()
    card = (tmp_path / "hf" / result.files["card"]).read_text()
    assert "data_files" in card and "data/train-00000-of-00001.parquet" in card
    assert len(table) == 8
    for row in table:
        original = originals[row["id"]]
        assert [(m["role"], m["content"]) for m in row["prompt"] + row["completion"]] == \
            [(m.role, m.content) for m in original.messages]
        assert [m["role"] for m in row["completion"]] == ["assistant"]


def test_jsonl_export_and_less_scores_rerank_the_whole_pool(graph, runs, tmp_path):
    pool, made = runs
    result = export_run(graph, made["less"], "jsonl", tmp_path / "out", DataConfig(), echo=lambda m: None)
    selected = (tmp_path / "runs" / made["less"] / "selected.jsonl").read_text()
    assert (tmp_path / "out" / result.files["data"]).read_text() == selected  # byte for byte
    rows = [json.loads(line) for line in (tmp_path / "out" / result.files["scores"]).read_text().splitlines()]
    space = space_info(graph)
    assert len(rows) == space.n_samples and [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    ids = (tmp_path / "runs" / made["less"] / "ids.txt").read_text().split()
    assert [r["id"] for r in rows[:8]] == ids
    # oracle: LESS's score in plain float64 numpy, max over the two validation tasks of the mean's dot product
    vectors, nodes = load_vectors(graph, space)
    validation, records = load_validation(graph, space, ())
    tasks = np.array([r["task"] for r in records])
    per_task = {t: vectors.astype(np.float64) @ validation[tasks == t].astype(np.float64).mean(axis=0)
                for t in ("t1", "t2")}
    row_of = {n["id"]: n["row"] for n in nodes}
    for r in rows:
        best = max(per_task, key=lambda t: per_task[t][row_of[r["id"]]])
        assert r["score"] == pytest.approx(per_task[best][row_of[r["id"]]], rel=1e-9, abs=1e-12)
        assert r["component"] == best
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_no_graph_scores_rank_within_each_component_and_replay_the_run(graph, runs, tmp_path):
    _, made = runs
    result = export_run(graph, made["no-graph"], "jsonl", tmp_path / "ng", DataConfig(), echo=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "ng" / result.files["scores"]).read_text().splitlines()]
    manifest = json.loads((tmp_path / "ng" / result.files["manifest"]).read_text())
    run = json.loads((tmp_path / "runs" / made["no-graph"] / "manifest.json").read_text())
    budgets = [c["budget"] for c in run["components"]]
    by_component: dict[int, list[str]] = {}
    for r in rows:
        by_component.setdefault(r["component"], []).append(r["id"])
    assert sorted(by_component) == list(range(len(budgets)))
    assert all(len(v) == 40 for v in by_component.values())
    taken: list[str] = []
    for c, budget in enumerate(budgets):  # the re-cut rule the manifest states
        taken += [i for i in by_component[c] if i not in taken][:budget]
    assert taken == (tmp_path / "runs" / made["no-graph"] / "ids.txt").read_text().split()
    assert "not yet taken" in manifest["scores"]["recut"]


def test_embedding_scores_are_recomputed_from_the_source_texts(graph, runs, tmp_path, monkeypatch):
    from g2is_graph.selection.embedding import load_encoder, select_by_embedding

    encoder = load_encoder()
    run = select_by_embedding(graph, SelectionConfig(method="embedding", n_select=8), tmp_path / "runs",
                              echo=lambda m: None, progress=False, encoder=encoder)
    monkeypatch.chdir(tmp_path / "runs")  # relative source paths resolve from --source-root
    result = export_run(graph, run.id, "jsonl", tmp_path / "emb", DataConfig(), source_root=tmp_path,
                        echo=lambda m: None, encoder=encoder)
    rows = [json.loads(line) for line in (tmp_path / "emb" / result.files["scores"]).read_text().splitlines()]
    assert len(rows) == 40 and [r["id"] for r in rows[:8]] == [p.id for p in run.picks]
    assert {r["component"] for r in rows} <= {"t1", "t2"}


def test_scores_are_refused_when_the_graph_changed_since_the_run(graph, runs, tmp_path):
    from g2is_graph.config import GraphConfig
    from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
    from ingest.graph_build import build_graph

    _, made = runs
    more = synthetic_store(tmp_path / "more" / "c", clustered_vectors(5, 24, seed=9), synthetic_rows(5, prefix="x"))
    build_graph(graph, [more.path], GraphConfig(k=12, exact=True, device="cpu"), tmp_path / "state", progress=False)
    with pytest.raises(ExportError, match="cannot be recomputed"):
        export_run(graph, made["less"], "jsonl", tmp_path / "late", DataConfig(), echo=lambda m: None)
    export_run(graph, made["less"], "jsonl", tmp_path / "late", DataConfig(), with_scores=False, echo=lambda m: None)


def test_records_a_trainer_would_read_differently_are_refused_by_file_and_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    lines = [{"id": "multi", "instruction": "q2", "output": "a2", "history": [["q1", "a1"]]},
             {"id": "two-users", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                              {"role": "assistant", "content": "c"}]},
             {"id": "ctx", "prompt": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                      {"role": "user", "content": "q2"}],
              "completion": [{"role": "assistant", "content": "a2"}]},
             {"id": "raw", "prompt": "2+2=", "completion": "4"}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    multi, two_users, ctx, raw = read_jsonl(path).records
    assert [m["role"] for m in llama_factory_row(multi, DataConfig())["messages"]] == ["user", "assistant"] * 2
    with pytest.raises(ExportError, match=r"odd.jsonl:1: g2is trained 2 assistant turns"):
        trl_row(multi, DataConfig())
    with pytest.raises(ExportError, match=r"odd.jsonl:2: .*alternate"):
        llama_factory_row(two_users, DataConfig())
    with pytest.raises(ExportError, match=r"odd.jsonl:3: the prompt holds assistant turns"):
        llama_factory_row(ctx, DataConfig())
    assert trl_row(ctx, DataConfig())["completion"] == [{"role": "assistant", "content": "a2"}]
    with pytest.raises(ExportError, match=r"odd.jsonl:4: .*raw"):
        llama_factory_row(raw, DataConfig(prompt_completion="raw"))
    assert trl_row(raw, DataConfig(prompt_completion="raw")) == {"id": "raw", "prompt": "2+2=", "completion": "4"}


def test_export_through_the_cli(graph, runs, tmp_path, neo4j_uri, monkeypatch):
    from click.testing import CliRunner

    from g2is_graph.cli import main

    _, made = runs
    monkeypatch.setenv("NEO4J_URI", neo4j_uri)
    monkeypatch.setenv("G2IS_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    done = runner.invoke(main, ["-q", "export", made["less"], "--format", "llama-factory", "--out", "lf",
                                "--name", "picked"])
    assert done.exit_code == 0, done.output
    assert "8 records, 40 score rows" in done.output and (tmp_path / "lf" / "picked.scores.jsonl").exists()
    assert "picked" in json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    ids = (tmp_path / "runs" / made["g2is"] / "ids.txt").read_text().split()
    plain = [int(i[1:]) % 5 == 4 for i in ids]  # the pool's string prompt/completion records
    raw = runner.invoke(main, ["-q", "export", made["g2is"], "--format", "hf", "--out", "hf",
                               "--prompt-completion", "raw"])
    if any(plain) and not all(plain):  # raw strings beside conversations cannot share one TRL dataset
        assert raw.exit_code == 2 and "mixes string prompt/completion records" in raw.output
        assert "Traceback" not in raw.output
    else:
        assert raw.exit_code == 0, raw.output
    missing = runner.invoke(main, ["-q", "export", "no-such-run", "--format", "jsonl", "--out", "x"])
    assert missing.exit_code == 2 and "no selection run 'no-such-run'" in missing.output

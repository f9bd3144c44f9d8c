"""The warmup and gradient jobs end to end on a tiny model: name-keyed Adam state, lr log and
checkpoint weights, resume after interruption (byte-identical), shards, and LESS imports."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from g2is_graph.config import DataConfig, GradientConfig, LoraSettings, ProjectorConfig, WarmupConfig
from g2is_graph.store.features import FeatureStore, StoreError, import_less
from g2is_graph.train.loop import linear_schedule
from ingest import gradients as gradient_job
from ingest.gradients import run_gradients
from ingest.warmup import checkpoint_weights, run_warmup

WARMUP = WarmupConfig(fraction=0.5, epochs=3, lr=1e-3, grad_accumulation=2, batch_size=2,
                      lora=LoraSettings(r=4, alpha=16))
GRADS = GradientConfig(chunk_rows=8, batch_size=3)
PROJ = ProjectorConfig(dim=32, block_rows=256)


@pytest.fixture(scope="module")
def warmed(tiny_model, tmp_path_factory):
    from conftest import write_pool

    root = tmp_path_factory.mktemp("warm")
    pool = write_pool(root / "pool.jsonl", 30)
    checkpoints = run_warmup([pool], tiny_model, root / "warmup", WARMUP, DataConfig(), progress=False)
    return pool, checkpoints


def chunk_bytes(store_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((store_dir / "chunks").glob("chunk-*.safetensors"))}


def test_warmup_saves_name_keyed_adam_state_and_the_lr_of_every_step(warmed):
    from safetensors.torch import load_file

    _, checkpoints = warmed
    assert [c.epoch for c in checkpoints] == [1, 2, 3]
    state = json.loads((checkpoints[-1].path / "trainer_state.json").read_text())
    steps_per_epoch = 4  # 15 warmup examples / (2 x 2)
    assert state["step"] == 3 * steps_per_epoch and len(state["lrs"]) == state["step"]
    total, warm = 3 * steps_per_epoch, 1  # ceil(0.03 * 12)
    assert state["lrs"] == pytest.approx([linear_schedule(s, total, warm, 1e-3) for s in range(total)])
    moments = load_file(checkpoints[-1].path / "adam_state.safetensors")
    names = state["parameter_names"]
    assert all("lora_" in n for n in names) and len(moments) == 2 * len(names)
    assert all(moments[f"{n}::exp_avg_sq"].min() >= 0 for n in names)
    assert (checkpoints[-1].path / "adapter_model.safetensors").exists()
    # checkpoint weights are computed from the logged lrs, not copied constants
    means = [np.mean(state["lrs"][e * 4:(e + 1) * 4]) for e in range(3)]
    assert checkpoint_weights(checkpoints) == pytest.approx([m / sum(means) for m in means])


def test_warmup_resumes_after_its_last_complete_epoch(tiny_model, warmed, tmp_path):
    import shutil

    pool, checkpoints = warmed
    resumed_dir = tmp_path / "warmup"
    shutil.copytree(checkpoints[0].path.parent, resumed_dir)
    for name in ("checkpoint-epoch2", "checkpoint-epoch3"):
        shutil.rmtree(resumed_dir / name)
    resumed = run_warmup([pool], tiny_model, resumed_dir, WARMUP, DataConfig(), progress=False, echo=lambda m: None)
    from safetensors.torch import load_file

    a = load_file(resumed[-1].path / "adapter_model.safetensors")
    b = load_file(checkpoints[-1].path / "adapter_model.safetensors")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_gradient_job_resumes_to_byte_identical_chunks(tiny_model, warmed, tmp_path, monkeypatch):
    pool, checkpoints = warmed
    clean = run_gradients([pool], tiny_model, [checkpoints[-1].path], tmp_path / "clean", GRADS, PROJ, DataConfig(),
                          progress=False)
    assert clean.chunks_computed == 4

    real = gradient_job._chunk_features
    calls = {"n": 0}

    def dies_on_third_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    assert gc.isenabled()  # the job gave the collector back as it found it
    monkeypatch.setattr(gradient_job, "_chunk_features", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_gradients([pool], tiny_model, [checkpoints[-1].path], tmp_path / "resumed", GRADS, PROJ, DataConfig(),
                      progress=False)
    assert gc.isenabled()  # also when killed mid-job
    monkeypatch.setattr(gradient_job, "_chunk_features", real)
    store_dir = tmp_path / "resumed" / checkpoints[-1].name
    assert len(chunk_bytes(store_dir)) == 2
    with pytest.raises(StoreError, match="chunks missing"):
        FeatureStore(store_dir).verify()
    again = run_gradients([pool], tiny_model, [checkpoints[-1].path], tmp_path / "resumed", GRADS, PROJ,
                          DataConfig(), progress=False)
    assert again.chunks_computed == 2
    assert chunk_bytes(store_dir) == chunk_bytes(clean.stores[0])
    noop = run_gradients([pool], tiny_model, [checkpoints[-1].path], tmp_path / "resumed", GRADS, PROJ,
                         DataConfig(), progress=False)
    assert noop.chunks_computed == 0


def test_shards_fill_one_store_without_gaps_or_duplicates(tiny_model, warmed, tmp_path):
    pool, checkpoints = warmed
    ckpts = [c.path for c in checkpoints[:2]]
    whole = run_gradients([pool], tiny_model, ckpts, tmp_path / "whole", GRADS, PROJ, DataConfig(), progress=False)
    for i in range(3):
        run_gradients([pool], tiny_model, ckpts, tmp_path / "sharded", GRADS, PROJ, DataConfig(), shard=(i, 3),
                      progress=False)
    for store_dir in whole.stores:
        sharded = FeatureStore(tmp_path / "sharded" / store_dir.name)
        sharded.verify()
        np.testing.assert_array_equal(sharded.load(), FeatureStore(store_dir).load())
        assert [r["id"] for r in sharded.rows()] == [r["id"] for r in FeatureStore(store_dir).rows()]


def test_features_are_normalised_and_rows_map_back_to_file_and_line(tiny_model, warmed, tmp_path):
    pool, checkpoints = warmed
    result = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS, PROJ, DataConfig(),
                           progress=False)
    store = FeatureStore(result.stores[0])
    normalized, raw = store.load("normalized"), store.load("raw")
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(normalized, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    rows = store.rows()
    assert rows[4]["line"] == 5 and rows[4]["source_file"] == str(pool) and rows[4]["id"] == "w4"
    meta = store.meta
    assert meta["gradient"] == {"kind": "adam", "adam_form": "less", "loss": "mean over loss tokens"}
    assert meta["projector"]["kind"] == "sparse" and meta["checkpoint"]["name"] == checkpoints[0].name
    # validation (SGD) features from the same checkpoint live in the same space but are different features
    sgd = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "v",
                        GradientConfig(kind="sgd", chunk_rows=8), PROJ, DataConfig(), progress=False)
    validation = FeatureStore(sgd.stores[0])
    store.check_compatible(validation)
    assert not np.allclose(validation.load(), normalized)


def test_corrupted_chunk_is_reported_never_read_and_redone_on_resume(tiny_model, warmed, tmp_path):
    pool, checkpoints = warmed
    result = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS, PROJ, DataConfig(),
                           progress=False)
    store = FeatureStore(result.stores[0])
    before = chunk_bytes(store.path)
    victim = store.path / "chunks" / "chunk-00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(StoreError, match="chunk-00001.safetensors: checksum mismatch"):
        store.load()
    assert store.missing_chunks() == [1]
    run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS, PROJ, DataConfig(), progress=False)
    assert chunk_bytes(store.path) == before


def test_mismatched_metadata_is_refused(tiny_model, warmed, tmp_path):
    pool, checkpoints = warmed
    run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS, PROJ, DataConfig(), progress=False)
    with pytest.raises(StoreError, match="different projector"):
        run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS,
                      ProjectorConfig(dim=32, seed=9, block_rows=256), DataConfig(), progress=False)
    other = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "g", GRADS,
                          ProjectorConfig(dim=32, kind="gaussian"), DataConfig(), progress=False)
    with pytest.raises(StoreError, match="differ in projector"):
        FeatureStore(tmp_path / "f" / checkpoints[0].name).check_compatible(FeatureStore(other.stores[0]))


def test_import_less_datastores(tmp_path, pool_file):
    raw = torch.randn(30, 16)
    torch.save(raw, tmp_path / "all_unormalized.pt")
    torch.save(raw / raw.norm(dim=1, keepdim=True), tmp_path / "all_orig.pt")
    from_raw = import_less(tmp_path / "all_unormalized.pt", [pool_file], tmp_path / "s1", normalized=False, meta={})
    from_norm = import_less(tmp_path / "all_orig.pt", [pool_file], tmp_path / "s2", normalized=True, meta={})
    np.testing.assert_allclose(from_raw.load(), from_norm.load(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_raw.load("raw"), raw.numpy(), rtol=1e-6)
    with pytest.raises(StoreError, match="no 'raw' features"):
        from_norm.load("raw")
    torch.save(raw[:10], tmp_path / "short.pt")
    with pytest.raises(StoreError, match="10 rows but the jsonl files hold 30"):
        import_less(tmp_path / "short.pt", [pool_file], tmp_path / "s3", normalized=False, meta={})
    bad = raw.clone()
    bad[3, 2] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(StoreError, match="row 3 .*pool.jsonl:4"):
        import_less(tmp_path / "nan.pt", [pool_file], tmp_path / "s4", normalized=False, meta={})
    assert not (tmp_path / "s4").exists()


def test_a_gradient_job_killed_while_creating_meta_json_resumes(tiny_model, warmed, tmp_path):
    """Issue 15 (7): a job killed while writing meta.json left an empty file that blocked every resume."""
    pool, checkpoints = warmed
    store_dir = tmp_path / "f" / checkpoints[0].name
    (store_dir / "chunks").mkdir(parents=True)
    (store_dir / "meta.json").write_text("")  # what a kill between creating and writing it left behind
    result = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS, PROJ, DataConfig(),
                           progress=False)
    assert result.chunks_computed == 4 and FeatureStore(store_dir).meta["n_rows"] == 30
    (store_dir / "meta.json").write_text('{"format": "g2is-feat')  # torn, but chunks exist: never guessed
    with pytest.raises(StoreError, match="meta.json: corrupted"):
        run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS, PROJ, DataConfig(),
                      progress=False)


def test_two_ingests_into_one_graph_at_once_end_in_the_sequential_graph(tiny_model, warmed, graph, neo4j_uri,
                                                                       tmp_path):
    """Issue 15 (2): two `g2is ingest` processes add different records to one --state at the same time."""
    import subprocess
    import sys

    from g2is_graph.config import GraphConfig
    from ingest.graph_build import build_graph

    pool, checkpoints = warmed
    checkpoint = checkpoints[0].path
    config = GraphConfig(k=4, exact=True, device="cpu")
    base = run_gradients([pool], tiny_model, [checkpoint], tmp_path / "train", GRADS, PROJ, DataConfig(),
                         progress=False)
    build_graph(graph, base.stores, config, tmp_path / "state", progress=False)
    for part in ("a", "b"):
        with open(tmp_path / f"{part}.jsonl", "w") as fh:
            for i in range(6):
                fh.write(json.dumps({"id": f"new-{part}{i}", "prompt": f"{part} question {i} on rivers and trees",
                                     "completion": f"{part} answer {i}"}) + "\n")
    (tmp_path / "g2is.toml").write_text("[projector]\ndim = 32\nblock_rows = 256\n"
                                        "[gradients]\nchunk_rows = 8\nbatch_size = 3\n")
    env = {**os.environ, "NEO4J_URI": neo4j_uri, "G2IS_HOME": str(tmp_path / "home")}
    ingests = [subprocess.Popen([sys.executable, "-c", "from g2is_graph.cli import main; main(prog_name='g2is')",
                                 "-q", "ingest", f"{part}.jsonl", "--model", str(tiny_model), "--checkpoint",
                                 str(checkpoint), "--features", f"features-{part}", "--state", "state", "--exact",
                                 "--k", "4"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for part in ("a", "b")]
    outcomes = [(p.wait(timeout=600), *p.communicate()) for p in ingests]
    assert [code for code, _, _ in outcomes] == [0, 0], [err.splitlines()[-2:] for _, _, err in outcomes]
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    stored = graph._run_auto("MATCH (s:Sample) RETURN s.id AS id, s.row AS row ORDER BY s.row")
    assert [r["id"] for r in stored] == state["ids"] and [r["row"] for r in stored] == list(range(len(stored)))
    assert {f"new-{p}{i}" for p in "ab" for i in range(6)} <= set(state["ids"])
    edges = graph._run_auto("MATCH (a:Sample)-[e]->(b:Sample) RETURN type(e) AS t, a.id AS a, b.id AS b, "
                            "e.weight AS w, e.rank AS r")
    graph.clear()
    for stores in (base.stores, [tmp_path / "features-a" / checkpoint.name], [tmp_path / "features-b" / checkpoint.name]):
        build_graph(graph, stores, config, tmp_path / "sequential", progress=False)
    sequential = graph._run_auto("MATCH (a:Sample)-[e]->(b:Sample) RETURN type(e) AS t, a.id AS a, b.id AS b, "
                                 "e.weight AS w, e.rank AS r")
    assert {tuple(e.values()) for e in edges} == {tuple(e.values()) for e in sequential}


def test_a_store_of_the_old_default_projector_stays_readable_and_resumable(tiny_model, warmed, tmp_path):
    """Stores made before issue 17 (rademacher default, no `autocast` in meta.json) load as before, resume when
    their settings are passed, and a run with the new defaults says which settings they were made with."""
    pool, checkpoints = warmed
    old_proj = ProjectorConfig(kind="rademacher", dim=32, block_rows=256)
    old_grads = GradientConfig(chunk_rows=8, batch_size=3, autocast="float32")
    made = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", old_grads, old_proj, DataConfig(),
                         progress=False)
    store_dir = made.stores[0]
    meta = json.loads((store_dir / "meta.json").read_text())
    del meta["autocast"]  # as an older g2is wrote it
    (store_dir / "meta.json").write_text(json.dumps(meta))
    features = FeatureStore(store_dir).load()  # readable as it is
    (store_dir / "chunks" / "chunk-00002.json").unlink()  # as if interrupted
    with pytest.raises(StoreError, match="chunks missing"):
        FeatureStore(store_dir).verify()
    shown = r'different projector \(projector: saved \{"kind": "rademacher"\}, asked \{"kind": "sparse"'
    with pytest.raises(StoreError, match=shown):
        run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", old_grads,
                      ProjectorConfig(dim=32, block_rows=256), DataConfig(), progress=False)
    resumed = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", old_grads, old_proj,
                            DataConfig(), progress=False)
    assert resumed.chunks_computed == 1
    np.testing.assert_array_equal(FeatureStore(store_dir).load(), features)


@pytest.mark.parametrize("kind", ["sparse", "rademacher"])
def test_a_graph_space_names_the_projector_that_reproduces_its_features(tiny_model, warmed, tmp_path, kind):
    from g2is_graph.grads.projection import Projector
    from g2is_graph.store.space import projector_config, space_of

    pool, checkpoints = warmed
    made = run_gradients([pool], tiny_model, [checkpoints[0].path], tmp_path / "f", GRADS,
                         ProjectorConfig(kind=kind, dim=32, seed=3), DataConfig(), progress=False)
    store = FeatureStore(made.stores[0])
    config = projector_config(space_of([store]).describe(), tmp_path / "state.json")
    assert Projector(config, store.meta["projector"]["in_dim"]).identity() == store.meta["projector"]


def test_a_retired_setting_is_refused_with_its_reason():
    from g2is_graph.config import ConfigError, build

    with pytest.raises(ConfigError, match=r"\[gradients\] projection_batch: gradients are now projected one LoRA"):
        build(GradientConfig, {"projection_batch": 64}, "gradients")


def test_streams_in_threads_fill_the_store_one_stream_fills(tiny_model, warmed, tmp_path):
    import dataclasses

    pool, checkpoints = warmed
    stores = {}
    for streams in (1, 3):
        config = dataclasses.replace(GRADS, streams=streams)
        result = run_gradients([pool], tiny_model, [checkpoints[-1].path], tmp_path / str(streams), config, PROJ,
                               DataConfig(), progress=False)
        stores[streams] = FeatureStore(result.stores[0])
    np.testing.assert_allclose(stores[3].load(), stores[1].load(), rtol=1e-5, atol=1e-6)
    assert [r["id"] for r in stores[3].rows()] == [r["id"] for r in stores[1].rows()]

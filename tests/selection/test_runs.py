"""Selection runs end complete or failed, never looking complete before they are: `select` killed at several
points, failures after the run exists, and explain / runs compare refusing runs that are not complete."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from g2is_graph.cli import main
from g2is_graph.config import GraphConfig, SelectionConfig
from g2is_graph.data.synthetic import clustered_vectors, synthetic_rows, synthetic_store
from g2is_graph.selection.runs import select
from ingest.graph_build import build_graph

# Runs `g2is select` in a process that SIGKILLs itself right after the named step (argv[1]).
KILLED_SELECT = r"""
import os, signal, sys
from g2is_graph.db import graph as graph_module
from g2is_graph.selection import runs as selection
from g2is_graph.cli import main

point = sys.argv[1]
after_write = {"after_start": "run_start", "after_selected": "run_selected", "after_complete": "run_finish"}
write = graph_module.Graph.write

def write_then_die(self, name, **params):
    out = write(self, name, **params)
    if after_write.get(point) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    return out

graph_module.Graph.write = write_then_die
outputs = selection.write_outputs

def outputs_then_die(*args, **kwargs):
    outputs(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

if point == "after_outputs":
    selection.write_outputs = outputs_then_die
main(sys.argv[2:], prog_name="g2is")
"""
KILL_POINTS = ("after_start", "after_selected", "after_outputs", "after_complete")


@pytest.fixture()
def small_graph(graph, tmp_path, monkeypatch):
    n = 40
    vectors = clustered_vectors(n, 16, clusters=3, seed=5)
    rows = synthetic_rows(n)
    with open(tmp_path / "synthetic.jsonl", "w") as fh:  # the records the synthetic rows point at
        for r in rows:
            fh.write(json.dumps({"id": r["id"], "prompt": f"question {r['id']}", "completion": "answer"}) + "\n")
    train = synthetic_store(tmp_path / "t" / "c", vectors, rows)
    val = synthetic_store(tmp_path / "v" / "c", vectors[:5], synthetic_rows(5, prefix="v", task="t"), kind="sgd")
    build_graph(graph, [train.path], GraphConfig(k=5, exact=True, device="cpu"), tmp_path / "state",
                validation_stores=[val.path], progress=False)
    monkeypatch.chdir(tmp_path)
    return graph


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_error(result, code: int) -> tuple[str, str]:
    """The error and hint lines of a refused command (and nothing else: no traceback)."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.output
    return lines[0], lines[1]


def test_select_killed_at_any_point_never_leaves_a_usable_looking_run(small_graph, tmp_path, neo4j_uri, monkeypatch):
    """Issue 15 (3): SIGKILL after the run node, after the picks, after the outputs, after `complete`."""
    monkeypatch.setenv("NEO4J_URI", neo4j_uri)
    env = {**os.environ, "NEO4J_URI": neo4j_uri}
    finished = None
    for point in KILL_POINTS:
        before = {r["id"] for r in small_graph.read("runs_list")}
        done = subprocess.run([sys.executable, "-c", KILLED_SELECT, point, "-q", "select", "--n", "6", "--out", "runs"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == -9, done.stderr
        (run,) = [r for r in small_graph.read("runs_list") if r["id"] not in before]
        run_dir = tmp_path / "runs" / run["id"]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "running"  # the manifest never says complete before the run is
        assert not (run_dir / "selected.jsonl").exists() and not (run_dir / "ids.txt").exists()
        if point != "after_complete":
            assert run["status"] == "running"
            error, hint = one_error(cli("explain", "--run", run["id"], "--sample", "s0"), 2)
            assert f"run {run['id']} failed: interrupted: its process (pid {manifest['process']['pid']}" in error
            assert "select" in hint
            one_error(cli("runs", "compare", run["id"]), 2)
            listing = cli("runs").output
            assert f"{run['id']}\tg2is\tfailed" in listing and "interrupted" in listing
            assert small_graph.read("run_get", id=run["id"])[0]["run"]["status"] == "failed"
        else:
            assert run["status"] == "complete"
            assert f"{run['id']}\tg2is\tcomplete" in cli("runs").output  # the listing publishes its outputs
            manifest = json.loads((run_dir / "manifest.json").read_text())
            selected = (run_dir / "selected.jsonl").read_bytes()
            assert manifest["status"] == "complete" and manifest["n_selected"] == 6
            assert hashlib.sha256(selected).hexdigest() == manifest["selected_sha256"]
            assert sorted(p.name for p in run_dir.iterdir()) == ["ids.txt", "manifest.json", "selected.jsonl"]
            finished = run["id"]
    sample = (tmp_path / "runs" / finished / "ids.txt").read_text().split()[0]
    assert cli("explain", "--run", finished, "--sample", sample).exit_code == 0


def test_failures_after_the_run_exists_mark_it_failed_and_bad_requests_create_none(small_graph, tmp_path,
                                                                                  neo4j_uri, monkeypatch):
    monkeypatch.setenv("NEO4J_URI", neo4j_uri)
    error, hint = one_error(cli("select", "--n", "6", "--task", "no-such-task", "--out", "runs"), 2)
    assert "no validation examples for task(s) no-such-task in the graph (it has tasks: t)" in error
    assert "--task" in hint
    (tmp_path / "a-file").write_text("")
    error, hint = one_error(cli("select", "--n", "6", "--out", str(tmp_path / "a-file" / "runs")), 6)
    assert "a-file" in error
    assert small_graph.read("runs_list") == []  # neither left a run behind, running or not

    from g2is_graph.selection.runs import OpenRun, space_info

    space = space_info(small_graph)
    with pytest.raises(RuntimeError, match="the walk broke"):
        with OpenRun(small_graph, SelectionConfig(n_select=6), space, 6, tmp_path / "runs", run_id="live") as run:
            error, hint = one_error(cli("explain", "--run", "live", "--sample", "s0"), 2)
            assert "run live is still running (started" in error and f"pid {os.getpid()}" in error
            assert "wait for it to finish" in hint
            one_error(cli("runs", "compare", "live"), 2)
            assert json.loads((run.out_dir / "manifest.json").read_text())["status"] == "running"
            raise RuntimeError("the walk broke")
    recorded = small_graph.read("run_get", id="live")[0]["run"]
    assert recorded["status"] == "failed" and recorded["reason"] == "RuntimeError: the walk broke"
    manifest = json.loads((tmp_path / "runs" / "live" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["reason"] == "RuntimeError: the walk broke"
    error, _ = one_error(cli("explain", "--run", "live", "--sample", "s0"), 2)
    assert error == "error: run live failed: RuntimeError: the walk broke"

    error, hint = one_error(cli("explain", "--run", "no-such-run", "--sample", "s0"), 2)
    assert hint == "hint: `g2is runs` lists the runs"


def test_a_graph_rebuilt_during_a_run_fails_it(small_graph, tmp_path, monkeypatch):
    from g2is_graph.selection import runs as selection

    components = selection.components_of

    def rebuild_meanwhile(graph, space, config, n):
        more = synthetic_store(tmp_path / "more" / "c", clustered_vectors(4, 16, seed=9), synthetic_rows(4, prefix="m"))
        build_graph(graph, [more.path], GraphConfig(k=5, exact=True, device="cpu"), tmp_path / "state", progress=False)
        return components(graph, space, config, n)

    monkeypatch.setattr(selection, "components_of", rebuild_meanwhile)
    with pytest.raises(Exception, match=r"rebuilt while the run was selecting \(build 1 -> 2\)"):
        select(small_graph, SelectionConfig(n_select=6), tmp_path / "runs", progress=False)
    (run,) = small_graph.read("runs_list")
    assert run["status"] == "failed" and "rebuilt" in run["reason"]
    assert not any(Path(tmp_path / "runs").glob("*/selected.jsonl"))

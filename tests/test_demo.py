"""The demo end to end on the real SmolLM2-135M-Instruct and packaged data (slow: minutes on a CPU)."""

from __future__ import annotations

import json

import pytest

from g2is_graph.config import DemoConfig
from g2is_graph.demo import run_demo


@pytest.mark.slow
def test_demo_runs_end_to_end_on_real_data(graph, tmp_path):
    config = DemoConfig(pool_per_source=16, validation=8, test=10, ratio=0.1)
    summary = run_demo(graph, tmp_path / "demo", config, echo=lambda m: None, progress=False)
    assert set(summary["runs"]) == {"g2is", "less", "embedding", "random"}
    results = summary["results"]
    assert set(results) == {"base", "g2is", "less", "random"}
    assert all(r["n_items"] == 10 and r["answer_loss"] > 0 for r in results.values())
    saved = json.loads((tmp_path / "demo" / "demo-summary.json").read_text())
    assert saved["runs"] == summary["runs"] and (tmp_path / "demo" / "evaluate" / "comparison.png").exists()

"""The baselines read the graph a page at a time and re-read only the nodes that decide the ranking: the
picks equal the in-memory ones on the loaded vectors (the oracle), with a page far smaller than the pool."""

from __future__ import annotations

from conftest import build_selection_graph

from g2is_graph.config import SelectionConfig
from g2is_graph.selection import runs
from g2is_graph.selection.runs import (
    components_of,
    less_picks,
    less_picks_paged,
    load_validation,
    load_vectors,
    no_graph_picks,
    no_graph_picks_paged,
    space_info,
)


def test_paged_less_and_no_graph_equal_the_in_memory_baselines(graph, tmp_path, monkeypatch):
    build_selection_graph(graph, tmp_path, n=40)
    space = space_info(graph)
    vectors, nodes = load_vectors(graph, space)
    ids = [node["id"] for node in nodes]
    validation, records = load_validation(graph, space, ())
    groups = [r["subtask"] or r["task"] for r in records]
    pages = []
    real_pages = runs.vector_pages
    monkeypatch.setattr(runs, "vector_pages", lambda read, space_id, page: pages.append(1) or real_pages(read, space_id, 7))
    assert less_picks_paged(graph, space, validation, groups, 9) == less_picks(vectors, validation, groups, ids, 9)
    assert len(pages) == 1  # one pass (of pages of 7 nodes)
    components = components_of(graph, space, SelectionConfig(n_select=9), 9)
    assert no_graph_picks_paged(graph, space, components) == no_graph_picks(vectors, ids, components)

"""Why a sample was or was not selected in a run, from what the run recorded in Neo4j.

Selected: its rank, component, how it was reached (anchor / walk / fallback / score), the path of
walk edges back to its component's anchor, and the numbers that admitted it. Not selected: the
candidate checks it failed (conflict with which selected sample at what cosine, or consistency at
which step), or, if the walk never examined it, its cosine to each component next to the weakest
anchor's, and whether a selected node lists it as a SIMILAR neighbour.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from g2is_graph.db.graph import Graph, GraphError
from g2is_graph.errors import hinted
from g2is_graph.locks import ProcessIdentity
from g2is_graph.selection.diagnostics import describe


def settle(graph: Graph, run: dict[str, Any]) -> dict[str, Any]:
    """A `running` run whose process on this machine is gone (killed) will never complete: mark it failed.
    A complete run whose process was killed before it renamed its outputs: publish them."""
    if run.get("status") == "complete" and run.get("out_dir"):
        from g2is_graph.selection.runs import publish_outputs

        publish_outputs(Path(run["out_dir"]))
    if run.get("status") != "running":
        return run
    try:
        process = ProcessIdentity.from_dict(json.loads(run.get("process") or "null"))
    except json.JSONDecodeError:
        process = None
    if process is None or process.alive() is not False:
        return run
    reason = f"interrupted: its process ({process.describe()}) ended before the run completed"
    graph.write("run_fail_if_running", id=run["id"], reason=reason)
    return run | {"status": "failed", "reason": reason}


def complete_run(graph: Graph, run_id: str) -> dict[str, Any]:
    """The run's record, or a clear refusal when there is no such run or it is not complete (running or
    failed): its picks would be a part of a selection, never to be explained, compared or exported."""
    found = graph.read("run_get", id=run_id)
    if not found:
        raise hinted(GraphError(f"no selection run {run_id!r} in the database"), "`g2is runs` lists the runs")
    run = settle(graph, found[0]["run"])
    if run["status"] == "running":
        process = ProcessIdentity.from_dict(json.loads(run.get("process") or "null"))
        by = f" by {process.describe()}" if process else ""
        raise hinted(GraphError(f"run {run_id} is still running (started {run.get('started')}{by}): its picks "
                                "are not all recorded"), "wait for it to finish; `g2is runs` shows its status")
    if run["status"] != "complete":
        raise hinted(GraphError(f"run {run_id} {run['status']}: {run.get('reason', 'no reason recorded')}"),
                     "run the selection again; `g2is runs` lists the complete runs")
    return run


def explain(graph: Graph, run_id: str, sample_id: str) -> dict[str, Any]:
    run = complete_run(graph, run_id)
    info = graph.read("sample_info", id=sample_id)
    if not info:
        raise hinted(GraphError(f"no sample {sample_id!r} in the graph"),
                     "use an id from the run's ids.txt or from the pool's records")
    sample = info[0]
    out: dict[str, Any] = {"run": run_id, "method": run["method"], "status": run["status"], "sample": sample_id,
                           "source": f"{sample['source_file']}:{sample['line']}", "preview": sample["preview"]}
    diagnostics = json.loads(run["diagnostics"]) if run.get("diagnostics") else None
    if diagnostics is not None:
        out["diagnostics"] = diagnostics
    picks = [p["pick"] for p in graph.read("run_picks", id=run_id)]
    out["text"] = _answer(graph, run, picks, sample_id, out)
    if diagnostics is not None:
        out["text"] += "\n" + describe(diagnostics) + "".join(f"\nwarning: {w}" for w in diagnostics["warnings"])
    return out


def _answer(graph: Graph, run: dict[str, Any], picks: list[dict[str, Any]], sample_id: str,
            out: dict[str, Any]) -> str:
    """The explanation's words; fills `out` with the facts they rest on."""
    by_id = {p["id"]: p for p in picks}
    if sample_id in by_id:
        pick = by_id[sample_id]
        path = [pick]
        while path[-1].get("from_id") in by_id and path[-1]["how"] == "walk":
            path.append(by_id[path[-1]["from_id"]])
        out.update(selected=True, pick=pick, path=[p["id"] for p in path])
        return _selected_words(pick, path)
    out["selected"] = False
    rejections = [{k: r[k] for k in ("component", "step", "reason", "other", "value")}
                  for r in graph.read("run_rejections", run=run["id"], id=sample_id)]
    out["rejections"] = rejections
    components = json.loads(run.get("components") or "[]")
    if rejections:
        text = "Not selected. " + " ".join(_rejection_words(r) for r in out["rejections"][:5])
        if len(rejections) > 5:
            text += f" ({len(rejections)} rejections in all.)"
        return text
    reached_from = graph.read("similar_into", run=run["id"], id=sample_id)
    out["listed_by_selected"] = reached_from
    if run["method"] != "g2is":
        return (f"Not selected: the {run['method']} method ranked it outside the top "
                f"{run.get('n_selected')} (lowest selected score "
                f"{min((p.get('cos_k') or 0) for p in picks):.4f}).") if picks else "Not selected."
    text = "Not selected and never examined by the walk: "
    if reached_from:
        text += (f"selected node {reached_from[0]['id']} lists it as a SIMILAR neighbour (cos "
                 f"{reached_from[0]['weight']:.4f}) but the walk left that node before reaching it "
                 "(an earlier candidate was admitted, or the budget was filled).")
    else:
        text += "no selected node lists it among its SIMILAR neighbours, so no walk step could reach it."
    anchors = [p for p in picks if p["how"] in ("anchor", "fallback")]
    if anchors:
        weakest = min(p["cos_k"] for p in anchors)
        text += f" The weakest anchor or fallback had cos(z, K) = {weakest:.4f}."
    out["components"] = components
    return text


def path_words(ids: list[str], total: int | None = None) -> str:
    """A walk path as text; `total` > len(ids) says the path was cut after its first len(ids) picks."""
    text = " <- ".join(ids)
    return text + f" <- ... ({total} picks in all)" if total is not None and total > len(ids) else text


def _selected_words(pick: dict[str, Any], path: list[dict[str, Any]], path_total: int | None = None) -> str:
    how = pick["how"]
    head = f"Selected at rank {pick['rank']} for component {pick['component']} (step {pick['step']}) "
    if how == "anchor":
        return head + f"as the component's anchor: the unselected sample most aligned with it (cos(z, K) = {pick['cos_k']:.4f})."
    if how == "fallback":
        return head + (f"by the fallback: no SIMILAR neighbour of {pick['from_id']} passed both constraints, so the "
                       f"unselected sample most aligned with the component was taken (cos(z, K) = {pick['cos_k']:.4f}).")
    if how == "walk":
        min_cos = pick.get("min_cos_selected")
        return head + (f"by the walk from {pick['from_id']} along a SIMILAR edge (cos {pick['edge_cos']:.4f}); "
                       f"it conflicted with no selected sample (min cos {min_cos if min_cos is None else round(min_cos, 4)}) "
                       f"and kept the set aligned with the component (consistency ratio {pick['consistency']:.3f}). "
                       f"Walk path back to the anchor: {path_words([p['id'] for p in path], path_total)}.")
    if how == "random":
        return head + "by seeded random sampling."
    return head + f"by score {pick.get('cos_k', 0):.4f} (top of the {how} ranking)."


def _rejection_words(r: dict[str, Any]) -> str:
    if r["reason"] == "conflict":
        return (f"At step {r['step']} of component {r['component']} it was a candidate but conflicted with selected "
                f"sample {r['other']} (cos {r['value']:.4f} < 0).")
    return (f"At step {r['step']} of component {r['component']} it would have weakened the set's alignment with the "
            f"component to a ratio of {r['value']:.3f} (< delta).")


def list_runs(graph: Graph) -> list[dict[str, Any]]:
    return [settle(graph, run) for run in graph.read("runs_list")]


def compare_runs(graph: Graph, run_ids: list[str]) -> dict[str, Any]:
    """Pairwise overlap (Jaccard and count) and per-source counts of several runs."""
    picks = {}
    sources = {}
    diagnostics = {}
    for run_id in run_ids:
        run = complete_run(graph, run_id)
        if run.get("diagnostics"):
            diagnostics[run_id] = json.loads(run["diagnostics"])
        rows = graph.read("run_picks", id=run_id)
        picks[run_id] = {r["pick"]["id"] for r in rows}
        sources[run_id] = dict(Counter(r["dataset"] or r["source_file"] for r in rows))
    overlap = {}
    for i, a in enumerate(run_ids):
        for b in run_ids[i + 1:]:
            common = len(picks[a] & picks[b])
            union = len(picks[a] | picks[b])
            overlap[f"{a} vs {b}"] = {"common": common, "jaccard": common / union if union else 1.0}
    return {"sizes": {r: len(p) for r, p in picks.items()}, "overlap": overlap, "per_source": sources,
            "diagnostics": diagnostics}

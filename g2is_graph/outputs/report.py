"""One self-contained HTML page that shows selection runs: why each sample was picked, and how runs differ.

Everything the page needs is inside it (CSS, a few lines of JS, SVG drawn here), so it opens from a file on a
machine without network. Per run: the summary and config, the core-knowledge components with their
explained variance, budgets and fill, the walk drawn as a graph (one lane per component: anchors, SIMILAR steps,
fallbacks, and the candidates rejected at each step) or, for score methods, the score by rank, the rejections by
reason, the picks per source, and every pick with how it was reached and the explanation `g2is explain` gives.
Several runs add a side-by-side table, their pairwise overlap and per-source counts. A "regime diagnostics"
section is kept for what issue 18 adds to run records; today it lists what a run record holds.
All text from the data (ids, previews, sources) is escaped.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from g2is_graph.db.graph import Graph
from g2is_graph.errors import ReportError
from g2is_graph.files import atomic_write_text
from g2is_graph.selection.explain import _selected_words, settle

WALK_ROW = 30  # picks per row of a walk lane before it wraps
MAX_DRAWN_PICKS = 1500  # per run; every pick is still in the table
MAX_REJECTIONS_PER_STEP = 6
HOW_COLOURS = {"anchor": "#1b4f72", "walk": "#2e86c1", "fallback": "#e67e22", "score": "#7f8c8d",
               "random": "#95a5a6"}
REASON_COLOURS = {"conflict": "#c0392b", "consistency": "#8e44ad"}
PATH_SHOWN = 6
RUN_SUMMARY_KEYS = ("method", "status", "space", "n_pool", "n_requested", "n_selected", "steps", "round_trips",
                    "shortfall", "scan", "started", "finished", "out_dir")


@dataclass
class RunView:
    """What the page shows of one run, read from its :SelectionRun node and SELECTED relationships."""

    id: str
    props: dict[str, Any]
    picks: list[dict[str, Any]]  # pick properties + source_file, line, dataset, preview
    config: dict[str, Any]
    components: list[dict[str, Any]]
    rejections: list[dict[str, Any]]
    explanations: dict[str, str] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return str(self.props.get("method"))

    @property
    def ids(self) -> set[str]:
        return {p["id"] for p in self.picks}

    def source_counts(self) -> Counter:
        return Counter(p.get("dataset") or p.get("source_file") or "?" for p in self.picks)


def load_run(graph: Graph, run_id: str) -> RunView:
    found = graph.read("run_get", id=run_id)
    if not found:
        raise ReportError(f"no selection run {run_id!r}; `g2is runs` lists them")
    props = dict(settle(graph, found[0]["run"]))  # a run whose process is gone shows as failed, not running
    rows = graph.read("run_picks", id=run_id)
    picks = [{**r["pick"], "source_file": r["source_file"], "line": r["line"], "dataset": r["dataset"],
              "preview": r["preview"]} for r in rows]
    rejections = graph.read("run_rejections", run=run_id, id=None)
    view = RunView(run_id, props, picks, json.loads(props.get("config") or "{}"),
                   json.loads(props.get("components") or "[]"), rejections)
    view.explanations = explanations(picks)
    return view


def explanations(picks: list[dict[str, Any]]) -> dict[str, str]:
    """The `g2is explain` sentence of every pick, its walk path cut after PATH_SHOWN picks."""
    by_id = {p["id"]: p for p in picks}
    depth: dict[str, int] = {}
    for p in picks:  # selection order: a walk pick's predecessor is always earlier
        prev = p.get("from_id")
        depth[p["id"]] = depth.get(prev, 1) + 1 if p["how"] == "walk" and prev in by_id else 1
    out = {}
    for p in picks:
        path = [p]
        while len(path) < PATH_SHOWN and path[-1]["how"] == "walk" and path[-1].get("from_id") in by_id:
            path.append(by_id[path[-1]["from_id"]])
        out[p["id"]] = _selected_words(p, path, depth[p["id"]])
    return out


# -- SVG ----------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _amount(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3f}"


def _svg(kind: str, width: float, height: float, body: list[str], label: str) -> str:
    return (f'<svg class="plot" data-plot="{kind}" role="img" aria-label="{_e(label)}" '
            f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">'
            f"<title>{_e(label)}</title>" + "".join(body) + "</svg>")


def bar_chart(kind: str, label: str, rows: list[tuple[str, list[tuple[float, str, str]]]], unit: str = "",
              width: int = 640, legend: list[tuple[str, str]] | None = None) -> str:
    """Horizontal bars: rows of (label, [(value, colour, tooltip), ...]) stacked left to right."""
    label_w, bar_h, gap, right = 190, 18, 8, 90
    top = 22 if legend else 0
    total = max((sum(v for v, _, _ in parts) for _, parts in rows), default=0) or 1
    scale = (width - label_w - right) / total
    height = top + len(rows) * (bar_h + gap) + gap + 16
    body = [_legend(8, 16, legend)] if legend else []
    for i, (name, parts) in enumerate(rows):
        y = top + gap + i * (bar_h + gap)
        body.append(f'<text x="{label_w - 6}" y="{y + bar_h - 5}" text-anchor="end" class="lbl">{_e(_short(name, 28))}'
                    f"<title>{_e(name)}</title></text>")
        x = label_w
        for value, colour, tip in parts:
            w = max(value * scale, 0)
            body.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                        f"<title>{_e(tip)}</title></rect>")
            x += w
        body.append(f'<text x="{x + 5:.1f}" y="{y + bar_h - 5}" class="val">'
                    f'{_e(_amount(sum(v for v, _, _ in parts)) + unit)}</text>')
    body.append(f'<line x1="{label_w}" y1="{top + gap / 2}" x2="{label_w}" y2="{height - 16}" class="axis"/>')
    return _svg(kind, width, height, body, label)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def walk_graph(view: RunView) -> str:
    """The walk as a graph: a lane per component, picks left to right by step (wrapping every WALK_ROW),
    SIMILAR steps as solid edges, fallbacks dashed from the node the walk was stuck at, rejected candidates
    as crosses under the step they were refused at."""
    picks = view.picks[:MAX_DRAWN_PICKS]
    by_component: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in picks:
        by_component[int(p["component"])].append(p)
    rejected: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in view.rejections:
        rejected[(int(r["component"]), int(r["step"]))].append(r)
    dx, row_h, top, left = 30, 84, 78, 70
    labelled = len(picks) <= 300
    width = left + WALK_ROW * dx + 20
    y0 = top
    pos: dict[str, tuple[float, float]] = {}
    nodes, edges, marks = [], [], []
    for c in sorted(by_component):
        members = by_component[c]
        rows = math.ceil(len(members) / WALK_ROW)
        marks.append(f'<text x="8" y="{y0 + 4}" class="lane">K{c}</text>'
                     f'<line x1="{left - 14}" y1="{y0 - 44}" x2="{width - 10}" y2="{y0 - 44}" class="lanesep"/>')
        for i, p in enumerate(members):
            x = left + (i % WALK_ROW) * dx
            y = y0 + (i // WALK_ROW) * row_h
            pos[p["id"]] = (x, y)
            for j, r in enumerate(rejected.get((c, int(p["step"])), [])[:MAX_REJECTIONS_PER_STEP]):
                ry = y + 14 + j * 7
                tip = f"rejected at step {p['step']}: {r['id']} ({r['reason']}, {_num(r['value'])}" + (
                    f", conflicts with {r['other']})" if r.get("other") else ")")
                colour = REASON_COLOURS.get(r["reason"], "#555")
                marks.append(f'<path class="rej" d="M{x - 3} {ry - 3}L{x + 3} {ry + 3}M{x - 3} {ry + 3}L{x + 3} {ry - 3}" '
                             f'stroke="{colour}"><title>{_e(tip)}</title></path>')
            extra = len(rejected.get((c, int(p["step"])), [])) - MAX_REJECTIONS_PER_STEP
            if extra > 0:
                marks.append(f'<text x="{x + 5}" y="{y + 14 + MAX_REJECTIONS_PER_STEP * 7}" class="more">+{extra}</text>')
        y0 += rows * row_h + 40
    for p in picks:
        x, y = pos[p["id"]]
        source = pos.get(p.get("from_id") or "")
        if source and p["how"] in ("walk", "fallback"):
            dash = ' stroke-dasharray="4 3"' if p["how"] == "fallback" else ""
            tip = (f"{p['from_id']} -> {p['id']}: SIMILAR edge, cos {_num(p.get('edge_cos'))}" if p["how"] == "walk"
                   else f"{p['from_id']} -> {p['id']}: no neighbour passed, fallback")
            edges.append(f'<line x1="{source[0]}" y1="{source[1]}" x2="{x}" y2="{y}" class="edge {p["how"]}"{dash}>'
                         f"<title>{_e(tip)}</title></line>")
        colour = HOW_COLOURS.get(p["how"], "#333")
        radius = 7 if p["how"] in ("anchor", "fallback") else 5
        tip = f"#{p['rank']} {p['id']} ({p['how']}, step {p['step']}) cos(z,K) {_num(p.get('cos_k'))}: " + (
            view.explanations.get(p["id"], ""))
        nodes.append(f'<circle cx="{x}" cy="{y}" r="{radius}" fill="{colour}" class="node" data-id="{_e(p["id"])}">'
                     f"<title>{_e(tip)}</title></circle>")
        if labelled:
            nodes.append(f'<text x="{x + 2}" y="{y - 10}" transform="rotate(-40 {x + 2} {y - 10})" class="nid">'
                         f"{_e(_short(p['id'], 14))}</text>")
    legend = _legend(8, 14, list(HOW_COLOURS.items())[:3] + [(f"rejected: {k}", v) for k, v in REASON_COLOURS.items()])
    height = y0 - 20
    label = f"walk of run {view.id}: {len(picks)} picks in {len(by_component)} components"
    return _svg("walk", width, height, [legend] + marks + edges + nodes, label)


def _legend(x: float, y: float, items: list[tuple[str, str]]) -> str:
    out, cursor = [], x
    for name, colour in items:
        out.append(f'<circle cx="{cursor + 5}" cy="{y - 4}" r="5" fill="{colour}"/>'
                   f'<text x="{cursor + 14}" y="{y}" class="lbl">{_e(name)}</text>')
        cursor += 22 + 7 * len(name)
    return "".join(out)


def score_plot(view: RunView) -> str:
    """Score (cos(z, K) or the baseline's score) against rank, for methods without a walk."""
    values = [(p["rank"], p.get("cos_k")) for p in view.picks if p.get("cos_k") is not None]
    width, height, pad = 640, 220, 40
    if not values:
        return f"<p class='note'>Method <code>{_e(view.method)}</code> records no score per pick.</p>"
    low, high = min(v for _, v in values), max(v for _, v in values)
    span = (high - low) or 1.0
    n = max(r for r, _ in values)
    pts = [(pad + (r - 1) / max(n - 1, 1) * (width - 2 * pad), height - pad - (v - low) / span * (height - 2 * pad))
           for r, v in values]
    body = [f'<polyline class="line" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>',
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>',
            f'<text x="{pad}" y="{height - 10}" class="lbl">rank 1</text>',
            f'<text x="{width - pad}" y="{height - 10}" text-anchor="end" class="lbl">rank {n}</text>',
            f'<text x="{pad + 4}" y="{pad - 6}" class="lbl">{_num(high)}</text>',
            f'<text x="{pad + 4}" y="{height - pad - 6}" class="lbl">{_num(low)}</text>']
    return _svg("scores", width, height, body, f"score by rank of run {view.id}")


def overlap_matrix(views: list[RunView]) -> str:
    cell, left, top = 74, 220, 30
    n = len(views)
    width, height = left + n * cell + 10, top + n * cell + 10
    body = []
    for i, a in enumerate(views):
        body.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end" class="lbl">'
                    f"{_e(_short(a.id, 30))}<title>{_e(a.id)}</title></text>")
        body.append(f'<text x="{left + i * cell + cell / 2}" y="{top - 8}" text-anchor="middle" class="lbl">'
                    f"{_e(_short(a.method, 10))} {i + 1}<title>{_e(a.id)}</title></text>")
        for j, b in enumerate(views):
            common = len(a.ids & b.ids)
            union = len(a.ids | b.ids)
            jaccard = common / union if union else 1.0
            shade = int(245 - 170 * jaccard)
            ink = ' style="fill:#fff"' if jaccard > 0.6 else ""
            body.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell - 2}" height="{cell - 2}" '
                        f'fill="rgb({shade},{min(shade + 5, 250)},255)"><title>{_e(a.id)} vs {_e(b.id)}: '
                        f"{common} common, Jaccard {jaccard:.3f}</title></rect>"
                        f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2}" text-anchor="middle" '
                        f'class="cell"{ink}>{common}</text><text x="{left + j * cell + cell / 2}" '
                        f'y="{top + i * cell + cell / 2 + 14}" text-anchor="middle" class="cellsub"{ink}>'
                        f"J {jaccard:.2f}</text>")
    return _svg("overlap", width, height, body, "pairwise overlap of the runs' selections")


# -- HTML ---------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[Any]], cls: str = "", raw_columns: tuple[int, ...] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if i in raw_columns else _e(c)}</td>" for i, c in enumerate(row))
                   + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def components_section(view: RunView) -> str:
    if not view.components:
        return (f"<p class='note'>Method <code>{_e(view.method)}</code> uses no core-knowledge components "
                "(it ranks the whole pool).</p>")
    filled = view.props.get("filled") or []
    rows, bars = [], []
    for i, c in enumerate(view.components):
        fill = filled[i] if i < len(filled) else sum(1 for p in view.picks if int(p["component"]) == i)
        rows.append([f"K{i}", c.get("task"), _num(c.get("explained_ratio")), _num(c.get("weight")), c.get("budget"),
                     fill, "yes" if c.get("flipped") else "no", _num(c.get("mean_projection"))])
        bars.append((f"K{i} · budget {c.get('budget')} · filled {fill}",
                     [(float(c.get("explained_ratio") or 0), "#2e86c1",
                       f"explained variance ratio {_num(c.get('explained_ratio'))}, weight {_num(c.get('weight'))}")]))
    chart = bar_chart("components", f"explained variance of the components of run {view.id}", bars)
    table = _table(["component", "task", "explained variance", "weight", "budget", "filled", "flipped",
                    "mean projection"], rows)
    return f"{chart}{table}<p class='note'>tau = {_e(view.config.get('tau'))}: the fewest components whose " \
           f"cumulative explained variance exceeds it; budgets by largest remainder of N x weight.</p>"


def _value_html(value: Any) -> str:
    """A diagnostics value: numbers rounded, maps inline, lists of maps as a small table."""
    if isinstance(value, float):
        return _e(f"{value:.4g}")
    if isinstance(value, dict):
        return "; ".join(f"{_e(k)} {_value_html(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = list(dict.fromkeys(k for v in value for k in v))
        return _table(keys, [[_value_html(v.get(k)) for k in keys] for v in value], "sub",
                      raw_columns=tuple(range(len(keys))))
    if isinstance(value, list):
        return ", ".join(_value_html(v) for v in value) or "–"
    return _e(_num(value))


def run_diagnostics(view: RunView) -> dict[str, Any] | None:
    diagnostics = view.props.get("diagnostics")
    if not diagnostics:
        return None
    return json.loads(diagnostics) if isinstance(diagnostics, str) else dict(diagnostics)


def diagnostics_section(view: RunView) -> str:
    """The run's regime diagnostics (a JSON map on the run, written by G2IS runs once issue 18 is in), its
    warnings first; or, for a run without them, what the run record holds."""
    diagnostics = run_diagnostics(view)
    if diagnostics is not None:
        warnings = diagnostics.pop("warnings", None) or []
        head = "".join(f"<p class='warn'>warning: {_e(w)}</p>" for w in warnings)
        rows = [[_e(k), _value_html(v)] for k, v in diagnostics.items()]
        return (f"<div data-section='regime-diagnostics'>{head}"
                f"{_table(['diagnostic', 'value'], rows, 'diagnostics', raw_columns=(0, 1))}</div>")
    present = sorted(k for k in view.props if k not in ("rejections",))
    return ("<div class='placeholder' data-section='regime-diagnostics'><p>No regime diagnostics in this run "
            "record (G2IS runs record them from issue 18 on: picks per component, anchor/walk/fallback shares, "
            "rejections, alignment, pool cosines, CONFLICT edges). What the run record holds:</p><p><code>"
            + ", ".join(_e(k) for k in present) + "</code></p></div>")


def rejections_section(view: RunView) -> str:
    if not view.rejections:
        why = "the walk rejected no candidate" if view.method in ("g2is",) else \
            f"method {view.method} has no candidate tests"
        return f"<p class='note'>No rejections: {_e(why)}.</p>"
    counts = Counter((int(r["component"]), r["reason"]) for r in view.rejections)
    components = sorted({c for c, _ in counts})
    rows = [(f"K{c}", [(float(counts[(c, reason)]), colour, f"{counts[(c, reason)]} rejected for {reason}")
                       for reason, colour in REASON_COLOURS.items() if counts[(c, reason)]]) for c in components]
    chart = bar_chart("rejections", f"rejections by reason of run {view.id}", rows)
    by_id = Counter(r["id"] for r in view.rejections)
    top = [[i, n, ", ".join(sorted({r["reason"] for r in view.rejections if r["id"] == i}))]
           for i, n in by_id.most_common(10)]
    totals = Counter(r["reason"] for r in view.rejections)
    legend = ", ".join(f"{reason}: {n}" for reason, n in sorted(totals.items()))
    return (f"{chart}<p class='note'>{len(view.rejections)} rejections ({_e(legend)}). Conflict: a negative cosine "
            "with a selected sample; consistency: it would weaken the set's alignment below delta.</p>"
            + _table(["most rejected sample", "times", "reasons"], top))


def sources_section(views: list[RunView]) -> str:
    counts = [v.source_counts() for v in views]
    sources = sorted({s for c in counts for s in c})
    palette = ["#2e86c1", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d"]
    rows = [(s, [(float(c[s]), palette[i % len(palette)], f"{v.id}: {c[s]}") for i, (v, c) in
                 enumerate(zip(views, counts))]) for s in sources]
    legend = [(f"{i + 1}: {v.method}", palette[i % len(palette)]) for i, v in enumerate(views)] if len(views) > 1 else None
    return bar_chart("sources", "picks per source" + (" (one colour per run)" if len(views) > 1 else ""), rows,
                     legend=legend)


def picks_section(view: RunView) -> str:
    rows = []
    for p in view.picks:
        rows.append([p["rank"], p["id"], f"K{p['component']}", p["step"], p["how"], p.get("from_id") or "",
                     _num(p.get("cos_k")), _num(p.get("edge_cos")), _num(p.get("consistency"), 3),
                     _num(p.get("min_cos_selected")), f"{p.get('source_file')}:{p.get('line')}",
                     p.get("dataset") or "", p.get("preview") or "", view.explanations.get(p["id"], "")])
    table = _table(["rank", "id", "comp.", "step", "how", "from", "cos(z,K)", "edge cos", "consistency", "min cos",
                    "source", "dataset", "preview", "why"], rows, "picks")
    return (f'<input type="search" class="filter" placeholder="filter picks (id, source, text)" '
            f'data-target="picks-{_e(view.id)}" aria-label="filter picks">'
            f'<div class="scroll" id="picks-{_e(view.id)}">{table}</div>')


def run_section(view: RunView, index: int) -> str:
    props = view.props
    summary = _table(["field", "value"], [[k, props.get(k)] for k in RUN_SUMMARY_KEYS if props.get(k) is not None]
                     + [["how", dict(Counter(p["how"] for p in view.picks))]], "kv")
    config = _table(["option", "value"], [[k, v] for k, v in sorted(view.config.items())], "kv")
    graph_plot = walk_graph(view) if view.method in ("g2is", "no-gradient") else score_plot(view)
    drawn = (f"<p class='note'>First {MAX_DRAWN_PICKS} of {len(view.picks)} picks drawn; all are in the table.</p>"
             if len(view.picks) > MAX_DRAWN_PICKS else "")
    graph_title = "Walk paths" if view.method in ("g2is", "no-gradient") else "Scores by rank"
    return f"""<section class="run" id="run-{index}" data-run="{_e(view.id)}">
<h2>Run {index}: <code>{_e(view.id)}</code> <span class="badge">{_e(view.method)}</span></h2>
<div class="two"><div><h3>Summary</h3>{summary}</div><div><h3>Config</h3>{config}</div></div>
<h3>Core-knowledge components</h3>{components_section(view)}
<h3>Regime diagnostics</h3>{diagnostics_section(view)}
<h3>{graph_title}</h3><div class="scroll">{graph_plot}</div>{drawn}
<h3>Rejections</h3>{rejections_section(view)}
<h3>Per source</h3>{sources_section([view])}
<h3>Every pick, how it was reached and why</h3>{picks_section(view)}
</section>"""


def comparison_section(views: list[RunView]) -> str:
    keys = sorted({k for v in views for k in v.config})
    differing = [k for k in keys if len({json.dumps(v.config.get(k), sort_keys=True) for v in views}) > 1]
    head = ["", *[f"{i + 1}: {v.id}" for i, v in enumerate(views)]]
    rows = [["method", *[v.method for v in views]], ["status", *[v.props.get("status") for v in views]],
            ["selected / requested / pool", *[f"{len(v.picks)} / {v.props.get('n_requested')} / "
                                              f"{v.props.get('n_pool')}" for v in views]],
            ["components (budgets)", *[", ".join(str(c.get("budget")) for c in v.components) or "–" for v in views]],
            ["how", *[", ".join(f"{k} {n}" for k, n in Counter(p["how"] for p in v.picks).items()) for v in views]],
            ["rejections", *[len(v.rejections) for v in views]],
            ["shortfall", *[v.props.get("shortfall", "–") for v in views]],
            ["regime warnings", *[len((run_diagnostics(v) or {}).get("warnings") or []) if run_diagnostics(v)
                                  else "–" for v in views]]]
    rows += [[f"config: {k}", *[json.dumps(v.config.get(k)) for v in views]] for k in differing]
    return (f"<section id='compare'><h2>Side by side</h2>{_table(head, rows, 'compare')}"
            f"<h3>Overlap</h3>{overlap_matrix(views)}<h3>Per source</h3>{sources_section(views)}</section>")


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1c2833;background:#fbfcfc}
header{background:#1b4f72;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header a{color:#d6eaf8}main{padding:8px 24px 40px}h2{border-bottom:2px solid #d6dbdf;padding-bottom:4px}
h3{margin:22px 0 6px;color:#1b4f72}table{border-collapse:collapse;margin:6px 0;font-size:12.5px}
th,td{border:1px solid #d6dbdf;padding:3px 6px;vertical-align:top;text-align:left}th{background:#eaf2f8}
table.picks td:nth-child(13),table.picks td:nth-child(14){min-width:260px}.scroll{overflow:auto;max-height:640px}
.two{display:flex;gap:28px;flex-wrap:wrap}.badge{background:#2e86c1;color:#fff;border-radius:4px;padding:1px 6px;
font-size:13px}.note{color:#566573}.placeholder{border:1px dashed #aab7b8;padding:6px 12px;background:#f4f6f6}
svg.plot{background:#fff;border:1px solid #e5e8e8;margin:4px 0}svg .lbl{font-size:11px;fill:#283747}
svg .val{font-size:11px;fill:#566573}svg .axis{stroke:#aab7b8}svg .lane{font-size:13px;font-weight:600;fill:#1b4f72}
svg .lanesep{stroke:#e5e8e8}svg .edge{stroke:#5d6d7e;stroke-width:1.3}svg .edge.fallback{stroke:#e67e22}
svg .rej{stroke-width:1.6}svg .more{font-size:9px;fill:#566573}svg .line{fill:none;stroke:#2e86c1;stroke-width:2}
svg .cell{font-size:15px;font-weight:600;fill:#1c2833}svg .nid{font-size:9px;fill:#566573}svg .cellsub{font-size:10px;fill:#566573}
input.filter{margin:4px 0;padding:4px 8px;width:320px}.warn{color:#a04000;font-weight:600}
table.sub{margin:0;font-size:11.5px}
"""

SCRIPT = """
(function () {
  "use strict";
  document.querySelectorAll("input.filter").forEach(function (input) {
    input.addEventListener("input", function () {
      var needle = input.value.toLowerCase();
      var box = document.getElementById(input.getAttribute("data-target"));
      box.querySelectorAll("tbody tr").forEach(function (row) {
        row.style.display = row.textContent.toLowerCase().indexOf(needle) === -1 ? "none" : "";
      });
    });
  });
})();
"""


def render(views: list[RunView]) -> str:
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    nav = " · ".join(f'<a href="#run-{i + 1}">{_e(v.method)} {i + 1}</a>' for i, v in enumerate(views))
    if len(views) > 1:
        nav = '<a href="#compare">side by side</a> · ' + nav
    sections = (comparison_section(views) if len(views) > 1 else "") + "".join(
        run_section(v, i + 1) for i, v in enumerate(views))
    title = "g2is report: " + ", ".join(v.id for v in views)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{STYLE}</style></head>
<body><header><h1>g2is selection report</h1><div>{len(views)} run{'s' if len(views) > 1 else ''}, generated
{_e(generated)} · {nav}</div></header><main>{sections}</main><script>{SCRIPT}</script></body></html>
"""


def write_report(graph: Graph, run_ids: list[str], out: str | Path) -> Path:
    if len(set(run_ids)) != len(run_ids):
        raise ReportError(f"a run is named twice: {run_ids}")
    views = [load_run(graph, run_id) for run_id in run_ids]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, render(views))
    return out

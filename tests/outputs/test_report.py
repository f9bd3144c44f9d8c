"""`g2is report` pages opened in a real headless chromium: they render, their plots are drawn, nothing is
fetched from the network, the console stays clean, and data text (ids, previews) cannot inject markup."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import build_selection_graph
from headless import Browser, page_problems, requested_urls
from PIL import Image

from g2is_graph.cli import main
from g2is_graph.config import SelectionConfig
from g2is_graph.outputs.report import ReportError, write_report
from g2is_graph.selection.runs import select

PAGE_FACTS = """(() => {
  const plots = [...document.querySelectorAll('svg.plot')].map(s => {
    const box = s.getBoundingClientRect();
    return {kind: s.dataset.plot, width: box.width, height: box.height, shapes: s.querySelectorAll('rect,circle,line,path,polyline').length};
  });
  return {
    title: document.title,
    plots: plots,
    runs: [...document.querySelectorAll('section.run')].map(s => s.dataset.run),
    pickRows: [...document.querySelectorAll('table.picks')].map(t => t.tBodies[0].rows.length),
    walkNodes: document.querySelectorAll('svg[data-plot=walk] circle.node').length,
    walkEdges: document.querySelectorAll('svg[data-plot=walk] line.edge').length,
    scripts: document.scripts.length,
    text: document.body.innerText,
    diagnostics: document.querySelectorAll('[data-section=regime-diagnostics]').length,
  };
})()"""

FILTER = """(() => {
  const input = document.querySelector('input.filter');
  input.value = 'r4';
  input.dispatchEvent(new Event('input'));
  const rows = [...document.getElementById(input.dataset.target).querySelectorAll('tbody tr')];
  return {shown: rows.filter(r => r.style.display !== 'none').map(r => r.textContent.toLowerCase()),
          hidden: rows.filter(r => r.style.display === 'none').map(r => r.textContent.toLowerCase())};
})()"""


@pytest.fixture()
def runs(graph, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_selection_graph(graph, tmp_path)
    return {method: select(graph, SelectionConfig(method=method, n_select=10, delta=0.9), tmp_path / "runs",
                           echo=lambda m: None, progress=False)
            for method in ("g2is", "less", "random")}


def test_report_of_several_runs_renders_in_chromium_with_its_plots_and_no_errors(graph, runs, tmp_path):
    g2is, less, random = runs["g2is"], runs["less"], runs["random"]
    page = write_report(graph, [g2is.id, less.id, random.id], tmp_path / "report.html")
    html = page.read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html  # nothing to fetch
    with Browser() as browser:
        events = browser.open(page.as_uri())
        facts = browser.evaluate(PAGE_FACTS)
        shot = browser.screenshot(tmp_path / "report.png")
        filtered = browser.evaluate(FILTER)
        late = []
        while not browser.events.empty():
            late.append(browser.events.get())
    assert page_problems(events + late) == []
    assert requested_urls(events) == [page.as_uri()]
    assert facts["runs"] == [g2is.id, less.id, random.id]
    kinds = [p["kind"] for p in facts["plots"]]
    # comparison: overlap + sources; per run: components (g2is only), walk or scores, rejections (if any), sources
    assert kinds.count("overlap") == 1 and kinds.count("walk") == 1 and kinds.count("scores") == 1
    assert kinds.count("components") == 1 and kinds.count("sources") == 4
    assert kinds.count("rejections") == (1 if g2is.walk.rejections else 0)
    assert all(p["width"] > 100 and p["height"] > 30 and p["shapes"] > 0 for p in facts["plots"])
    assert facts["pickRows"] == [10, 10, 10]
    assert facts["walkNodes"] == 10
    assert facts["walkEdges"] == sum(1 for p in g2is.picks if p.how in ("walk", "fallback"))
    assert facts["scripts"] == 1 and "<script>alert('x')</script>" not in html  # escaped, and the text shows
    assert facts["text"].count("<script>alert('x')</script>") >= 30
    assert facts["diagnostics"] == 3 and "issue 18" in facts["text"]  # none of these runs carries them yet
    first = g2is.picks[0]
    assert f"Selected at rank 1 for component {first.component}" in facts["text"]
    assert filtered["hidden"] and all("r4" in t for t in filtered["shown"]) and not any("r4" in t for t in filtered["hidden"])
    image = Image.open(shot)
    assert image.width == 1400 and image.height > 1000
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # drawn, not a blank page


def test_regime_diagnostics_of_a_run_are_shown_with_their_warnings_first(graph, runs, tmp_path):
    """A run record carrying diagnostics as issue 18 writes them (a JSON map with warnings) gets a table."""
    import json

    diagnostics = {"components": 2, "budget_per_component": {"min": 5, "median": 5.0, "max": 5},
                   "share": {"anchor": 0.2, "walk": 0.7, "fallback": 0.1}, "rejections": {"conflict": 3},
                   "alignment": [{"component": 0, "anchor": 0.81, "end": 0.77}], "conflict_edges": 0,
                   "warnings": ["the graph has no CONFLICT edge <b>here</b>"]}
    graph.write("run_finish", id=runs["g2is"].id, props={"diagnostics": json.dumps(diagnostics)}, status="complete")
    page = write_report(graph, [runs["g2is"].id, runs["less"].id], tmp_path / "diag.html")
    with Browser() as browser:
        events = browser.open(page.as_uri())
        facts = browser.evaluate("""(() => ({
          tables: document.querySelectorAll('[data-section=regime-diagnostics] table.diagnostics').length,
          placeholders: document.querySelectorAll('.placeholder[data-section=regime-diagnostics]').length,
          warning: document.querySelector('[data-section=regime-diagnostics] .warn').textContent,
          alignment: document.querySelector('table.diagnostics table.sub').rows.length,
        }))()""")
    assert page_problems(events) == []
    assert facts == {"tables": 1, "placeholders": 1, "warning": "warning: the graph has no CONFLICT edge <b>here</b>",
                     "alignment": 2}


def test_report_of_one_run_through_the_cli_and_an_unknown_run(graph, runs, tmp_path, neo4j_uri, monkeypatch):
    monkeypatch.setenv("NEO4J_URI", neo4j_uri)
    monkeypatch.setenv("G2IS_HOME", str(tmp_path / "home"))
    out = tmp_path / "one.html"
    result = CliRunner().invoke(main, ["-q", "report", runs["g2is"].id, "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "Side by side" not in html and html.count('data-plot="walk"') == 1
    with Browser() as browser:
        events = browser.open(out.as_uri())
        assert browser.evaluate("document.querySelectorAll('svg.plot').length") >= 3
    assert page_problems(events) == []
    missing = CliRunner().invoke(main, ["-q", "report", "no-such-run", "--out", str(out)])
    assert missing.exit_code == 2 and "no selection run 'no-such-run'" in missing.output
    with pytest.raises(ReportError, match="named twice"):
        write_report(graph, [runs["less"].id, runs["less"].id], out)
    assert html.count("<svg") >= 3  # one file, its plots inline

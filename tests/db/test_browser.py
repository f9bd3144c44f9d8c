"""Neo4j Browser from the project's server: off by default; on, served on loopback behind the same auth, and a
real headless chromium logs in through it. The saved queries of docs/neo4j-browser.md run on a real run."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import build_selection_graph
from headless import Browser
from test_server import listening_addresses

from g2is_graph.config import SelectionConfig, ServerConfig
from g2is_graph.db.server import LocalServer, _free_port
from g2is_graph.selection.runs import select

DOCS = Path(__file__).resolve().parents[2] / "docs" / "neo4j-browser.md"
LOGIN = """((user, password) => {
  const set = (el, v) => {
    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(el, v);
    el.dispatchEvent(new Event('input', {bubbles: true}));
  };
  set(document.querySelector('[data-testid=username]'), user);
  set(document.querySelector('[data-testid=password]'), password);
  const button = [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Connect');
  button.click();
  return true;
})(%s, %s)"""


def wait_for(browser: Browser, expression: str, seconds: float = 40.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expression} stayed false for {seconds:.0f}s:\n{browser.evaluate('document.body.innerText')[:800]}")


def test_the_browser_is_off_by_default(neo4j_server):
    assert ServerConfig().browser is False
    conf = (neo4j_server.home / "conf" / "neo4j.conf").read_text()
    assert "server.http.enabled=false" in conf and neo4j_server.status().browser is None


def test_browser_on_loopback_behind_auth_and_a_real_login(tmp_path):
    server = LocalServer(ServerConfig(state_dir=tmp_path / "neo4j", port=_free_port(), http_port=_free_port(),
                                      auth=True, browser=True, heap="512m", pagecache="128m"))
    status = server.start(echo=lambda m: None)
    try:
        assert status.browser and status.browser in status.line()
        http_port = int(re.search(r":(\d+)/browser/", status.browser).group(1))
        assert listening_addresses(http_port) <= {"0100007F", "0000000000000000FFFF00000100007F"}
        page = urllib.request.urlopen(status.browser).read().decode()
        assert "<title>Neo4j Browser</title>" in page
        query = urllib.request.Request(status.browser.replace("/browser/", "/db/neo4j/query/v2"),
                                       data=json.dumps({"statement": "RETURN 1"}).encode(),
                                       headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(query)
            raise AssertionError("the HTTP API answered without credentials")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401
        with Browser() as browser:
            browser.open(status.browser)
            wait_for(browser, "!!document.querySelector('[data-testid=password]')")
            browser.evaluate(LOGIN % (json.dumps("neo4j"), json.dumps(server.password())))
            text = wait_for(browser, "document.body.innerText.includes('You are connected as user') && "
                                     "document.body.innerText")
        assert "You are connected as user" in text and "neo4j" in text
    finally:
        server.stop()


def saved_queries() -> list[tuple[str, dict[str, str]]]:
    """The ```cypher blocks of the docs: (statement, {param: placeholder})."""
    out = []
    for block in re.findall(r"```cypher\n(.*?)```", DOCS.read_text(), re.S):
        params = dict(re.findall(r"^:param (\w+) => '([^']*)'$", block, re.M))
        statement = "\n".join(line for line in block.splitlines() if not line.startswith(":param"))
        out.append((statement, params))
    return out


def test_saved_queries_of_the_docs_run_on_a_real_run(graph, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build_selection_graph(graph, tmp_path)
    run = select(graph, SelectionConfig(n_select=10, delta=0.9), None, echo=lambda m: None, progress=False)
    rejected = run.walk.rejections[0].id if run.walk.rejections else run.picks[-1].id
    values = {"RUN_ID": run.id, "SAMPLE_ID": rejected}
    queries = saved_queries()
    assert len(queries) == 6
    results = []
    for statement, params in queries:
        records, _, _ = graph._driver.execute_query(statement, {k: values[v] for k, v in params.items()},
                                                    database_=graph.database)
        results.append(records)
    picks, walk, starts, neighbourhood, conflicts, runs = results
    assert [r["id"] for r in picks] == [p.id for p in run.picks]
    assert len(walk) == sum(1 for p in run.picks if p.how == "walk")  # every walk step is a stored SIMILAR edge
    assert [(r["component"], r["how"]) for r in starts] == [(p.component, p.how) for p in run.picks
                                                            if p.how in ("anchor", "fallback")]
    assert neighbourhood and all(r["z"]["id"] == rejected for r in neighbourhood)
    assert all(r["cosine"] < 0 for r in conflicts)
    assert [r["id"] for r in runs] == [run.id]

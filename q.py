from g2is_graph.cli import Context
from g2is_graph.config import ConnectionConfig
import sys
ctx = Context(None, False, True)
with ctx.graph() as g:
    print(g._run_auto("MATCH (s:Sample) RETURN count(s) AS n, count(DISTINCT s.row) AS rows, min(s.row) AS lo, max(s.row) AS hi"))

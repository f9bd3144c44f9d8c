"""The one module that talks to Neo4j: owns the driver, runs named Cypher files, batches writes.

Every statement lives in `cypher/<name>.cypher` and takes values only as parameters. Writes go
through managed transactions, which the driver retries with backoff on transient errors (deadlocks,
leader switches, dropped connections); a server that stays unreachable ends in `GraphUnavailable`,
one line that names the URI and how to start a server, never the password.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from g2is_graph.config import ConnectionConfig, ServerConfig
from g2is_graph.errors import GraphError, GraphUnavailable
from g2is_graph.numerics import exact_matvec

MAX_RETRY_TIME_S = 30.0


@functools.cache
def cypher(name: str) -> str:
    """The text of cypher/<name>.cypher (names are code constants, never user input)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"invalid Cypher file name {name!r}")
    resource = importlib.resources.files("cypher") / f"{name}.cypher"
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise KeyError(f"no Cypher file cypher/{name}.cypher") from exc


def statements(name: str) -> list[str]:
    """A multi-statement file (the schema) split on semicolons, comments dropped."""
    body = "\n".join(line for line in cypher(name).splitlines() if not line.strip().startswith("//"))
    return [part.strip() for part in body.split(";") if part.strip()]


def _rows(result) -> list[dict[str, Any]]:
    """Rows as dicts of plain values. record.data() walks every value recursively; rows of 8192-float vectors
    made that the walk's main cost (bench/walk.py), and our statements return plain values only."""
    keys = result.keys()
    return [dict(zip(keys, record.values())) for record in result]


def batched(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def resolve_connection(conn: ConnectionConfig | None = None, server: ServerConfig | None = None,
                       start_local: bool = True, echo=print) -> tuple[str, tuple[str, str] | None, ConnectionConfig]:
    """The URI and auth to use: the configured server, or the project-managed local one."""
    conn = conn or ConnectionConfig.from_env()
    if conn.uri:
        auth = (conn.user, conn.password) if conn.password is not None else None
        return conn.uri, auth, conn
    from g2is_graph.db.server import LocalServer

    local = LocalServer(server)
    status = local.status()
    if status.state != "running" and not start_local:
        raise GraphUnavailable(f"no NEO4J_URI set and the local server is {status.state}; "
                               "start it with `g2is neo4j start`")
    if start_local:  # also when running: another command may be starting it, and start() waits for that
        if status.state != "running":
            echo("starting the local Neo4j server (g2is neo4j start)")
        status = local.start(echo=echo)
    password = local.password()
    auth = (conn.user, password) if password is not None else None
    return status.uri, auth, ConnectionConfig(uri=status.uri, user=conn.user, database=conn.database)


class Graph:
    """A connection to one Neo4j database."""

    def __init__(self, uri: str, auth: tuple[str, str] | None = None, database: str = "neo4j"):
        from neo4j import GraphDatabase

        self.uri = uri
        self.database = database
        self._auth = auth
        self._driver = GraphDatabase.driver(uri, auth=auth, max_transaction_retry_time=MAX_RETRY_TIME_S,
                                            connection_acquisition_timeout=MAX_RETRY_TIME_S,
                                            notifications_min_severity="OFF")
        self._schema_ready = False

    def reopen(self, uri: str) -> None:
        """Connect anew after the server was restarted (perhaps on another port) and its database replaced
        (the offline import): the schema is applied again."""
        from neo4j import GraphDatabase

        self._driver.close()
        self.uri = uri
        self._driver = GraphDatabase.driver(uri, auth=self._auth, max_transaction_retry_time=MAX_RETRY_TIME_S,
                                            connection_acquisition_timeout=MAX_RETRY_TIME_S,
                                            notifications_min_severity="OFF")
        self._schema_ready = False
        self.wait_until_available()

    @classmethod
    def connect(cls, conn: ConnectionConfig | None = None, server: ServerConfig | None = None,
                start_local: bool = True, echo=print) -> "Graph":
        uri, auth, resolved = resolve_connection(conn, server, start_local, echo)
        graph = cls(uri, auth, resolved.database)
        graph.check()
        return graph

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> "Graph":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- running statements ----------------------------------------------------------------
    def check(self) -> None:
        """Fail with one clear line if the server cannot be reached."""
        self._guard(self._driver.verify_connectivity)

    def _guard(self, fn, *args, **kwargs):
        from neo4j.exceptions import AuthError, DriverError, Neo4jError, ServiceUnavailable, SessionExpired

        try:
            return fn(*args, **kwargs)
        except AuthError as exc:
            raise GraphUnavailable(f"Neo4j at {self.uri} refused the credentials (set NEO4J_USER/NEO4J_PASSWORD)") from exc
        except (ServiceUnavailable, SessionExpired, OSError) as exc:
            raise GraphUnavailable(f"cannot reach Neo4j at {self.uri}: {type(exc).__name__}; start the local "
                                   "server with `g2is neo4j start` or set NEO4J_URI to a running one") from exc
        except Neo4jError as exc:
            raise GraphError(f"{exc.code}: {exc.message}") from exc
        except DriverError as exc:
            raise GraphUnavailable(f"Neo4j at {self.uri}: {type(exc).__name__}: {exc}") from exc

    def read(self, name: str, **params: Any) -> list[dict[str, Any]]:
        """Run the named read statement; rows as dicts."""
        return self._guard(self._execute, "read", cypher(name), params)

    def write(self, name: str, **params: Any) -> list[dict[str, Any]]:
        """Run the named write statement in one retried transaction."""
        return self._guard(self._execute, "write", cypher(name), params)

    def _execute(self, mode: str, text: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        def work(tx):
            return _rows(tx.run(text, params))

        with self._driver.session(database=self.database) as session:
            if mode == "read":
                return session.execute_read(work)
            return session.execute_write(work)

    @contextmanager
    def read_transaction(self) -> Iterator[Callable[..., list[dict[str, Any]]]]:
        """A `read(name, **params)` bound to one read transaction: no session or BEGIN/COMMIT per statement,
        and one consistent snapshot for a whole traversal. Not retried: a failure ends the traversal with GraphError/GraphUnavailable."""
        from neo4j import READ_ACCESS

        session = self._guard(self._driver.session, database=self.database, default_access_mode=READ_ACCESS)
        try:
            tx = self._guard(session.begin_transaction)
            try:
                yield lambda name, **params: self._guard(lambda: _rows(tx.run(cypher(name), params)))
            finally:
                self._guard(tx.close)
        finally:
            session.close()

    def write_rows(self, name: str, rows: Iterable[dict[str, Any]], batch_size: int, progress=None,
                   **params: Any) -> int:
        """UNWIND `rows` through the named statement in batches, one transaction per batch."""
        total = 0
        for batch in batched(rows, batch_size):
            self.write(name, rows=batch, **params)
            total += len(batch)
            if progress is not None:
                progress.update(len(batch))
        return total

    def init_schema(self) -> None:
        """Apply cypher/schema.cypher (idempotent: IF NOT EXISTS) and wait for the indexes."""
        if self._schema_ready:
            return
        for statement in statements("schema"):
            self._guard(self._run_auto, statement)
        self._guard(self._run_auto, "CALL db.awaitIndexes(300)")
        self._schema_ready = True

    def _run_auto(self, text: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._driver.session(database=self.database) as session:
            return [record.data() for record in session.run(text, params or {})]

    def clear(self, batch_size: int = 1_000) -> None:
        """Delete every node and relationship (tests and `g2is db reset`), in bounded transactions (nodes
        carry 8192-float vectors: 10,000 per transaction exceeded the default 2 GiB transaction memory)."""
        while self.write("delete_some_nodes", limit=batch_size)[0]["deleted"]:
            pass

    def wait_until_available(self, timeout_s: float = 60.0) -> None:
        """Poll until the server answers (after a restart)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.check()
                return
            except GraphUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def conflicts_of(self, sample_id: str) -> list[dict[str, Any]]:
        """A sample's CONFLICT targets, most negative first (equal cosines by id), with the cosines the build
        ranked them by: the fixed-order float64 dot of the stored unit vectors (numerics.py), bit for bit.
        The edges carry no weight (docs/decisions.md, issue 19)."""
        found = self.read("conflict_of", id=sample_id)
        targets = found[0]["targets"] if found else []
        if not targets:
            return []
        cosines = exact_matvec(decode_vectors(targets), decode_vectors(found, "source")[0])
        order = sorted(range(len(targets)), key=lambda i: (cosines[i], targets[i]["id"]))
        return [{"id": targets[i]["id"], "weight": float(cosines[i]), "rank": rank} for rank, i in enumerate(order)]

    def counts(self) -> dict[str, int]:
        return self.read("graph_counts")[0]


# -- vectors as the database holds them --------------------------------------------------------
# Nodes carry their vector once, as `gradient_f32`: little-endian float32 bytes (4 d bytes per node). Bolt
# moves bytes without a per-float decode: reading a node's vector as a float[] property took 2.2x (1024 dims)
# to 3.9x (8192 dims) as long (docs/decisions.md, issue 19). Cypher decodes them exactly with the expression
# in cypher/pair_cosine.cypher (README: vectors in Cypher). The graph build writes them and reads validation
# vectors back; the walk and the baselines read node vectors; all go through these.
def decode_vectors(records, key: str = "gradient") -> np.ndarray:
    """Rows of `gradient_f32` bytes (little-endian float32) as a [n, d] array."""
    if not records:
        return np.empty((0, 0), dtype=np.float32)
    return np.stack([np.frombuffer(r[key], dtype="<f4") for r in records]).astype(np.float32, copy=False)


def vector_pages(read, space: str, page: int = 2000):
    """(node records without their vector, [n, d] vectors) page by page, in row order; `read` runs a named
    query (Graph.read, or a walk's counting wrapper)."""
    start = 0
    while True:
        records = read("space_vectors", space=space, start=start, stop=start + page)
        if not records:
            return
        vectors = decode_vectors(records)
        for record in records:
            del record["gradient"]
        yield records, vectors
        start += page


def validation_key(records, vectors: np.ndarray) -> str:
    """Identity of a validation set (ids and float32 vectors, in order) that node dot products refer to."""
    digest = hashlib.sha256()
    for record, vector in zip(records, vectors):
        digest.update(record["id"].encode() + b"\0" + vector.astype("<f4").tobytes())
    return digest.hexdigest()[:16]


def validation_basis(read, space: str) -> tuple[np.ndarray | None, str]:
    """The validation vectors [m, d] that node dot products are taken with (in `validation_vectors` order)
    and their key; (None, why not) when there are none or m dot products would be no fewer than d floats.
    The build writes the dots and the walk reads them through this one definition."""
    records = read("validation_vectors", space=space, tasks=None)
    if not records:
        return None, "no validation vectors"
    vectors = decode_vectors(records)
    if len(vectors) >= vectors.shape[1]:
        return None, f"{len(vectors)} validation vectors, no fewer than the dimension"
    return vectors, validation_key(records, vectors)

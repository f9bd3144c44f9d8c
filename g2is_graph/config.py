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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NEO4J_VERSION = "5.26.30"  # newest 5.26 LTS patch on Maven Central when verified; last line on Java 17
NEO4J_BROWSER_VERSION = "5.24.0"  # org.neo4j.client:neo4j-browser on Maven Central, served by the 5.26 server
CONFIG_FILE_ENV = "G2IS_CONFIG"
DEFAULT_CONFIG_FILE = "g2is.toml"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


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

    def resolved_jar_dir(self) -> Path:
        return self.jar_dir or cache_home() / f"neo4j-{self.version}" / "lib"

    def resolved_browser_dir(self) -> Path:
        return cache_home() / f"neo4j-browser-{self.browser_version}"


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
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{candidate}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: invalid TOML: {exc}") from exc


def build(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys by name."""
    values = dict(values or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"[{section}] unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    for key, value in list(values.items()):
        f = names[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            values[key] = build(type(default), value, f"{section}.{key}")
        elif f.type in ("Path", "Path | None") and value is not None:
            values[key] = Path(value).expanduser()
        elif isinstance(default, tuple) and isinstance(value, list):
            values[key] = tuple(value)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{section}] {exc}") from exc


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

    def validate(self) -> None:
        if self.template not in ("model", "tulu"):
            raise ConfigError(f"[data] template must be model or tulu, not {self.template!r}")
        if self.prompt_completion not in ("chat", "raw"):
            raise ConfigError(f"[data] prompt_completion must be chat or raw, not {self.prompt_completion!r}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape (the LESS warmup recipe)."""

    r: int = 128
    alpha: int = 512
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


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

    def validate(self) -> None:
        if self.k <= 0 or self.m <= 1 or min(self.ef, self.ef_negative, self.ef_construction) < self.k:
            raise ConfigError("[graph] k must be positive and ef, ef_negative, ef_construction at least k")
        if self.negative_candidates < self.k:
            raise ConfigError("[graph] negative_candidates must be at least k")
        if min(self.node_batch, self.edge_batch, self.recall_sample) <= 0:
            raise ConfigError("[graph] node_batch, edge_batch and recall_sample must be positive")


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

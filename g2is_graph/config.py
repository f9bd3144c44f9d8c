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

    def resolved_jar_dir(self) -> Path:
        return self.jar_dir or cache_home() / f"neo4j-{self.version}" / "lib"


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
        if names[key].type in ("Path", "Path | None") and value is not None:
            values[key] = Path(value).expanduser()
    return cls(**values)


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

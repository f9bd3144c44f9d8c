"""One error family: every failure a user can cause is a `G2isError` carrying its exit code and a hint.

The CLI prints `error: <message>` and `hint: <hint>` and exits with the code; a traceback appears only
with --verbose. A raise site that knows better than its type's default hint passes its own
(`StoreError(message, hint=...)`, or `hinted(error, hint)` on an error made elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_SERVER = 4
EXIT_BUSY = 5
EXIT_IO = 6


class G2isError(Exception):
    """Base of every error a user can cause."""

    exit_code = EXIT_BAD_INPUT
    hint = "--verbose shows where it happened"

    def __init__(self, message: str = "", hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint


def hinted(exc: BaseException, hint: str) -> BaseException:
    """Attach the hint the CLI prints under this error (otherwise its type's)."""
    exc.hint = hint  # type: ignore[attr-defined]
    return exc


class ConfigError(G2isError, ValueError):
    """A configuration value is invalid; the message names the field."""

    hint = "fix the value named above (in g2is.toml or on the command line)"


class RecordError(G2isError, ValueError):
    """A bad input record: names the file, line, field and reason."""

    hint = "fix the record, or pass --skip-bad to skip and report bad records"

    def __init__(self, path: str | Path, line: int, field_name: str | None, reason: str, record_id: str | None = None):
        self.path, self.line, self.field, self.reason, self.record_id = str(path), line, field_name, reason, record_id
        where = f"{path}:{line}" + (f": field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {reason}")

    def as_json(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "field": self.field, "id": self.record_id, "reason": self.reason}


class ModelError(G2isError, ValueError):
    """A model path or file that cannot be used; the message says which and why."""

    hint = "pass an HF model folder or a .gguf file"


class GradientError(G2isError, RuntimeError):
    """Gradients cannot be computed as configured (e.g. Adam state that does not match the model)."""

    hint = "featurise with the checkpoint and model the warmup made"


class StoreError(G2isError, RuntimeError):
    """A store that is missing, corrupted or incompatible; the message names the file."""

    hint = "the file named above is incomplete, corrupted or from another setup"


class GraphUnavailable(G2isError, RuntimeError):
    """Neo4j could not be reached (after retries)."""

    exit_code = EXIT_UNAVAILABLE
    hint = "`g2is neo4j status` shows the local server; NEO4J_URI selects another"


class GraphError(G2isError, RuntimeError):
    """A Cypher statement failed, or the database refused what was asked, for a reason other than availability."""

    hint = "the line above says what the database refused; --verbose shows where"


class ServerError(G2isError, RuntimeError):
    """The local server could not be fetched, started or stopped; the message says what to do."""

    exit_code = EXIT_SERVER
    hint = "`g2is neo4j status` and the server's console.log say more"


class LockBusy(G2isError, RuntimeError):
    """Another process holds a lock this command needs; the message names the holder."""

    exit_code = EXIT_BUSY
    hint = ("wait for the other command to finish, or stop it; [graph] lock_wait_s sets how long a build "
            "waits for the graph lock")


class LockLost(G2isError, RuntimeError):
    """The graph lock was taken over while this process held it (its heartbeat lapsed)."""

    exit_code = EXIT_BUSY
    hint = "re-run the command: it resumes from what was written"


class ExportError(G2isError, ValueError):
    """A run that cannot be exported as asked: the message names the record, file or run and what to do."""

    hint = "the run, its source files or the graph do not allow this export"


class ReportError(G2isError, ValueError):
    """A run that cannot be reported; the message names it."""

    hint = "`g2is runs` lists the runs"


class WarmupImportError(G2isError, ValueError):
    """A trainer checkpoint that cannot become a g2is checkpoint; the message says which file and why."""

    hint = "import the checkpoints of one LoRA run with the base model it was trained on"

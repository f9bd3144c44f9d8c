"""What made an output, saved with it, and the one check that refuses a rerun asked with other settings.

Every stage that resumes into a directory (warmup, fine-tuning, feature stores, graph states, the quality
study) saves the settings that shape its output together with `provenance()` (package version, git
commit, time) and, on a rerun, calls `check_saved`: the same settings resume, other settings are refused
with the fields that differ, what was saved and what was asked, never silently mixed.
"""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from g2is_graph.errors import ConfigError
from g2is_graph.files import atomic_write_json

REPOSITORY = Path(__file__).resolve().parents[1]


@functools.cache
def git_commit() -> str | None:
    """The commit of the source tree this package runs from (with '+dirty' for uncommitted changes), or None
    when it is not a git checkout (an installed wheel)."""
    try:
        head = subprocess.run(["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(REPOSITORY), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    from g2is_graph import __version__

    return {"g2is_version": __version__, "git_commit": git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def differing(saved: dict[str, Any], wanted: dict[str, Any], keys: Sequence[str] | None = None) -> list[str]:
    keys = sorted(set(saved) | set(wanted)) if keys is None else keys
    return [k for k in keys if saved.get(k) != wanted.get(k)]


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _shown_pair(saved: Any, wanted: Any) -> tuple[str, str]:
    """Two differing values as shown to the user: of two mappings only the keys that differ, so the setting
    that resumes the directory is visible even when the whole value is long (a projector's identity)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = differing(saved, wanted)
        saved, wanted = ({k: v[k] for k in keys if k in v} for v in (saved, wanted))
    return _shown(saved), _shown(wanted)


def check_saved(saved: dict[str, Any], wanted: dict[str, Any], keys: Sequence[str] | None, where: str | Path,
                what: str, error: type[Exception] = ConfigError) -> None:
    """Refuse to resume `where` when the settings `keys` (all when None) differ from the saved ones."""
    changed = differing(saved, wanted, keys)
    if changed:
        shown = {k: _shown_pair(saved.get(k), wanted.get(k)) for k in changed[:4]}
        detail = "; ".join(f"{k}: saved {was}, asked {now}" for k, (was, now) in shown.items())
        raise error(f"{where}: the earlier {what} there used different {', '.join(changed)} ({detail})",
                    hint="use the same settings to resume, or another output directory for the new ones")


def write_or_check(path: Path, record: dict[str, Any], keys: Sequence[str], what: str) -> None:
    """Save a job's record (with its provenance), or refuse a directory whose earlier job used other settings."""
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: corrupted ({type(exc).__name__}); it cannot tell which settings the "
                              f"earlier {what} used", hint="delete the directory or use a new one") from exc
        check_saved(saved, record, keys, path, what)
    else:
        atomic_write_json(path, {**record, "provenance": provenance()}, indent=2)

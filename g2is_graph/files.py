"""Writing files so that a crash, a kill or a full disk never leaves one half-written.

Every file another run reads back (store metadata and chunks, graph state, run manifests, server
records) is written to a temporary file in the same directory, flushed to disk, then renamed over the
target: a reader sees the old file or the new one, never a torn one. `create_exclusive` is the same for a
file that only the first of several writers may create (shards creating one store).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


def _temporary(path: Path, data: bytes) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None or exc.filename == str(tmp):  # name the file the user knows (disk full, ...)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` by `data` in one step."""
    path = Path(path)
    tmp = _temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, **dumps).encode("utf-8"))


def create_exclusive(path: str | Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists, atomically: False when another writer was first."""
    path = Path(path)
    tmp = _temporary(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in blocks (the one file hash: stores, models, data sources, exports)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()

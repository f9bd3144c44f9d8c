"""Who may write: process identities, a lock per state directory, and a lock per graph in the database.

A process is identified by its pid, its start time (field 22 of /proc/<pid>/stat), its uid and the boot it
runs in, so a pid the kernel reused for another program is never taken for ours. A `FileLock` is an
exclusive flock: the kernel drops it when the holder dies, so a kill never leaves it stale. A
`DatabaseLock` is a :GraphLock node in the database with an owner token and a heartbeat, so writers on
other machines (or other state directories) are serialised too; a holder whose heartbeat stopped for
`stale_s`, or whose process on this machine is gone, loses it to the next writer.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from g2is_graph.errors import LockBusy, LockLost


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start: int  # clock ticks after boot at which the process started: a reused pid has another
    uid: int
    boot: str
    host: str

    @classmethod
    def of(cls, pid: int) -> "ProcessIdentity | None":
        """The live process `pid` (None when there is none, or it is a zombie)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            uid = os.stat(f"/proc/{pid}").st_uid
        except (OSError, ValueError):
            return None
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            return None
        return cls(pid, int(fields[19]), uid, boot_id(), socket.gethostname())

    @classmethod
    def current(cls) -> "ProcessIdentity":
        found = cls.of(os.getpid())
        assert found is not None
        return found

    @classmethod
    def from_dict(cls, data: Any) -> "ProcessIdentity | None":
        try:
            return cls(int(data["pid"]), int(data["start"]), int(data["uid"]), str(data["boot"]), str(data["host"]))
        except (KeyError, TypeError, ValueError):
            return None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def is_local(self) -> bool:
        return self.host == socket.gethostname() and self.boot == boot_id()

    def alive(self) -> bool | None:
        """Whether this very process still runs; None when it ran on another machine (cannot tell)."""
        if not self.is_local():
            return None
        return ProcessIdentity.of(self.pid) == self

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"


def holder_record() -> dict[str, Any]:
    """What a lock says about its holder: the process, the command and since when (never arguments' values)."""
    command = " ".join([Path(sys.argv[0]).name, *[a for a in sys.argv[1:3] if not a.startswith("-")]])
    return {"process": ProcessIdentity.current().as_dict(), "command": command,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def describe_holder(record: Any) -> str:
    if not isinstance(record, dict):
        return "another process"
    process = ProcessIdentity.from_dict(record.get("process"))
    who = process.describe() if process else "another process"
    return f"{who} ({record.get('command', '?')}, since {record.get('since', '?')})"


class FileLock:
    """An exclusive lock on a file in a directory (one writer per graph state directory)."""

    def __init__(self, path: str | Path, what: str, hint: str = LockBusy.hint):
        self.path = Path(path)
        self.what = what
        self.hint = hint
        self._fd: int | None = None

    def holder(self) -> str:
        try:
            return describe_holder(json.loads(self.path.read_text() or "null"))
        except (OSError, json.JSONDecodeError):
            return "another process"

    def acquire(self, wait_s: float, echo=None, poll_s: float = 0.1) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    busy = LockBusy(f"{self.what} is in use by {self.holder()} (lock file {self.path})")
                    busy.hint = self.hint
                    raise busy from None
                if not told and echo is not None:
                    echo(f"waiting for {self.what}, in use by {self.holder()}")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_record()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "FileLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


_HELD: set[str] = set()  # owner tokens of database locks this process holds now


class DatabaseLock:
    """The write lock of the graph in one database (a :GraphLock node), kept alive by a heartbeat thread."""

    def __init__(self, graph, what: str = "the graph", stale_s: float = 60.0, heartbeat_s: float = 5.0,
                 name: str = "graph"):
        self.graph = graph
        self.what = what
        self.stale_s = stale_s
        self.heartbeat_s = heartbeat_s
        self.name = name
        self.owner = secrets.token_hex(16)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try(self, steal: str | None) -> dict[str, Any]:
        return self.graph.write("lock_acquire", lock=self.name, owner=self.owner, steal=steal,
                                holder=json.dumps(holder_record()), stale_s=float(self.stale_s))[0]

    def acquire(self, wait_s: float, echo=None, poll_s: float = 0.5) -> "DatabaseLock":
        self.graph.init_schema()
        deadline = time.monotonic() + wait_s
        told = False
        steal = None
        _HELD.add(self.owner)  # before the first try: a sibling thread must never take it for a leftover
        while True:
            try:
                found = self._try(steal)
            except BaseException:
                _HELD.discard(self.owner)
                raise
            if found["acquired"]:
                break
            holder = _parse(found["holder"])
            process = ProcessIdentity.from_dict(holder.get("process")) if isinstance(holder, dict) else None
            if process is not None and found["owner"] != steal and (
                    process.alive() is False
                    or (process == ProcessIdentity.current() and found["owner"] not in _HELD)):
                steal = found["owner"]  # its process is gone (killed): no need to wait for the heartbeat to lapse
                continue
            where = f"{self.what} in database {self.graph.database} at {self.graph.uri}"
            silent = found.get("silent_s")
            state = f"last heartbeat {silent} s ago" if silent is not None else "no heartbeat yet"
            if time.monotonic() >= deadline:
                _HELD.discard(self.owner)
                raise LockBusy(f"{where} is being written by {describe_holder(holder)}; {state}")
            if not told and echo is not None:
                echo(f"waiting for {where}: being written by {describe_holder(holder)}")
                told = True
            time.sleep(poll_s)
        self._thread = threading.Thread(target=self._beat, name="g2is-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        from g2is_graph.db.graph import GraphError, GraphUnavailable

        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self.graph.write("lock_heartbeat", lock=self.name, owner=self.owner)[0]["held"]
            except (GraphError, GraphUnavailable):
                continue  # the server may be restarting; a lapse shows in the next beat
            if not held:
                self.lost = True
                return

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """While the database is replaced under this lock (the offline import, server stopped): no heartbeat;
        afterwards the lock is taken again in the new database, or the writer stops (LockLost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s)
            self._thread = None
        yield
        if not self._try(None)["acquired"]:
            self.lost = True
            self.check()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="g2is-lock-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Refuse to go on once another writer took the lock over."""
        if self.lost:
            raise LockLost(f"{self.what}: another writer took the write lock over after this process's heartbeat "
                           f"lapsed for more than {self.stale_s:.0f} s; nothing more was written")

    def release(self, write: bool = True) -> None:
        """Stop the heartbeat and free the lock; `write=False` when the database is known to be unreachable
        (the next writer then finds the lock's process gone, or its heartbeat stale)."""
        from g2is_graph.db.graph import GraphError, GraphUnavailable

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s)
            self._thread = None
        _HELD.discard(self.owner)
        if write:
            try:
                self.graph.write("lock_release", lock=self.name, owner=self.owner)
            except (GraphError, GraphUnavailable):
                pass

    def __enter__(self) -> "DatabaseLock":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from g2is_graph.db.graph import GraphUnavailable

        self.release(write=not isinstance(exc, GraphUnavailable))


def _parse(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None

"""The project-managed Neo4j 5.26 Community server: jars from Maven Central, no Docker.

The server is `org.neo4j.server.CommunityEntryPoint` launched directly with Java 17 (the shipped
`bin/neo4j` script is not on Maven Central), so JVM flags are passed on the command line. Its state
directory holds conf, data, logs, the pid, `server.json` (URI and the server process's identity) and,
when auth is on, a generated password (mode 0600), set with `neo4j-admin dbms set-initial-password`
before the first start, so Bolt never accepts the default neo4j:neo4j.

Which process is our server is decided by its identity (pid, start time, uid: `locks.ProcessIdentity`)
recorded in server.json, and failing that by the process holding the lock on the data directory's
store_lock (the one Neo4j takes), always with our entry point and home on its command line; a pid file
naming another process is never believed, signalled or taken for a stopped server. Start and stop hold
`g2is.lock` in the state directory, so commands that start the server at once wait for the first one and
then use its server, and a stop never races a start.

With `browser` on (off by default), the `org.neo4j.client:neo4j-browser` jar joins the classpath and the HTTP
connector listens on 127.0.0.1 only, so Neo4j Browser is served at http://127.0.0.1:<http port>/browser/ behind
the same authentication, with the Browser's telemetry off.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from g2is_graph.config import ServerConfig
from g2is_graph.errors import ServerError
from g2is_graph.files import atomic_write_json, atomic_write_text
from g2is_graph.locks import FileLock, ProcessIdentity

MUNINN_GROWTH_TOGGLE = "org.neo4j.io.pagecache.impl.muninn.MuninnPagedFile.maxChunkGrowth"
JVM_FLAGS = [
    "-XX:+UseG1GC", "-XX:-OmitStackTraceInFastThrow", "-XX:+UnlockExperimentalVMOptions",
    "-XX:+TrustFinalNonStaticFields", "-XX:+DisableExplicitGC", "-XX:+ExitOnOutOfMemoryError",
    "-Djdk.nio.maxCachedBufferSize=1024", "-Dio.netty.tryReflectionSetAccessible=true",
    "-Dlog4j2.disable.jmx=true", "-Dfile.encoding=UTF-8",
    "--add-opens=java.base/java.nio=ALL-UNNAMED", "--add-opens=java.base/java.io=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED", "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--enable-native-access=ALL-UNNAMED",
    # Store files grow by at most one 32 MiB chunk of the page cache's translation table at a time, not by 10%
    # (up to 16 chunks): the default left 5-11% of a 1M-node store as preallocated zeros (issue 19;
    # `MuninnPagedFile.maxChunkGrowth`, a Neo4j feature toggle read by the importer and the server alike).
    f"-D{MUNINN_GROWTH_TOGGLE}=1",
]
ENTRY_POINT = "org.neo4j.server.CommunityEntryPoint"
ADMIN_TOOL = "org.neo4j.cli.AdminTool"
MAVEN_DEPENDENCY_PLUGIN = "3.6.1"  # Maven 3.8.7's default binding is too old for copy-dependencies
POM_TEMPLATE = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.g2is</groupId><artifactId>neo4j-server-bundle</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.neo4j.app</groupId><artifactId>neo4j-server</artifactId><version>{v}</version></dependency>
    <dependency><groupId>org.neo4j</groupId><artifactId>neo4j</artifactId><version>{v}</version></dependency>
    <dependency><groupId>org.neo4j</groupId><artifactId>neo4j-bolt</artifactId><version>{v}</version></dependency>
  </dependencies>
  <build><plugins><plugin><groupId>org.apache.maven.plugins</groupId>
    <artifactId>maven-dependency-plugin</artifactId><version>{p}</version></plugin></plugins></build>
</project>
"""
DEFAULT_USER = "neo4j"

@dataclass(frozen=True)
class ServerStatus:
    state: str  # "running" | "stopped" | "stale"
    pid: int | None
    uri: str | None
    auth: bool
    state_dir: Path

    browser: str | None = None  # the Neo4j Browser URL when served

    def line(self) -> str:
        if self.state == "running":
            browser = f", Neo4j Browser at {self.browser}" if self.browser else ""
            return (f"running: pid {self.pid}, {self.uri} (auth {'on' if self.auth else 'off'}){browser}, "
                    f"state {self.state_dir}")
        if self.state == "stale":
            return f"stale: pid file names {self.pid}, which is not a running server; state {self.state_dir}"
        return f"stopped: state {self.state_dir}"


class LocalServer:
    """Start, stop and inspect one Neo4j server owned by this project."""

    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.home = Path(self.config.state_dir).expanduser().resolve()
        self.jar_dir = self.config.resolved_jar_dir()

    # -- files -----------------------------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.home / "run" / "g2is-neo4j.pid"

    @property
    def info_file(self) -> Path:
        return self.home / "server.json"

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    @property
    def console_log(self) -> Path:
        return self.home / "logs" / "console.log"

    @property
    def store_lock(self) -> Path:
        """The file Neo4j locks (POSIX lock) while it runs on this data directory."""
        return self.home / "data" / "databases" / "store_lock"

    def _lock(self) -> FileLock:
        """Held by whoever starts or stops this server."""
        return FileLock(self.home / "g2is.lock", f"the local Neo4j server in {self.home}",
                        "another command has been starting or stopping it for longer than [server] "
                        "start_timeout_s; `g2is neo4j status` shows it")

    def password(self) -> str | None:
        """The generated password of this server (None when auth is off or never started)."""
        if not self.config.auth or not self.password_file.exists():
            return None
        return self.password_file.read_text().strip()

    # -- jars ------------------------------------------------------------------------------
    def ensure_jars(self, echo=print) -> Path:
        """Fetch the server jars with Maven once; the directory appears only when complete."""
        marker = self.jar_dir / ".complete"
        if marker.exists():
            return self.jar_dir
        if shutil.which("mvn") is None:
            raise ServerError("Maven (mvn) is not installed: it is needed once to fetch the Neo4j jars")
        self.jar_dir.parent.mkdir(parents=True, exist_ok=True)
        echo(f"fetching Neo4j {self.config.version} jars from Maven Central into {self.jar_dir} (first run only)")
        with tempfile.TemporaryDirectory(dir=self.jar_dir.parent) as tmp:
            pom = Path(tmp) / "pom.xml"
            pom.write_text(POM_TEMPLATE.format(v=self.config.version, p=MAVEN_DEPENDENCY_PLUGIN))
            staging = Path(tmp) / "lib"
            cmd = ["mvn", "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
                   f"-DoutputDirectory={staging}", "-DincludeScope=runtime"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                raise ServerError(f"Maven could not fetch Neo4j {self.config.version}:\n{tail}")
            (staging / ".complete").write_text(self.config.version + "\n")
            if self.jar_dir.exists():
                shutil.rmtree(self.jar_dir)
            staging.rename(self.jar_dir)
        return self.jar_dir

    def ensure_browser_jar(self, echo=print) -> Path:
        """Fetch the Neo4j Browser jar with Maven once; the directory appears only when complete."""
        return _fetch_artifacts([f"org.neo4j.client:neo4j-browser:{self.config.browser_version}"],
                                self.config.resolved_browser_dir(), "the Neo4j Browser jar", echo)

    def replace_database(self, database: str, nodes: list[Path], relationships: list[Path], echo=print,
                         multiline: bool = False) -> tuple[ServerStatus, str]:
        """Stop the server, replace `database` by the CSV files with `neo4j-admin database import full`
        (offline), start it again; all under the start/stop lock, so no command starts the server on the
        store while the importer writes it. `multiline`: some quoted field holds a line break (every file is
        then read multi-line, 15-20% slower; the v2 reader, which takes a list of files, fails on fields
        that cross its 4 MiB buffer: "Weird input data, found CR outside a text cell"). Returns the new
        status and the importer's summary lines."""
        java = Path(self.config.java)
        if not java.exists():
            raise ServerError(f"Java 17 not found at {java}; set [server] java in g2is.toml (Neo4j 5.26 needs Java 17)")
        folders = {Path(p).resolve().parent for p in [*nodes, *relationships]}
        if len(folders) != 1:
            raise ServerError("the import files must lie in one folder (the importer is given their names)")
        folder = folders.pop()
        jars = self.ensure_jars(echo)
        with self._lock().acquire(self.config.start_timeout_s + self.config.stop_timeout_s + 30, echo):
            self._stop_locked()
            if self._server_process() is not None:
                raise ServerError(f"the server in {self.home} did not stop: a full import needs it stopped")
            report = self.home / "logs" / "import.report"
            log = self.home / "logs" / "import.log"
            cmd = [str(java), f"-Xmx{self.config.import_heap}", *JVM_FLAGS, "-cp", f"{jars}/*", ADMIN_TOOL,
                   "database", "import", "full", "--input-type=csv", "--overwrite-destination",
                   f"--max-off-heap-memory={self.config.import_off_heap}", f"--threads={self.config.import_threads}",
                   f"--report-file={report}", "--bad-tolerance=0", "--skip-duplicate-nodes=false",
                   "--ignore-empty-strings=false", "--trim-strings=false", "--legacy-style-quoting=false",
                   f"--multiline-fields={'true' if multiline else 'false'}",
                   *[f"--nodes={p.name}" for p in nodes], *[f"--relationships={p.name}" for p in relationships], "--",
                   database]
            env = {**os.environ, "NEO4J_HOME": str(self.home), "NEO4J_CONF": str(self.home / "conf")}
            # file names, not paths: the importer reads `=` and `,` in --nodes/--relationships values as its own
            # separators, so a folder named like `x=y` would break an absolute path
            done = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            atomic_write_text(log, done.stdout + done.stderr)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                self._launch(echo)  # the server comes back whatever the importer did; the error says what
                raise ServerError(f"neo4j-admin database import failed (exit {done.returncode}); the database "
                                  f"{database} is left as the importer left it (see {log} and {report}):\n{tail}")
            summary = "\n".join(line.strip() for line in done.stdout.splitlines()
                                if line.strip().startswith(("IMPORT DONE", "Imported:", "Peak memory")))
            status = self._launch(echo)
        return status, summary

    def browser_conf(self, http_port: int) -> dict[str, str]:
        """The HTTP connector on loopback only, and no telemetry from the Browser."""
        return {"server.http.enabled": "true", "server.http.listen_address": f"127.0.0.1:{http_port}",
                "server.http.advertised_address": f"127.0.0.1:{http_port}",
                "client.allow_telemetry": "false"}

    # -- status ----------------------------------------------------------------------------
    def _read_info(self) -> dict:
        try:
            return json.loads(self.info_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _is_our_server(self, process: ProcessIdentity | None) -> bool:
        """A live process of this user running the Neo4j entry point on this state directory."""
        if process is None or process.uid != os.getuid() or process.alive() is not True:
            return False
        try:
            args = [a.decode(errors="replace") for a in Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")]
        except OSError:
            return False
        return ENTRY_POINT in args and f"--home-dir={self.home}" in args

    def _server_process(self) -> ProcessIdentity | None:
        """Our running server: the process server.json records (pid, start time, uid), or else the one
        holding the store lock of our data directory; None when no server of ours runs."""
        recorded = ProcessIdentity.from_dict(self._read_info().get("process"))
        if self._is_our_server(recorded):
            return recorded
        holder = lock_holder(self.store_lock)
        found = ProcessIdentity.of(holder) if holder else None
        return found if self._is_our_server(found) else None

    def _uri_of(self, process: ProcessIdentity) -> str | None:
        info = self._read_info()
        if ProcessIdentity.from_dict(info.get("process")) == process:
            return info.get("uri")
        try:  # server.json names another process (overwritten): the address the server was configured with
            conf = (self.home / "conf" / "neo4j.conf").read_text().splitlines()
        except OSError:
            return None
        address = next((line.split("=", 1)[1] for line in conf if line.startswith("server.bolt.listen_address=")), None)
        return f"bolt://{address}" if address else None

    def status(self) -> ServerStatus:
        info = self._read_info()
        process = self._server_process()
        if process is not None:
            return ServerStatus("running", process.pid, self._uri_of(process), bool(info.get("auth", self.config.auth)),
                                self.home, info.get("browser"))
        if self.pid_file.exists():
            try:
                stale = int(self.pid_file.read_text().strip())
            except ValueError:
                stale = None
            return ServerStatus("stale", stale, None, bool(info.get("auth")), self.home)
        return ServerStatus("stopped", None, None, bool(info.get("auth")), self.home)

    # -- start / stop ----------------------------------------------------------------------
    def start(self, echo=print) -> ServerStatus:
        """Start the server (or return the one already running) and wait until Bolt answers. Several
        commands may call this at once: the first starts the server, the others wait for it to answer."""
        current = self.status()
        if current.state == "running" and self._answers(current.uri):
            return current  # a running server that answers needs no lock
        with self._lock().acquire(self.config.start_timeout_s + 30, echo):
            current = self.status()
            if current.state == "running":
                process = self._server_process()
                self._wait_ready(lambda: self._is_our_server(process), current.uri)
                if self.config.auth:
                    self._ensure_password(current.uri)
                return self.status()
            return self._launch(echo)

    def _launch(self, echo) -> ServerStatus:
        holder = lock_holder(self.store_lock)
        if holder:
            raise ServerError(f"{self.home / 'data'} is in use by pid {holder}, which is not a g2is server of this "
                              "user; stop it first (never two servers on one data directory)")
        self.pid_file.unlink(missing_ok=True)
        java = Path(self.config.java)
        if not java.exists():
            raise ServerError(f"Java 17 not found at {java}; set [server] java in g2is.toml (Neo4j 5.26 needs Java 17)")
        jars = self.ensure_jars(echo)
        classpath = f"{jars}/*"
        http_port = None
        if self.config.browser:
            classpath += f":{self.ensure_browser_jar(echo)}/*"
            http_port = self.config.http_port if _port_free(self.config.http_port) else _free_port()
        for sub in ("conf", "data", "logs", "run", "plugins"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        port = self.config.port if _port_free(self.config.port) else _free_port()
        self._write_conf(port, http_port)
        if self.config.auth and not (self.home / "data" / "databases" / "system").exists():
            self._set_initial_password(java, jars)
        cmd = [str(java), f"-Xms{self.config.heap}", f"-Xmx{self.config.heap}", *JVM_FLAGS,
               "-cp", classpath, ENTRY_POINT, f"--home-dir={self.home}",
               f"--config-dir={self.home / 'conf'}", "--console-mode"]
        log = open(self.console_log, "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.home)
        log.close()
        process = ProcessIdentity.of(proc.pid)
        uri = f"bolt://127.0.0.1:{port}"
        browser = f"http://127.0.0.1:{http_port}/browser/" if http_port else None
        atomic_write_text(self.pid_file, f"{proc.pid}\n")
        atomic_write_json(self.info_file, {"uri": uri, "port": port, "auth": self.config.auth,
                                           "version": self.config.version, "pid": proc.pid, "browser": browser,
                                           "process": process.as_dict() if process else None})
        try:
            self._wait_ready(lambda: proc.poll() is None, uri, http_port)
        except ServerError:
            if proc.poll() is None:
                _signal(process, signal.SIGKILL)
            proc.wait()
            self.pid_file.unlink(missing_ok=True)
            self.info_file.unlink(missing_ok=True)
            raise
        if self.config.auth:
            self._ensure_password(uri)
        return self.status()

    def stop(self) -> ServerStatus:
        """SIGTERM our server, wait for a clean shutdown, SIGKILL after the timeout; whatever the pid file
        says, the server found by its identity or its store lock is the one stopped."""
        if not self.home.exists():
            return self.status()
        with self._lock().acquire(self.config.start_timeout_s + self.config.stop_timeout_s + 30):
            self._stop_locked()
            return self.status()

    def _stop_locked(self) -> None:
        process = self._server_process()
        if process is not None:
            _signal(process, signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout_s
            while process.alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if process.alive():
                _signal(process, signal.SIGKILL)
                while process.alive():
                    time.sleep(0.1)
        if self._server_process() is None:
            self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL our server at once (fault-injection tests)."""
        process = self._server_process()
        if process is not None:
            _signal(process, signal.SIGKILL)
            while process.alive():
                time.sleep(0.05)

    # -- internals -------------------------------------------------------------------------
    def _write_conf(self, port: int, http_port: int | None = None) -> None:
        h = self.home
        lines = {
            "server.bolt.enabled": "true",
            "server.bolt.listen_address": f"127.0.0.1:{port}",
            "server.bolt.advertised_address": f"127.0.0.1:{port}",
            "server.default_listen_address": "127.0.0.1",
            "server.http.enabled": "false",
            "server.https.enabled": "false",
            "dbms.security.auth_enabled": "true" if self.config.auth else "false",
            "dbms.usage_report.enabled": "false",
            "server.directories.data": str(h / "data"),
            "server.directories.logs": str(h / "logs"),
            "server.directories.run": str(h / "run"),
            "server.directories.plugins": str(h / "plugins"),
            "server.directories.import": str(h / "import"),
            "server.memory.pagecache.size": self.config.pagecache,
            "dbms.memory.transaction.total.max": self.config.transaction_max,
            "db.tx_log.rotation.retention_policy": "keep_none",
        }
        if http_port is not None:
            lines.update(self.browser_conf(http_port))
        (h / "conf" / "neo4j.conf").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

    def _set_initial_password(self, java: Path, jars: Path) -> None:
        """Before the first start: the admin user's password is the generated one from the start (the admin
        tool reads it from the 0600 file, never from the command line, through picocli's @file)."""
        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(24) + "\n")
        env = {**os.environ, "NEO4J_HOME": str(self.home), "NEO4J_CONF": str(self.home / "conf")}
        done = subprocess.run([str(java), "-Xmx128m", "-cp", f"{jars}/*", ADMIN_TOOL, "dbms", "set-initial-password",
                               "--", f"@{self.password_file}"], env=env, cwd=self.home, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-10:]).replace(self.password() or "\0", "***")
            raise ServerError(f"neo4j-admin dbms set-initial-password failed (exit {done.returncode}):\n{tail}")

    def _answers(self, uri: str | None) -> bool:
        """Whether Bolt answers on `uri` (a refusal of the credentials is an answer: _ensure_password settles them)."""
        from neo4j import GraphDatabase
        from neo4j.exceptions import AuthError, ClientError

        if uri is None:
            return False
        auth = (DEFAULT_USER, self.password() or "neo4j") if self.config.auth else None
        try:
            with GraphDatabase.driver(uri, auth=auth, connection_timeout=2) as driver:
                driver.verify_connectivity()
            return True
        except (AuthError, ClientError):
            return True
        except Exception:  # noqa: BLE001 - any connection error means "not yet"
            return False

    def _wait_ready(self, running, uri: str, http_port: int | None = None) -> None:
        """Poll until Bolt answers on `uri` (and, with the Browser on, its HTTP port accepts connections: the
        HTTP connector comes up after Bolt); fail early once `running()` says the process is gone."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if not running():
                raise ServerError(f"Neo4j exited during start; last lines of {self.console_log}:\n"
                                  f"{_tail(self.console_log)}")
            if self._answers(uri) and (http_port is None or _listening(http_port)):
                return
            time.sleep(0.5)
        raise ServerError(f"Neo4j did not answer on {uri} within {self.config.start_timeout_s:.0f}s; "
                          f"see {self.console_log}:\n{_tail(self.console_log)}")

    def _ensure_password(self, uri: str) -> None:
        """Check that the generated password works; a data directory that an older g2is created (and left
        on the default password) gets it now."""
        from neo4j import GraphDatabase
        from neo4j.exceptions import AuthError

        if not self.password_file.exists():
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24) + "\n")
        password = self.password()
        try:
            with GraphDatabase.driver(uri, auth=(DEFAULT_USER, password)) as driver:
                driver.verify_connectivity()
            return
        except AuthError:
            pass
        try:
            with GraphDatabase.driver(uri, auth=(DEFAULT_USER, "neo4j")) as driver:
                with driver.session(database="system") as session:
                    session.run("ALTER CURRENT USER SET PASSWORD FROM $old TO $new",
                                old="neo4j", new=password).consume()
        except AuthError as exc:
            raise ServerError(f"the server in {self.home} rejects both the stored and the default password; "
                              f"remove {self.home / 'data'} to reset it") from exc


def _fetch_artifacts(artifacts: list[str], target: Path, what: str, echo) -> Path:
    """Copy Maven artifacts into `target` once; the directory appears only when every jar is there, and a
    failure names what could not be fetched (no fallback: the caller needs these jars)."""
    if (target / ".complete").exists():
        return target
    if shutil.which("mvn") is None:
        raise ServerError(f"Maven (mvn) is not installed: it is needed once to fetch {what}")
    target.parent.mkdir(parents=True, exist_ok=True)
    echo(f"fetching {what} from Maven Central into {target} (first run only)")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "lib"
        for artifact in artifacts:
            cmd = ["mvn", "-B", "-q", f"org.apache.maven.plugins:maven-dependency-plugin:{MAVEN_DEPENDENCY_PLUGIN}:copy",
                   f"-Dartifact={artifact}", f"-DoutputDirectory={staging}"]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp)
            jar = f"{artifact.split(':')[1]}-{artifact.split(':')[-1]}.jar"
            if done.returncode != 0 or not (staging / jar).exists():
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
                raise ServerError(f"Maven could not fetch {artifact} ({what}):\n{tail}")
        (staging / ".complete").write_text("\n".join(artifacts) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def lock_holder(path: Path) -> int | None:
    """The pid holding a POSIX write lock on `path` (as Neo4j holds its store_lock), None when none does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        kind, _, _, _, pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _signal(process: ProcessIdentity | None, sig: int) -> None:
    """Signal the process only if it is still that very process (a pid is never reused under us)."""
    if process is not None and process.alive():
        try:
            os.kill(process.pid, sig)
        except ProcessLookupError:
            pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"

"""`g2is neo4j start|stop|status` and `g2is db` through the CLI, with auth on as a user gets it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from click.testing import CliRunner

from g2is_graph.cli import main
from g2is_graph.config import ServerConfig
from g2is_graph.db.server import ENTRY_POINT, LocalServer, _free_port, _process_alive


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def test_start_status_stop_with_auth_on_loopback(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("G2IS_HOME", str(home))
    for var in ("NEO4J_URI", "NEO4J_PASSWORD", "NEO4J_USER"):
        monkeypatch.delenv(var, raising=False)
    port = _free_port()
    conf = tmp_path / "g2is.toml"
    conf.write_text(f'[server]\nport = {port}\nheap = "512m"\npagecache = "128m"\n')
    runner = CliRunner()
    args = ["--config", str(conf)]

    first = runner.invoke(main, [*args, "neo4j", "start"])
    assert first.exit_code == 0, first.output
    assert f"bolt://127.0.0.1:{port}" in first.output and "auth on" in first.output
    try:
        info = json.loads((home / "neo4j" / "server.json").read_text())
        pid = info["pid"]
        assert _process_alive(pid)
        password_file = home / "neo4j" / "password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "neo4j").stat().st_mode) == 0o700
        # 127.0.0.1 only, as IPv4 or as the IPv4-mapped IPv6 address ::ffff:127.0.0.1
        addresses = listening_addresses(port)
        assert addresses and addresses <= {"0100007F", "0000000000000000FFFF00000100007F"}

        second = runner.invoke(main, [*args, "neo4j", "start"])
        assert second.exit_code == 0 and f"pid {pid}" in second.output  # start twice = one server

        status = runner.invoke(main, [*args, "neo4j", "status"])
        assert status.exit_code == 0 and status.output.startswith("running")

        # the CLI uses the generated password by itself, and never prints it
        init = runner.invoke(main, [*args, "db", "init"])
        assert init.exit_code == 0, init.output
        db_info = runner.invoke(main, [*args, "-v", "db", "info"])
        assert db_info.exit_code == 0, db_info.output
        assert json.loads(db_info.output[db_info.output.index("{"):])["samples"] == 0
        secret = password_file.read_text().strip()
        assert secret not in first.output + init.output + db_info.output
        for log in (home / "neo4j" / "logs").iterdir():
            assert secret not in log.read_text(errors="replace")

        # a wrong password is refused: another local user without the file cannot use the graph
        monkeypatch.setenv("NEO4J_URI", f"bolt://127.0.0.1:{port}")
        monkeypatch.setenv("NEO4J_PASSWORD", "not-the-password")
        refused = runner.invoke(main, [*args, "db", "info"])
        assert refused.exit_code == 3 and "refused the credentials" in refused.output
        assert "not-the-password" not in refused.output
        monkeypatch.delenv("NEO4J_URI")
        monkeypatch.delenv("NEO4J_PASSWORD")
    finally:
        stopped = runner.invoke(main, [*args, "neo4j", "stop"])
    assert stopped.exit_code == 0 and stopped.output.startswith("stopped")
    assert not _process_alive(pid)
    after = runner.invoke(main, [*args, "neo4j", "status"])
    assert after.exit_code == 1 and after.output.startswith("stopped")

    (home / "neo4j" / "run" / "g2is-neo4j.pid").write_text(f"{os.getpid()}\n")  # a pid that is not ours
    stale = runner.invoke(main, [*args, "neo4j", "status"])
    assert stale.output.startswith("stale")
    runner.invoke(main, [*args, "neo4j", "stop"])  # must not signal the unrelated pid
    assert _process_alive(os.getpid())


def test_unreachable_uri_is_one_line_and_exit_3(monkeypatch):
    monkeypatch.setenv("NEO4J_URI", f"bolt://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("NEO4J_PASSWORD", "hunter2-secret")
    result = CliRunner().invoke(main, ["db", "info"])
    assert result.exit_code == 3
    assert result.output.startswith("error: cannot reach Neo4j at bolt://127.0.0.1:")
    assert "Traceback" not in result.output and "hunter2" not in result.output


def server_processes(home) -> list[int]:
    """Pids of every Neo4j server process running on this state directory (by command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                args = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if ENTRY_POINT.encode() in args and f"--home-dir={home}".encode() in args:
                found.append(int(entry))
    return found


def test_concurrent_auto_starts_one_server_no_default_password_and_ownership_by_identity(tmp_path):
    """Issue 15 (4): three commands start a stopped server at once; the default password never works; a
    foreign pid in the pid file (and server.json) neither stops, hides nor duplicates the real server."""
    import subprocess
    import sys
    import threading
    import time

    from neo4j import GraphDatabase
    from neo4j.exceptions import AuthError

    from g2is_graph.locks import ProcessIdentity

    home = tmp_path / "home"
    port = _free_port()
    conf = tmp_path / "g2is.toml"
    conf.write_text(f'[server]\nport = {port}\nheap = "512m"\npagecache = "128m"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEO4J_")} | {"G2IS_HOME": str(home)}
    g2is = [str(Path(sys.executable).parent / "g2is"), "--config", str(conf)]
    first_answer = []

    def try_the_default_password():  # until the server first answers, then stop (one failed attempt at most)
        deadline = time.monotonic() + 300
        while not first_answer and time.monotonic() < deadline:
            try:
                with GraphDatabase.driver(f"bolt://127.0.0.1:{port}", auth=("neo4j", "neo4j"),
                                          connection_timeout=1) as driver:
                    driver.verify_connectivity()
                first_answer.append("accepted")
            except AuthError:
                first_answer.append("refused")
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.02)

    watcher = threading.Thread(target=try_the_default_password)
    watcher.start()
    commands = [subprocess.Popen([*g2is, "db", "info"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for _ in range(3)]
    results = [(c.wait(timeout=400), *c.communicate()) for c in commands]
    watcher.join(timeout=60)
    server = LocalServer(ServerConfig(state_dir=home / "neo4j", port=port))
    try:
        assert all(code == 0 for code, _, _ in results), results
        assert all(json.loads(out)["samples"] == 0 for _, out, _ in results)
        assert first_answer == ["refused"]  # Bolt never accepted neo4j:neo4j, not even before g2is connected
        (pid,) = server_processes(server.home)
        assert server.status().pid == pid

        server.pid_file.write_text(f"{os.getpid()}\n")  # a pid that is not the server's
        status = subprocess.run([*g2is, "neo4j", "status"], env=env, capture_output=True, text=True)
        assert status.returncode == 0 and status.stdout.startswith(f"running: pid {pid}, bolt://127.0.0.1:{port}")
        info = json.loads(server.info_file.read_text())
        info.update(pid=os.getpid(), port=1, uri="bolt://127.0.0.1:1", process=ProcessIdentity.current().as_dict())
        server.info_file.write_text(json.dumps(info))  # server.json overwritten too: the store lock still tells
        again = subprocess.run([*g2is, "neo4j", "start"], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and f"running: pid {pid}, bolt://127.0.0.1:{port}" in again.stdout
        assert server_processes(server.home) == [pid]  # no second JVM
        stopped = subprocess.run([*g2is, "neo4j", "stop"], env=env, capture_output=True, text=True)
        assert stopped.returncode == 0 and stopped.stdout.startswith("stopped"), stopped.stdout + stopped.stderr
        assert server_processes(server.home) == [] and _process_alive(os.getpid())
    finally:
        for leftover in server_processes(server.home):
            os.kill(leftover, 9)

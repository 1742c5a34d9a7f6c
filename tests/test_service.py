"""Running as a service: the systemd units, readiness notification, the SysV init script and
the logrotate snippet, each exercised with the real tool (systemd-analyze, a NOTIFY_SOCKET
datagram socket, start-stop-daemon, logrotate) against the real daemon."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest

from tests.support.proxy import ROOT, ProxyProcess
from tests.support.sink import SmtpSink
from tests.support.testkeys import KeySet, dns_record
from tests.support.tools import die_with_parent, free_port, missing, require_tool

INIT = Path(ROOT) / "init"
UNITS = ("dkproxy-out.service", "dkproxy-in.service")
INSTALLED = "/opt/dkproxy/bin/dkproxy"


def dkproxy_program() -> str:
    """The dkproxy entry point of the environment running the tests."""
    path = os.path.join(os.path.dirname(sys.executable), "dkproxy")
    if not os.access(path, os.X_OK):
        missing(f"no dkproxy entry point beside {sys.executable} (pip install -e .)")
    return path


# -- systemd units ------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify_unit(
    text: str, name: str, directory: Path, installed: bool = False
) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit text; unless `installed` (ExecStart names a real
    program already), /opt/dkproxy/bin/dkproxy is replaced by the test environment's."""
    analyze = require_tool("systemd-analyze")
    path = directory / name
    path.write_text(text if installed else text.replace(INSTALLED, dkproxy_program()))
    return subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    text = (INIT / unit).read_text(encoding="utf-8")
    proc = verify_unit(text, unit, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert unit not in proc.stderr, proc.stderr  # no warning about our unit at all


@pytest.mark.parametrize(
    "broken",
    ["ProtectSystem=strictly", "Type=notfy", "ExecStart=/nonexistent/dkproxy out"],
)
def test_systemd_analyze_catches_a_broken_unit(broken: str, tmp_path: Path) -> None:
    """The check above can fail: a misspelt value or a missing program is reported."""
    text = (INIT / UNITS[0]).read_text(encoding="utf-8")
    key = broken.split("=", 1)[0]
    text = re.sub(rf"^{key}=.*$", broken, text, count=1, flags=re.M)
    proc = verify_unit(text, UNITS[0], tmp_path)
    assert UNITS[0] in proc.stderr, (broken, proc.stderr)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_readiness_reload_and_hardening(unit: str) -> None:
    settings = unit_settings((INIT / unit).read_text(encoding="utf-8"))
    one = {key: values[-1] for key, values in settings.items()}
    assert one["Type"] == "notify"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["ExecStart"].startswith(f"{INSTALLED} {unit.split('-')[1].split('.')[0]} ")
    assert one["User"] == "dkproxy" and one["Group"] == "dkproxy"
    assert one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    assert "/etc/dkimproxy" in one["ReadOnlyPaths"]
    assert one["KillMode"] == "mixed"


# -- sd_notify ----------------------------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An AF_UNIX datagram socket like systemd's; yields (socket, NOTIFY_SOCKET value)."""
    directory = tempfile.mkdtemp(prefix="dkproxy-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def receive(sock: socket.socket, timeout: float) -> list[str]:
    """Datagrams received until `timeout` passes without one."""
    got = []
    sock.settimeout(timeout)
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            return got


def out_args(key_dir: KeySet, workers: int) -> list[str]:
    return [f"--keyfile={key_dir.rsa2048.path}", "--selector=sel2048",
            "--domain=example.org", f"--workers={workers}"]  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_is_sent_once_the_port_is_bound_and_keys_loaded(
    workers: int,
    notify_socket: tuple[socket.socket, str],
    key_dir: KeySet,
    smtp_sink: type[SmtpSink],
) -> None:
    sock, path = notify_socket
    sink = smtp_sink()
    proxy = ProxyProcess("out", out_args(key_dir, workers), relay=sink.address,
                         env={"NOTIFY_SOCKET": path})  # fmt: skip
    with proxy:
        sock.settimeout(20)
        first = sock.recv(4096).decode()
        # At the moment READY=1 arrives, a client is served (the 220 comes from a worker).
        with smtplib.SMTP(proxy.host, proxy.port, timeout=20) as client:
            assert client.noop()[0] == 250
        lines = first.split("\n")
        assert lines[0] == "READY=1", first
        assert f"MAINPID={proxy.proc.pid}" in lines  # type: ignore[union-attr]
        assert any(line.startswith("STATUS=") for line in lines)
        assert receive(sock, 0.5) == []  # exactly once


def test_ready_in_the_abstract_namespace(key_dir: KeySet, smtp_sink: type[SmtpSink]) -> None:
    name = f"dkproxy-test-{os.getpid()}-{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        proxy = ProxyProcess("out", out_args(key_dir, 1), relay=smtp_sink().address,
                             env={"NOTIFY_SOCKET": "@" + name})  # fmt: skip
        with proxy:
            sock.settimeout(20)
            assert sock.recv(4096).decode().startswith("READY=1\n")


def test_no_ready_when_the_port_is_taken_or_a_key_is_bad(
    notify_socket: tuple[socket.socket, str], key_dir: KeySet, tmp_path: Path
) -> None:
    sock, path = notify_socket
    env = {**os.environ, "PYTHONPATH": ROOT, "NOTIFY_SOCKET": path}
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = taken.getsockname()[1]
        for args, status in (
            ([*out_args(key_dir, 2), f"127.0.0.1:{busy}", "127.0.0.1:25"], 1),
            ([f"--keyfile={bad_key}", "--selector=s", "--domain=example.org",
              f"127.0.0.1:{free_port()}", "127.0.0.1:25"], 2),
        ):  # fmt: skip
            command = [sys.executable, "-m", "dkproxy", "out", *args]
            proc = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=60, check=False
            )
            assert proc.returncode == status, proc.stderr
            assert receive(sock, 0.2) == [], proc.stderr


def fields(datagram: str) -> dict[str, str]:
    """The KEY=VALUE lines of one sd_notify datagram."""
    return dict(line.partition("=")[::2] for line in datagram.split("\n") if line)


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@pytest.fixture
def ready_proxy(
    notify_socket: tuple[socket.socket, str], smtp_sink: type[SmtpSink]
) -> Iterator[Callable[[list[str]], ProxyProcess]]:
    """Factory: `ready_proxy(args)` starts `dkproxy out ARGS` under a NOTIFY_SOCKET and
    returns once READY=1 has arrived; the socket (`notify_socket`) then holds nothing."""
    sock, path = notify_socket
    with ExitStack() as stack:

        def start(args: list[str]) -> ProxyProcess:
            proxy = ProxyProcess("out", args, relay=smtp_sink().address,
                                 env={"NOTIFY_SOCKET": path})  # fmt: skip
            stack.enter_context(proxy)
            sock.settimeout(20)
            assert fields(sock.recv(4096).decode())["READY"] == "1"
            return proxy

        yield start


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_says_reloading_then_ready_once_every_worker_has_reloaded(
    workers: int,
    ready_proxy: Callable[[list[str]], ProxyProcess],
    notify_socket: tuple[socket.socket, str],
    key_dir: KeySet,
    tmp_path: Path,
) -> None:
    """SIGHUP: RELOADING=1 (with MONOTONIC_USEC, for Type=notify-reload) from the main
    process, then READY=1 only after each worker has rebuilt its configuration; a reload
    that fails (the key file broken meanwhile) still ends in READY=1, saying so."""
    sock, _ = notify_socket
    key = tmp_path / "key.pem"
    shutil.copy(key_dir.rsa2048.path, key)
    proxy = ready_proxy([f"--keyfile={key}", *out_args(key_dir, workers)[1:]])
    for attempt, taken in ((1, True), (2, False)):
        if not taken:
            key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        before = monotonic_usec()
        proxy.signal(signal.SIGHUP)
        reloading = fields(sock.recv(4096).decode())
        assert reloading["RELOADING"] == "1", reloading
        assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
        ready = fields(sock.recv(4096).decode())
        assert ready["READY"] == "1", ready
        assert ("reloaded" if taken else "reload failed") in ready["STATUS"], ready
        # READY=1 came after every worker had finished: each has logged its outcome.
        outcome = "configuration reloaded" if taken else "reload failed"
        assert proxy.log.count(outcome) == workers, proxy.log
        assert proxy.log.count("configuration reloaded") == workers  # not again
        assert attempt == 1 or proxy.log.count("reload failed") == workers
        assert receive(sock, 0.3) == []
    # Still serving with the configuration it kept.
    with smtplib.SMTP(proxy.host, proxy.port, timeout=20) as client:
        assert client.noop()[0] == 250


@pytest.mark.parametrize("workers", [1, 2])
def test_stop_says_stopping_once_and_exits_0(
    workers: int,
    ready_proxy: Callable[[list[str]], ProxyProcess],
    notify_socket: tuple[socket.socket, str],
    key_dir: KeySet,
) -> None:
    sock, _ = notify_socket
    proxy = ready_proxy(out_args(key_dir, workers))
    # A session in flight: the stop waits for it, and STOPPING=1 comes at once.
    client = smtplib.SMTP(proxy.host, proxy.port, timeout=20)
    assert client.ehlo()[0] == 250
    proxy.signal(signal.SIGTERM)
    stopping = fields(sock.recv(4096).decode())
    assert stopping["STOPPING"] == "1", stopping
    assert proxy.proc is not None and proxy.proc.poll() is None
    client.quit()
    assert proxy.proc.wait(40) == 0
    assert receive(sock, 0.3) == []  # once, and no READY=1 after it


# -- SysV init script ---------------------------------------------------------------------------


def test_sysv_init_script_start_status_reload_stop(
    installed: Installed, smtp_sink: type[SmtpSink]
) -> None:
    """With the program installed as the README says (the service user must be able to
    run it: the test's own interpreter may live where that user cannot read)."""
    require_tool("start-stop-daemon")
    if os.geteuid() != 0:
        missing("the init script runs as root (it drops privileges to the service user)")
    sink = smtp_sink()
    port = free_port()
    # The service user must reach its pid file: a world-searchable directory of its own.
    work = tempfile.mkdtemp(prefix="dkproxy-sysv-")
    os.chmod(work, 0o755)
    env = {"PATH": os.environ["PATH"], "DKPROXY_DEFAULTS": os.path.join(work, "defaults")}
    try:
        script = os.path.join(work, "dkproxy-out")  # named after the direction, as installed
        shutil.copy(INIT / "dkproxy.init", script)
        log_file = os.path.join(work, "out.log")
        pidfile = os.path.join(work, "run", "dkproxy-out.pid")
        defaults = os.path.join(work, "defaults")
        with open(defaults, "w", encoding="utf-8") as handle:
            handle.write(
                f"DAEMON={installed.program}\n"
                f'DAEMON_ARGS="--keyfile={installed.key} --selector=mail '
                f"--domain=example.org --workers=2 --log_file={log_file} "
                f'127.0.0.1:{port} {sink.address}"\n'
                f"PIDFILE={pidfile}\nUSER=nobody\nGROUP=nogroup\n"
            )

        def init(action: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["sh", script, action], env=env, capture_output=True,
                                  text=True, timeout=90, check=False)  # fmt: skip

        started = init("start")
        assert started.returncode == 0, started.stderr
        status = init("status")
        assert status.returncode == 0 and "is running" in status.stdout, status
        pid = int(Path(pidfile).read_text().strip())
        assert os.stat(f"/proc/{pid}").st_uid == 65534  # running as nobody
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("alice@example.org", ["bob@example.net"],
                            b"From: alice@example.org\r\nSubject: sysv\r\n\r\nHi.\r\n")  # fmt: skip
        (msg,) = sink.wait_for(1, timeout=20)
        assert b"DKIM-Signature:" in msg.data
        assert init("reload").returncode == 0
        deadline = time.monotonic() + 20
        while Path(log_file).read_text().count("configuration reloaded") < 2:
            assert time.monotonic() < deadline, Path(log_file).read_text()
            time.sleep(0.1)
        assert init("stop").returncode == 0
        assert not os.path.exists(f"/proc/{pid}")
        assert not os.path.exists(pidfile)
        assert init("status").returncode == 3
        assert "stopped" in Path(log_file).read_text()
    finally:
        subprocess.run(["sh", os.path.join(work, "dkproxy-out"), "stop"], env=env,
                       capture_output=True, timeout=90, check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)


# -- logrotate ----------------------------------------------------------------------------------


def test_logrotate_snippet_rotates_while_the_daemon_keeps_logging(
    key_dir: KeySet, smtp_sink: type[SmtpSink], tmp_path: Path
) -> None:
    logrotate = require_tool("logrotate")
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    log_file = log_dir / "out.log"
    snippet = (INIT / "dkproxy.logrotate").read_text(encoding="utf-8")
    assert "/var/log/dkproxy/*.log {" in snippet
    # As shipped, but on our directory; `su` names the service user, which this machine lacks.
    snippet = snippet.replace("/var/log/dkproxy", str(log_dir))
    snippet = re.sub(r"^\s*su .*$", "", snippet, flags=re.M)
    config = tmp_path / "logrotate.conf"
    config.write_text(snippet)
    sink = smtp_sink()
    args = [*out_args(key_dir, 2), f"--log_file={log_file}"]
    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dkproxy", "out", *args, f"127.0.0.1:{port}", sink.address],
        env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
    )  # fmt: skip

    def logged(text: str) -> None:
        deadline = time.monotonic() + 20
        while not log_file.exists() or text not in log_file.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, text
            time.sleep(0.05)

    def send(subject: str) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.sendmail("alice@example.org", ["bob@example.net"],
                            f"From: alice@example.org\r\nMessage-ID: <{subject}@test>\r\n"
                            "\r\nHi.\r\n")  # fmt: skip

    try:
        logged("started 2 workers")
        send("before-rotation")
        logged("msgid=<before-rotation@test>")
        proc = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(config)],
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        send("after-rotation")
        logged("msgid=<after-rotation@test>")
    finally:
        daemon.terminate()
        daemon.communicate(timeout=60)
    rotated = (log_dir / "out.log.1").read_text()
    current = log_file.read_text()
    assert "listening on" in rotated and "msgid=<before-rotation@test>" in rotated
    assert "listening on" not in current and "stopped" in current
    assert "\0" not in current  # truncated, then appended at the new end, not at the old offset
    assert daemon.returncode == 0


# -- installing on Debian 12, as the README says ---------------------------------------------


def readme_install_commands() -> str:
    """The shell block under <!-- install-debian12 --> in README.md."""
    text = (Path(ROOT) / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- install-debian12 -->\n```sh\n(.*?)\n```", text, re.S)
    assert found, "README.md lost its install-debian12 block"
    return found.group(1)


@dataclass
class Installed:
    prefix: str
    listen: int
    relay: int  # a placeholder: tests point the configuration at their own sink
    output: str

    @property
    def key(self) -> str:
        """The key keygen made, readable by the service user only."""
        return f"{self.prefix}/etc/dkimproxy/example.org.mail.key"

    @property
    def program(self) -> str:
        return f"{self.prefix}/opt/dkproxy/bin/dkproxy"

    def relay_to(self, address: str) -> None:
        conf = Path(self.prefix, "etc", "dkimproxy", "dkimproxy_out.conf")
        conf.write_text(re.sub(r"^relay .*$", f"relay     {address}", conf.read_text(), flags=re.M))


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    """Every README install line run as written, but under a temporary prefix, with the
    machine's existing user nobody as the service user (a test must not add users), and
    without the lines that change the running system (apt-get: checked instead; systemctl)."""
    debian_python = require_tool("/usr/bin/python3")
    dpkg = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "python3-venv"],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if "installed" not in dpkg.stdout:
        missing("python3-venv is not installed (the README's apt-get line)")
    if os.geteuid() != 0:
        missing("the install route runs as root")
    require_tool("runuser")
    listen, relay = free_port(), free_port()
    prefix = tempfile.mkdtemp(prefix="dkproxy-install-")
    os.chmod(prefix, 0o755)  # the service user must reach /opt/dkproxy and /etc/dkimproxy
    os.makedirs(os.path.join(prefix, "etc", "systemd", "system"))
    try:
        lines = []
        for line in readme_install_commands().splitlines():
            if line.startswith(("apt-get ", "systemctl ", "adduser ")):
                continue
            line = re.sub(r"^python3 ", f"{debian_python} ", line)
            line = line.replace("-g dkproxy", "-g nogroup")
            line = line.replace("--owner dkproxy", "--owner nobody")
            line = line.replace("runuser -u dkproxy", "runuser -u nobody")
            for path in ("/opt/dkproxy", "/etc/dkimproxy", "/etc/systemd/system"):
                line = line.replace(path, prefix + path)
            line = line.replace("127.0.0.1:10027", f"127.0.0.1:{listen}")
            line = line.replace("127.0.0.1:10028", f"127.0.0.1:{relay}")
            lines.append(line)
        script = "set -e\n" + "\n".join(lines) + "\n"
        proc = subprocess.run(["sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                              timeout=840, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield Installed(prefix, listen, relay, proc.stdout)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.mark.timeout(900)
def test_readme_install_route_into_a_prefix_and_the_units_execstart(
    installed: Installed, smtp_sink: type[SmtpSink], notify_socket: tuple[socket.socket, str]
) -> None:
    prefix, listen = installed.prefix, installed.listen
    assert "example.org.mail.key" in installed.output  # check-config listed the key
    key_dir = os.path.join(prefix, "etc", "dkimproxy")
    assert os.stat(key_dir).st_mode & 0o777 == 0o750
    key = os.path.join(key_dir, "example.org.mail.key")
    assert os.stat(key).st_mode & 0o777 == 0o600 and os.stat(key).st_uid == 65534
    sink = smtp_sink()
    installed.relay_to(sink.address)

    unit = Path(prefix, "etc", "systemd", "system", "dkproxy-out.service").read_text()
    unit = unit.replace("/opt/dkproxy", prefix + "/opt/dkproxy")
    unit = unit.replace("/etc/dkimproxy", prefix + "/etc/dkimproxy")
    check = verify_unit(unit, "dkproxy-out.service", Path(tempfile.mkdtemp(dir=prefix)), True)
    assert check.returncode == 0, check.stderr
    exec_start = unit_settings(unit)["ExecStart"][-1]
    assert exec_start.startswith(f"{installed.program} out --conf_file=")

    # Start the unit's command line as systemd would: as the service user, with a
    # notification socket; it must say READY=1, sign, and stop with status 0.
    sock, path = notify_socket
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o777)
    daemon = subprocess.Popen(
        exec_start.split(), user=65534, group=65534, extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": path},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/",
    )  # fmt: skip
    try:
        sock.settimeout(60)
        assert sock.recv(4096).startswith(b"READY=1\n")
        with smtplib.SMTP("127.0.0.1", listen, timeout=30) as client:
            data = b"From: alice@example.org\r\nSubject: installed\r\n\r\nHi.\r\n"
            client.sendmail("alice@example.org", ["bob@example.net"], data)
        (msg,) = sink.wait_for(1, timeout=30)
    finally:
        daemon.terminate()
        output = daemon.communicate(timeout=60)[0].decode()
    assert daemon.returncode == 0, output
    assert b"d=example.org" in msg.data and b"s=mail" in msg.data
    record = dns_record(key).encode()
    assert dkim.verify(msg.data, dnsfunc=lambda name, timeout=5: record)


# -- commands in the documentation ----------------------------------------------------------


def test_documented_commands_run_on_debian12() -> None:
    """Debian 12 has no `python` command, and pip refuses to install into the system Python
    (PEP 668): commands in the README and the bench docs use python3, .venv/bin/python or
    the /opt/dkproxy virtualenv."""
    documents = [Path(ROOT) / "README.md", *sorted((Path(ROOT) / "bench").glob("*.md")),
                 *sorted((Path(ROOT) / "bench").glob("*.py"))]  # fmt: skip
    bare = re.compile(r"(?:^|[`$]\s*|^\s+)(python|pip|pytest)\s+\S")
    offending = []
    for document in documents:
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            if bare.search(line) and "Debian 12's Python refuses" not in line:
                offending.append(f"{document.name}:{number}: {line.strip()}")
    assert offending == []

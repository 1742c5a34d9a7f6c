"""Faults injected from outside into the running daemon: it must never lose, fake or stall mail.

Each test starts the real `dkproxy` between a client speaking SMTP and a downstream that
misbehaves on purpose (Postfix's smtp-sink told to refuse or drop at a stage, the capture
server told to hang or cut the connection), or breaks the daemon's own surroundings (its key
file, its spool directory, DNS, the process itself), and checks what the client was told and
what arrived. The rule throughout: a client sees 250 for a message only when the downstream
has it; every other outcome is a 4xx (retry later) or the downstream's own refusal.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest

from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer, SmtpSink
from tests.support.testkeys import dns_record, make_rsa_key
from tests.support.tools import free_port, missing, require_tool
from tests.support.verifiers import sign_mail_dkim

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: fault test\r\n"
    b"Message-ID: <fault-1@example.org>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)
#: Past the spool threshold (256 KiB), so the message goes to a file in $TMPDIR.
LARGE = MESSAGE + b"x" * 998 + b"\r\n" + (b"y" * 78 + b"\r\n") * 8000


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)


def out_args(keyfile: str, *extra: str) -> list[str]:
    return [f"--keyfile={keyfile}", "--selector=sel", "--domain=example.org", *extra]


def attempt(port: int, message: bytes = MESSAGE) -> tuple[str, int, str]:
    """One SMTP transaction as an MTA runs it; stops at the first refusal.

    Returns (stage, code, text): the stage that ended it ("greeting", "EHLO", "MAIL", "RCPT",
    "DATA", "end of data"); code 0 means the connection was closed without a reply.
    """
    steps: list[tuple[str, bytes | None, int]] = [
        ("greeting", None, 220),
        ("EHLO", b"EHLO client.example.test", 250),
        ("MAIL", b"MAIL FROM:<alice@example.org>", 250),
        ("RCPT", b"RCPT TO:<bob@example.net>", 250),
        ("DATA", b"DATA", 354),
    ]
    with RawClient("127.0.0.1", port, timeout=60) as client:
        try:
            for stage, line, expected in steps:
                if line is not None:
                    client.send(line + b"\r\n")
                code, text = client.reply()
                if code != expected:
                    return stage, code, text
            client.send(message + b".\r\n")
            code, text = client.reply()
            return "end of data", code, text
        except (ConnectionError, TimeoutError) as exc:
            return stage if "stage" in locals() else "greeting", 0, str(exc)


def worker_pids(proxy: ProxyProcess) -> list[int]:
    """The processes serving clients: the workers, or the daemon itself with one worker."""
    assert proxy.proc is not None
    root = proxy.proc.pid
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat", "rb") as stat:
                if int(stat.read().rsplit(b")", 1)[1].split()[1]) == root:
                    children.append(int(entry))
    return children or [root]


def open_spool_files(proxy: ProxyProcess) -> list[str]:
    """Spool files (deleted or not) a worker still holds open."""
    found = []
    for pid in worker_pids(proxy):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if "dkproxy-" in target and ".msg" in target:
                        found.append(target)
    return found


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- the downstream refuses, drops or hangs at every stage ------------------------------------

#: Downstream command -> the stage at which the client hears of its refusal. The proxy must
#: have the whole message before it can sign it, so it answers DATA itself (354) and a
#: refusal of DATA downstream reaches the client after its end of data.
STAGES = [("CONNECT", "greeting"), ("EHLO", "EHLO"), ("MAIL", "MAIL"), ("RCPT", "RCPT"),
          ("DATA", "end of data"), (".", "end of data")]  # fmt: skip


@pytest.mark.parametrize(("command", "stage"), STAGES)
@pytest.mark.parametrize("kind", ["soft", "hard", "drop"])
def test_downstream_refusal_or_drop_at_every_stage(
    keyfile: str, smtp_sink: Callable[..., SmtpSink], command: str, stage: str, kind: str
) -> None:
    """4xx and 5xx from the downstream reach the client (its own text where it commits
    mail); a downstream that hangs up gives 4xx; never a 250 for the message."""
    option = {"soft": "soft_reject", "hard": "hard_reject", "drop": "disconnect"}[kind]
    sink = smtp_sink(**{option: command})
    with ProxyProcess("out", out_args(keyfile), sink.address) as proxy:
        ended, code, text = attempt(proxy.port)
        if kind == "drop":
            assert 400 <= code < 500, (ended, code, text)
        elif command == "EHLO" and kind == "hard":
            # A 5xx to EHLO makes a client fall back to HELO, as RFC 5321 4.1.4 says; then
            # smtp-sink (no -f HELO) accepts, and the message goes through.
            assert (ended, code) == ("end of data", 250), (ended, code, text)
            return
        else:
            assert ended == stage, (ended, code, text)
            assert code // 100 == (4 if kind == "soft" else 5), (ended, code, text)
            if command in ("MAIL", "RCPT", "DATA", "."):
                # smtp-sink's refusal, word for word
                assert "Error: command failed" in text, text
        assert ended != "end of data" or code != 250
        # The proxy keeps serving: a new session against the same misbehaving downstream
        # gets the same answer, not a stale pooled session's.
        assert attempt(proxy.port)[1] == code or kind == "drop"
    if command != ".":
        assert sink.messages() == []


@pytest.mark.parametrize("verb", ["CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "."])
def test_downstream_hanging_gives_4xx_within_the_relay_timeout(keyfile: str, verb: str) -> None:
    timeout = 2.0
    with CaptureServer(delays={verb: 60}) as down, \
            ProxyProcess("out", out_args(keyfile, f"--relay_timeout={timeout:g}"),
                         down.address) as proxy:  # fmt: skip
        started = time.monotonic()
        ended, code, text = attempt(proxy.port)
        elapsed = time.monotonic() - started
    assert 400 <= code < 500, (ended, code, text)
    # within the configured time (a generous margin for a loaded machine), not the hang's 60 s
    assert timeout * 0.9 <= elapsed <= timeout + 15, elapsed
    assert "Traceback" not in proxy.log


@pytest.mark.parametrize("after", [1, 4096, 300_000])
def test_downstream_closing_mid_data_gives_4xx(keyfile: str, after: int) -> None:
    with CaptureServer(close_in_data=after) as down, \
            ProxyProcess("out", out_args(keyfile), down.address) as proxy:  # fmt: skip
        ended, code, text = attempt(proxy.port, LARGE)
        assert ended == "end of data" and 400 <= code < 500, (ended, code, text)
        # the next message gets a fresh downstream session and is refused the same way
        assert 400 <= attempt(proxy.port, LARGE)[1] < 500
        assert wait_until(lambda: open_spool_files(proxy) == []), open_spool_files(proxy)
    assert all(tx.data_reply is None for tx in down.transactions)


# -- the upstream client goes away -----------------------------------------------------------


@pytest.mark.parametrize("message", [MESSAGE, LARGE], ids=["small", "spooled"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_upstream_disconnect_mid_data_relays_nothing_and_leaves_no_spool_file(
    keyfile: str, tmp_path: Path, message: bytes, how: str
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with CaptureServer() as down, \
            ProxyProcess("out", out_args(keyfile), down.address,
                         env={"TMPDIR": str(spool)}) as proxy:  # fmt: skip
        client = RawClient(proxy.host, proxy.port)
        client.reply()
        for line in ("EHLO c.test", "MAIL FROM:<alice@example.org>", "RCPT TO:<b@example.net>"):
            assert client.command(line)[0] == 250
        assert client.command("DATA")[0] == 354
        client.send(message[: len(message) * 2 // 3])  # no end of data
        time.sleep(0.5)
        if how == "reset":  # RST instead of FIN
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        assert wait_until(lambda: open_spool_files(proxy) == [])
        assert list(spool.iterdir()) == []
        # the proxy is unharmed and the downstream session was not left mid-transaction
        assert attempt(proxy.port) == ("end of data", 250, "2.0.0 Ok: queued")
    assert len(down.messages) == 1 and down.messages[0].data is not None
    assert down.messages[0].data.endswith(MESSAGE)
    assert "DATA" in down.commands and down.commands.count("DATA") == 1


# -- dkproxy killed with -9 ------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["RCPT", "DATA", "end of data"])
def test_kill_9_mid_transaction_never_acknowledges(keyfile: str, moment: str) -> None:
    """SIGKILL while a transaction is open: the client sees the connection drop, never a 250,
    so its queue keeps the message and retries."""
    delays = {"RCPT": {"RCPT": 30}, "DATA": {}, "end of data": {".": 30}}[moment]
    with CaptureServer(delays=delays) as down:
        proxy = ProxyProcess("out", out_args(keyfile, "--workers=2"), down.address).start()
        try:
            client = RawClient(proxy.host, proxy.port)
            client.reply()
            assert client.command("EHLO c.test")[0] == 250
            assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
            client.send(b"RCPT TO:<bob@example.net>\r\n")
            if moment != "RCPT":
                assert client.reply()[0] == 250
                client.send(b"DATA\r\n")
            if moment == "DATA":  # the client is half-way through its message
                assert client.reply()[0] == 354
                client.send(LARGE[: len(LARGE) // 2])
                time.sleep(0.5)
            elif moment == "end of data":
                assert client.reply()[0] == 354
                client.send(MESSAGE + b".\r\n")
                down.wait_for(1)  # the downstream has the data and sits on its reply
            else:
                assert wait_until(lambda: "RCPT" in " ".join(down.commands))
            for pid in [*worker_pids(proxy), proxy.proc.pid]:  # type: ignore[union-attr]
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with pytest.raises(ConnectionError):
                client.reply()
            client.close()
        finally:
            proxy.stop()


# -- the key file goes away while running ----------------------------------------------------


def _remove(path: Path) -> None:
    path.unlink()


def _garble(path: Path) -> None:
    path.write_text("-----BEGIN PRIVATE KEY-----\ntruncated\n")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _unreadable(path: Path) -> None:
    # The daemon runs as nobody after loading the key as root; a key only root may read is
    # what an administrator who forgets `--owner` ends up with.
    path.chmod(0o600)


@pytest.mark.parametrize("damage", [_remove, _garble, _directory, _unreadable],
                         ids=["removed", "garbled", "directory", "unreadable"])  # fmt: skip
def test_key_file_lost_while_running_signing_goes_on_and_reload_keeps_the_old_key(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    key = Path(make_rsa_key(str(tmp_path / "example.org.key"), 1024))
    record = dns_record(str(key))
    extra = []
    if damage is _unreadable:
        if os.geteuid() != 0:
            missing("needs root to start as root and drop to nobody")
        tmp_path.chmod(0o755)
        extra = ["--user=nobody", "--group=nogroup"]
    with CaptureServer() as down, \
            ProxyProcess("out", [*out_args(str(key)), *extra], down.address) as proxy:  # fmt: skip
        assert attempt(proxy.port)[1] == 250
        damage(key)
        assert attempt(proxy.port)[1] == 250  # the loaded key signs on
        proxy.signal(signal.SIGHUP)
        assert wait_until(lambda: "reload failed" in proxy.log)
        assert attempt(proxy.port)[1] == 250
    failure = next(line for line in proxy.log.splitlines() if "reload failed" in line)
    assert str(key) in failure, failure
    assert len(down.messages) == 3
    for tx in down.messages:
        assert tx.data is not None
        assert dkim.verify(tx.data, dnsfunc=lambda _name, timeout=5: record.encode())


# -- the spool directory is full -------------------------------------------------------------


def _in_small_tmpfs(proxy: ProxyProcess, directory: Path, size: str, prefill: str = "") -> None:
    """Run the daemon in its own mount namespace with a tmpfs of `size` on `directory`
    (its $TMPDIR), optionally filled with `prefill` of zeros first."""
    unshare = require_tool("unshare")
    mount = require_tool("mount")
    fill = f'head -c {prefill} /dev/zero > "$0/fill" && ' if prefill else ""
    script = f'{mount} -t tmpfs -o size={size} tmpfs "$0" && {fill}exec "$@"'
    user_ns = [] if os.geteuid() == 0 else ["--map-root-user"]
    proxy.command = [unshare, "--mount", *user_ns, "sh", "-c", script, str(directory),
                     *proxy.command]  # fmt: skip
    proxy.env["TMPDIR"] = str(directory)


@pytest.mark.parametrize(
    ("size", "prefill", "message"),
    [("1m", "", LARGE * 4), ("1m", "700k", LARGE)],
    ids=["larger-than-the-disk", "disk-nearly-full"],
)
def test_full_spool_directory_gives_452_not_250(
    keyfile: str, tmp_path: Path, size: str, prefill: str, message: bytes
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with CaptureServer() as down:
        proxy = ProxyProcess("out", out_args(keyfile), down.address)
        _in_small_tmpfs(proxy, spool, size, prefill)
        try:
            proxy.start()
        except RuntimeError as exc:
            if "mount" in str(exc) or "unshare" in str(exc):
                missing(f"cannot mount a tmpfs here: {exc}")
            raise
        with proxy, RawClient(proxy.host, proxy.port) as client:
            client.reply()
            assert client.command("EHLO c.test")[0] == 250
            for data, expected in ((message, 452), (MESSAGE, 250), (message, 452)):
                assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
                assert client.command("RCPT TO:<bob@example.net>")[0] == 250
                assert client.command("DATA")[0] == 354
                client.send(data + b".\r\n")
                # 452 4.3.1 after the rest of the data; small mail (in memory) still flows
                # in the same session
                assert client.reply()[0] == expected
    assert [tx.data is not None and tx.data.endswith(MESSAGE) for tx in down.messages] == [True]


def test_spool_filled_by_a_concurrent_message_gives_452_to_the_one_that_does_not_fit(
    keyfile: str, tmp_path: Path
) -> None:
    """Two messages of 650 KB on a 1 MB spool: the one that runs out of room gets 452, the
    other is relayed intact."""
    spool = tmp_path / "spool"
    spool.mkdir()
    with CaptureServer() as down:
        proxy = ProxyProcess("out", out_args(keyfile, "--workers=1"), down.address)
        _in_small_tmpfs(proxy, spool, "1m")
        with proxy.start(), RawClient(proxy.host, proxy.port) as first:
            first.reply()
            for line in ("EHLO c.test", "MAIL FROM:<alice@example.org>", "RCPT TO:<b@example.net>"):
                assert first.command(line)[0] == 250
            assert first.command("DATA")[0] == 354
            first.send(LARGE)  # on disk, not yet ended
            time.sleep(1.0)
            ended, code, text = attempt(proxy.port, LARGE)
            assert (ended, code) == ("end of data", 452), (ended, code, text)
            first.send(b".\r\n")
            assert first.reply()[0] == 250
    assert [tx.data is not None and tx.data.endswith(LARGE) for tx in down.messages] == [True]


# -- DNS down or failing (inbound) -----------------------------------------------------------

AUTHSERV = "mx.example.test"


@pytest.fixture(scope="module")
def signed_message(key_dir: object, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    key = make_rsa_key(str(tmp_path_factory.mktemp("dnskey") / "k.pem"), 2048, traditional=True)
    return sign_mail_dkim(MESSAGE, key, "example.org", "faults")


@pytest.fixture
def failing_dns(dns_server: DNSServer) -> Iterator[Callable[[str], str]]:
    def address(kind: str) -> str:
        if kind == "timeout":
            return dns_server.blackhole_address()
        if kind == "closed":
            return f"127.0.0.1:{free_port()}"
        return dns_server.failing_address(kind)

    yield address


@pytest.mark.parametrize("kind", ["timeout", "closed", "SERVFAIL", "REFUSED"])
def test_dns_failure_is_temperror_and_the_configured_action(
    tmp_path: Path, signed_message: bytes, failing_dns: Callable[[str], str], kind: str
) -> None:
    server = failing_dns(kind)
    outcomes = {}
    for action, extra in (
        ("default", ""),
        ("reject_error", "reject_error\n"),
    ):
        with CaptureServer() as down:
            conf = tmp_path / f"in-{action}.conf"
            proxy = ProxyProcess("in", [f"--conf_file={conf}"], positional=False)
            conf.write_text(
                f"listen {proxy.address}\nrelay {down.address}\nhostname {AUTHSERV}\n"
                f"dns_server {server}\ndns_timeout 1\n{extra}"
            )
            with proxy:
                outcomes[action] = attempt(proxy.port, signed_message)[1:]
            delivered = [tx.data for tx in down.messages]
        if action == "default":
            assert outcomes[action][0] == 250, outcomes
            (data,) = delivered
            assert data is not None
            head = data.split(b"\r\n\r\n")[0].decode()
            assert f"Authentication-Results: {AUTHSERV};" in head
            assert "dkim=temperror" in head.replace("\r\n", " "), head
        else:
            assert outcomes[action][0] == 451, outcomes
            assert delivered == []
    # TOML [actions]: temperror may also be turned into a permanent refusal
    conf = tmp_path / "in.toml"
    with CaptureServer() as down:
        proxy = ProxyProcess("in", ["-c", str(conf)], positional=False)
        conf.write_text(
            f'mode = "in"\nlisten = "{proxy.address}"\nrelay = "{down.address}"\n'
            f'hostname = "{AUTHSERV}"\ndns_server = "{server}"\ndns_timeout = 1\n'
            '[actions]\n"dkim.temperror" = "reject"\n'
        )
        with proxy:
            assert attempt(proxy.port, signed_message)[1] == 550
        assert down.messages == []


# -- the daemon stopped as soon as it started ------------------------------------------------


def test_stop_right_after_start_leaves_no_worker_behind(keyfile: str) -> None:
    """SIGTERM while the supervisor is still forking workers: every worker stops with it.
    (A worker forked just then used to miss the signal and keep the port, so that the next
    start failed with "address in use".)"""
    for _ in range(8):
        proxy = ProxyProcess("out", out_args(keyfile, "--workers=4"), "127.0.0.1:9").start()
        proxy.stop()
        assert proxy.proc is not None and proxy.proc.returncode == 0
        port = proxy.port
        with socket.socket() as probe:  # the port is free again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            assert wait_until(functools.partial(_bindable, probe, port), 5), proxy.log[-2000:]


def _bindable(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True

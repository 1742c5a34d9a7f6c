"""dkproxy-qmail-queue: the QMAILQUEUE wrapper, run as qmail runs it.

Each test runs the installed wrapper with the message on fd 0 and the envelope on fd 1 and
checks its exit status and what reached "the real qmail-queue": a stand-in written here that
follows the protocol exactly (fd 0 to EOF, then fd 1; records both; exits with a chosen
code), and, when notqmail is installed in /var/qmail, the real qmail-queue too (the queued
message and envelope are read back from the queue directory and removed).

Work is done by a running `dkproxy qmail-service` or, when no service answers, in the
wrapper's own process; tests that matter for both run both ways. Signatures are checked by
Perl Mail::DKIM with keys served by NSD.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dkproxy.qmail import wire_form
from dkproxy.qmail_client import ask_service
from tests.support.dnsserver import DNSServer
from tests.support.testkeys import KeySet, dns_record, make_ed25519_key, make_rsa_key
from tests.support.verifiers import sign_mail_dkim, verify_dkimpy, verify_mail_dkim

REAL_QUEUE = "/var/qmail/bin/qmail-queue"
QUEUE_DIR = "/var/qmail/queue"
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "dkproxy-qmail-queue")
WRAPPER = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "dkproxy.qmail_client"]

DOMAIN = "qmail-a.test"
OTHER = "qmail-b.test"
AUTHSERV = "mx.qmail.test"

STANDIN = """\
import os, sys

def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)

record = os.environ["STANDIN_DIR"]
message = read_all(0)  # qmail-queue(8): the message on fd 0, read to EOF first,
envelope = read_all(1)  # then the envelope on fd 1
for name, data in (("message", message), ("envelope", envelope),
                   ("qmailqueue", os.environ.get("QMAILQUEUE", "-").encode())):
    with open(os.path.join(record, name), "wb") as handle:
        handle.write(data)
code = int(os.environ.get("STANDIN_EXIT", "0"))
if code < 0:
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


@dataclass(frozen=True)
class Queued:
    message: bytes  # without the real qmail-queue's own Received line
    envelope: bytes  # F<sender>\0 T<rcpt>\0 ... \0


class StandIn:
    """The stand-in qmail-queue: records what it got in `record/`."""

    name = "stand-in"

    def __init__(self, directory: Path) -> None:
        self.program = directory / "qmail-queue"
        self.program.write_text(f"#!{sys.executable}\n{STANDIN}")
        self.program.chmod(0o755)
        self.record = directory / "record"
        self.record.mkdir()

    def env(self, exit_code: int = 0) -> dict[str, str]:
        return {"DKQUEUE": str(self.program), "STANDIN_DIR": str(self.record),
                "STANDIN_EXIT": str(exit_code)}  # fmt: skip

    def reset(self) -> None:
        for item in self.record.iterdir():
            item.unlink()

    def queued(self) -> Queued | None:
        if not (self.record / "message").exists():
            return None
        assert (self.record / "qmailqueue").read_bytes() == b"-", "QMAILQUEUE must be unset"
        return Queued((self.record / "message").read_bytes(),
                      (self.record / "envelope").read_bytes())  # fmt: skip


class RealQueue:
    """notqmail's qmail-queue in /var/qmail: the queued files are read back and removed."""

    name = "qmail-queue"

    def __init__(self) -> None:
        self.before: set[str] = set()

    def env(self, exit_code: int = 0) -> dict[str, str]:
        assert exit_code == 0
        return {"DKQUEUE": REAL_QUEUE}

    @staticmethod
    def _files() -> set[str]:
        return set(glob.glob(f"{QUEUE_DIR}/mess/*/*"))

    def reset(self) -> None:
        self.before = self._files()

    def queued(self) -> Queued | None:
        new = sorted(self._files() - self.before)
        if not new:
            return None
        assert len(new) == 1, new
        mess = new[0]
        inode = os.path.basename(mess)
        split = os.path.basename(os.path.dirname(mess))
        message = Path(mess).read_bytes()
        todos = [f"{QUEUE_DIR}/todo/{split}/{inode}", f"{QUEUE_DIR}/todo/{inode}"]
        todo = next((p for p in todos if os.path.exists(p)), None)
        envelope = Path(todo).read_bytes() if todo else b""
        for path in (
            mess,
            *todos,
            f"{QUEUE_DIR}/intd/{split}/{inode}",
            f"{QUEUE_DIR}/intd/{inode}",
        ):
            if os.path.exists(path):
                os.unlink(path)
        if todo is None:
            return None  # qmail-queue gave up (its exit status says why) and left a stray file
        assert message.startswith(b"Received: (qmail "), message[:80]
        message = message.split(b"\n", 1)[1]
        records = envelope.split(b"\0")
        envelope = b"".join(r + b"\0" for r in records if r[:1] in (b"F", b"T")) + b"\0"
        return Queued(message, envelope)


def _qmail_send_running() -> bool:
    """qmail-send holds an exclusive flock on lock/sendmutex while it runs."""
    import fcntl

    try:
        fd = os.open(f"{QUEUE_DIR}/lock/sendmutex", os.O_WRONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _queue_params() -> list[str]:
    """The stand-in always; notqmail's qmail-queue when installed, we are root (to read and
    remove what it queues) and qmail-send is not running (it would take the messages)."""
    params = ["stand-in"]
    if os.path.exists(REAL_QUEUE) and os.geteuid() == 0 and not _qmail_send_running():
        params.append("qmail-queue")
    return params


@pytest.fixture(params=_queue_params())
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> StandIn | RealQueue:
    return StandIn(tmp_path) if request.param == "stand-in" else RealQueue()


@dataclass
class Setup:
    dns: DNSServer
    keys: Path  # the service's allowed directory: keys/<domain>/<selector>
    conf: Path
    socket: str


@pytest.fixture(scope="module")
def setup(dns_server: DNSServer, key_dir: KeySet, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Setup]:  # fmt: skip
    base = tmp_path_factory.mktemp("qmail")
    keys, conf = base / "keys", base / "conf"
    for directory in (keys / DOMAIN, keys / OTHER, keys / "fixed", conf):
        directory.mkdir(parents=True)
    shutil.copy(key_dir.rsa2048.path, keys / DOMAIN / "default")
    shutil.copy(key_dir.rsa1024.path, keys / OTHER / "default")
    make_rsa_key(str(keys / "fixed" / "fixedsel"))
    make_ed25519_key(str(keys / OTHER / "edsel"))
    records = {
        f"default._domainkey.{DOMAIN}": [dns_record(key_dir.rsa2048.path)],
        f"default._domainkey.{OTHER}": [dns_record(key_dir.rsa1024.path)],
        f"fixedsel._domainkey.{OTHER}": [dns_record(str(keys / "fixed" / "fixedsel"))],
        f"edsel._domainkey.{OTHER}": [dns_record(str(keys / OTHER / "edsel"))],
        f"revoked._domainkey.{DOMAIN}": ["v=DKIM1; k=rsa; p="],
        f"badkey._domainkey.{DOMAIN}": ["v=DKIM1; k=rsa; p=AAAAB3Nza"],
    }
    dns_server.publish(records)
    sock = str(base / "service.sock")
    service = subprocess.Popen(
        [sys.executable, "-m", "dkproxy", "qmail-service", "--socket", sock,
         "--allow-dir", str(keys), "--allow-dir", str(conf), "--log-level", "warning"],
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(sock)
            break
        except OSError:
            if time.monotonic() > deadline or service.poll() is not None:
                service.kill()
                raise RuntimeError("dkproxy qmail-service did not start") from None
            time.sleep(0.1)
    try:
        yield Setup(dns_server, keys, conf, sock)
    finally:
        service.terminate()
        service.wait(10)
        dns_server.unpublish(*records)


@dataclass
class Result:
    code: int
    stderr: str
    queued: Queued | None


def run(
    setup: Setup,
    queue: StandIn | RealQueue,
    message: bytes,
    envelope: bytes = b"Fa@qmail-a.test\0Tb@example.net\0\0",
    *,
    service: bool = True,
    exit_code: int = 0,
    tmp: Path | None = None,
    wrapper: list[str] = WRAPPER,
    **env: str,
) -> Result:
    """Run the wrapper as qmail does: message on fd 0, envelope on fd 1."""
    queue.reset()
    workdir = tmp or setup.conf
    (workdir / "in.message").write_bytes(message)
    (workdir / "in.envelope").write_bytes(envelope)
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "QMAILQUEUE": WRAPPER[-1],  # qmail sets it; the wrapper must not run it again
        "DKPROXY_SOCKET": setup.socket if service else str(setup.conf / "no-service.sock"),
        "DKPROXY_DNS_SERVER": setup.dns.address,
        "DKPROXY_HOSTNAME": AUTHSERV,
        **queue.env(exit_code),
        **env,
    }
    if tmp is not None:
        full_env["TMPDIR"] = str(tmp)
    with open(workdir / "in.message", "rb") as fd0, open(workdir / "in.envelope", "rb") as fd1:
        proc = subprocess.run(wrapper, stdin=fd0, stdout=fd1, stderr=subprocess.PIPE,
                              env=full_env, timeout=120, check=False)  # fmt: skip
    return Result(proc.returncode, proc.stderr.decode("utf-8", "replace"), queue.queued())


def lf_message(sender: str = f"Alice <alice@{DOMAIN}>", body: bytes = b"Hello.\n", *extra: str
               ) -> bytes:  # fmt: skip
    """A message as qmail stores it: LF line ends."""
    lines = [
        f"From: {sender}",
        "To: Bob <bob@example.net>",
        "Subject: qmail test",
        "Date: Mon, 30 Nov 2026 10:00:00 +0000",
        "Message-ID: <q1@qmail-a.test>",
        *extra,
    ]
    return "".join(line + "\n" for line in lines).encode() + b"\n" + body


def added_fields(queued: Queued, original: bytes) -> bytes:
    """What the wrapper put on top; asserts the original follows unchanged."""
    assert queued.message.endswith(original)
    return queued.message[: len(queued.message) - len(original)]


def field_names(fields: bytes) -> list[str]:
    return [line.split(b":", 1)[0].decode() for line in fields.split(b"\n")
            if line and line[:1] not in (b" ", b"\t")]  # fmt: skip


def mail_dkim(setup: Setup, message: bytes) -> list[tuple[str, str, str]]:
    results = verify_mail_dkim(wire_form(message), setup.dns)
    return [(r.kind, r.domain, r.result) for r in results]


PCT = {"DKSIGN": "{keys}/%/default", "DKIMSIGN": "{keys}/%/default"}


def pct_env(setup: Setup, *names: str) -> dict[str, str]:
    return {name: PCT[name].format(keys=setup.keys) for name in names or PCT}


# ---------------------------------------------------------------------------------------------
# Signing


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_signs_with_dkim_and_domainkeys_verified_by_mail_dkim(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    message = lf_message()
    envelope = b"Falice@qmail-a.test\0Tbob@example.net\0Tcarol@example.net\0\0"
    result = run(setup, queue, message, envelope, service=service, **pct_env(setup))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    assert result.queued.envelope == envelope
    fields = added_fields(result.queued, message)
    assert field_names(fields) == ["DomainKey-Signature", "DKIM-Signature"]
    assert b"\r" not in fields and b"\n\t" in fields  # qmail's LF, folded with LF TAB
    assert mail_dkim(setup, result.queued.message) == [
        ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_launcher_signs_like_the_console_script(
    setup: Setup, queue: StandIn | RealQueue, service: bool, tmp_path: Path
) -> None:
    """`dkproxy qmail-launcher PATH` writes a program that starts without site processing;
    without a service it loads site-packages itself and signs in-process."""
    launcher = tmp_path / "dkproxy-qmail-queue"
    subprocess.run([sys.executable, "-m", "dkproxy", "qmail-launcher", str(launcher)], check=True)
    assert launcher.read_text().startswith(f"#!{sys.executable} -IS\n")
    message = lf_message()
    result = run(setup, queue, message, service=service, wrapper=[str(launcher)],
                 **pct_env(setup))  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.queued is not None
    assert mail_dkim(setup, result.queued.message) == [
        ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip


def test_selector_is_the_key_file_name_and_domain_the_sender(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    """A fixed path (no %): d= is the Sender's domain (not From's), s= the file name."""
    message = lf_message(f"alice@{DOMAIN}", b"Body.\n", f"Sender: list@{OTHER}")
    result = run(setup, queue, message, DKIMSIGN=str(setup.keys / "fixed" / "fixedsel"))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    fields = added_fields(result.queued, message)
    assert b"d=qmail-b.test;" in fields and b"s=fixedsel;" in fields
    assert mail_dkim(setup, result.queued.message) == [("dkim", OTHER, "pass")]


def test_ed25519_key_signs_ed25519_sha256(setup: Setup, queue: StandIn | RealQueue) -> None:
    message = lf_message(f"alice@{OTHER}")
    result = run(setup, queue, message, DKIMSIGN=str(setup.keys / "%" / "edsel"))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    assert b"a=ed25519-sha256;" in added_fields(result.queued, message)
    # Mail::DKIM here predates RFC 8463; dkimpy verifies Ed25519.
    assert [r.result for r in verify_dkimpy(result.queued.message, setup.dns)] == ["pass"]


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_missing_key_with_percent_passes_unsigned(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    message = lf_message("someone@unknown-domain.test")
    result = run(setup, queue, message, service=service, **pct_env(setup))
    assert result.code == 0, result.stderr
    assert result.queued is not None and result.queued.message == message


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
@pytest.mark.parametrize("variable", ["DKSIGN", "DKIMSIGN"])
def test_missing_fixed_key_is_a_temporary_failure(
    setup: Setup, queue: StandIn | RealQueue, service: bool, variable: str
) -> None:
    result = run(setup, queue, lf_message(), service=service,
                 **{variable: str(setup.keys / "fixed" / "absent")})  # fmt: skip
    assert result.code == 55
    assert result.queued is None
    assert "absent" in result.stderr


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key\n", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
)
def test_unusable_key_is_a_temporary_failure(
    setup: Setup, queue: StandIn | RealQueue, content: bytes, tmp_path: Path
) -> None:
    bad = setup.keys / "fixed" / "broken"
    bad.write_bytes(content)
    try:
        result = run(setup, queue, lf_message(), DKIMSIGN=str(bad))
    finally:
        bad.unlink()
    assert result.code == 55 and result.queued is None


def test_domainkeys_with_ed25519_key_is_a_temporary_failure(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    result = run(setup, queue, lf_message(f"a@{OTHER}"), DKSIGN=str(setup.keys / "%" / "edsel"))
    assert result.code == 55 and result.queued is None


def test_empty_sender_bounce_is_signed_and_envelope_kept(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    message = lf_message(f"MAILER-DAEMON@{DOMAIN}", b"Hi. This is the qmail-send program.\n")
    envelope = b"F\0Talice@example.net\0\0"
    result = run(setup, queue, message, envelope, **pct_env(setup))
    assert result.code == 0, result.stderr
    assert result.queued is not None and result.queued.envelope == envelope
    assert mail_dkim(setup, result.queued.message) == [
        ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_8bit_and_mixed_line_ends_sign_the_wire_form(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    body = (
        "Grüße aus Köln\n".encode()  # UTF-8
        + b"latin-1 \xe9t\xe9\r\n"  # a CRLF line amid LF ones
        + b"lf line\n  trailing space  \n\n\n"
    )
    message = lf_message(
        f"Jörg <alice@{DOMAIN}>",  # 8bit in a header field too (SMTPUTF8)
        body,
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ).replace(b"Subject: qmail test\n", b"Subject: qmail test\r\n")
    result = run(setup, queue, message, service=service, **pct_env(setup))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    added_fields(result.queued, message)  # the original bytes follow unchanged
    assert mail_dkim(setup, result.queued.message) == [
        ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip


def test_20mb_message(setup: Setup, queue: StandIn | RealQueue) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"
    body = line * (20 * 1024 * 1024 // len(line))
    message = lf_message(f"alice@{DOMAIN}", body)
    result = run(setup, queue, message, **pct_env(setup))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    added_fields(result.queued, message)
    assert mail_dkim(setup, result.queued.message) == [
        ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip


def test_no_from_header_passes_unsigned(setup: Setup, queue: StandIn | RealQueue) -> None:
    message = b"To: bob@example.net\nSubject: no from\n\nbody\n"
    result = run(setup, queue, message, **pct_env(setup))
    assert result.code == 0 and result.queued is not None
    assert result.queued.message == message


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_dkproxy_config_signs_with_sender_map_and_domainkeys(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    """DKPROXY_CONFIG: `dkproxy out` rules; the sender_map gives qmail-b.test two DKIM
    signatures with its own keys, and the default gives qmail-a.test DKIM + DomainKeys."""
    sender_map = setup.conf / "sender_map"
    sender_map.write_text(
        f"{OTHER} dkim(key={setup.keys}/fixed/fixedsel,s=fixedsel),"
        f"dkim(key={setup.keys}/{OTHER}/default,s=default)\n"
    )
    conf = setup.conf / "dkimproxy_out.conf"
    conf.write_text(
        f"domain {DOMAIN}\nkeyfile {setup.keys}/{DOMAIN}/default\nselector default\n"
        f"signature dkim(c=relaxed)\nsignature domainkeys(c=nofws)\nsender_map {sender_map}\n"
    )
    first = lf_message(f"alice@{DOMAIN}")
    result = run(setup, queue, first, service=service, DKPROXY_CONFIG=str(conf))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    assert mail_dkim(setup, result.queued.message) == [
        ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip
    second = lf_message(f"bob@{OTHER}")
    result = run(setup, queue, second, service=service, DKPROXY_CONFIG=str(conf))
    assert result.code == 0, result.stderr
    assert result.queued is not None
    fields = added_fields(result.queued, second)
    assert field_names(fields) == ["DKIM-Signature", "DKIM-Signature"]
    assert b"s=fixedsel;" in fields and b"s=default;" in fields
    assert mail_dkim(setup, result.queued.message) == [("dkim", OTHER, "pass")] * 2


def test_broken_config_is_a_temporary_failure(setup: Setup, queue: StandIn | RealQueue) -> None:
    conf = setup.conf / "broken_out.conf"
    conf.write_text(f"domain {DOMAIN}\nkeyfile {setup.keys}/nonexistent\nselector x\n")
    result = run(setup, queue, lf_message(), DKPROXY_CONFIG=str(conf))
    assert result.code == 55 and result.queued is None
    assert "nonexistent" in result.stderr


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_relayclient_without_keys_passes_unsigned_and_others_are_verified(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    """Neither DK*SIGN nor DK*VERIFY: relay clients sign (default keys under
    /var/qmail/control/domainkeys/%/, absent for this domain: unsigned), other mail is
    verified."""
    message = lf_message(f"alice@no-key-{os.getpid()}.test")
    for variable in ("RELAYCLIENT", "AUTHINFO"):
        result = run(setup, queue, message, service=service, **{variable: ""})
        assert result.code == 0 and result.queued is not None
        assert result.queued.message == message, variable
    result = run(setup, queue, message, service=service)
    assert result.code == 0 and result.queued is not None
    assert field_names(added_fields(result.queued, message)) == ["Authentication-Results"]


def test_service_refuses_keys_outside_its_directories_and_client_signs_itself(
    setup: Setup, queue: StandIn | RealQueue, tmp_path: Path
) -> None:
    outside = tmp_path / "keys" / DOMAIN
    outside.mkdir(parents=True)
    shutil.copy(setup.keys / DOMAIN / "default", outside / "default")
    message = lf_message()
    outside_env = {"DKIMSIGN": str(tmp_path / "keys" / "%" / "default")}
    # The service answers "not mine" for a key outside its --allow-dir ...
    assert ask_service(setup.socket, outside_env, "", message, 30) is None
    inside = ask_service(setup.socket, pct_env(setup, "DKIMSIGN"), "", message, 30)
    assert inside is not None and inside[0] == 0 and inside[1].startswith(b"DKIM-Signature:")
    # ... and the wrapper then signs in its own process, with its own permissions.
    result = run(setup, queue, message, **outside_env)
    assert result.code == 0, result.stderr
    assert result.queued is not None
    assert mail_dkim(setup, result.queued.message) == [("dkim", DOMAIN, "pass")]


# ---------------------------------------------------------------------------------------------
# The protocol: envelope, read errors, the real qmail-queue's status


@pytest.mark.parametrize(
    ("envelope", "code"),
    [
        (b"Xa@b\0Tc@d\0\0", 91),  # does not start with F
        (b"Fa@b\0Rc@d\0\0", 91),  # a recipient record not starting with T
        (b"Fa@b\0Tc@d\0x", 91),  # garbage instead of the final NUL
        (b"Fa@b\0Tc@d\0", 54),  # ends before the final NUL (qmail-queue: read error)
        (b"Fa@b", 54),  # sender not terminated
        (b"", 54),  # nothing at all
    ],
)
def test_malformed_envelope(
    setup: Setup, queue: StandIn | RealQueue, envelope: bytes, code: int
) -> None:
    result = run(setup, queue, lf_message(), envelope, **pct_env(setup))
    assert result.code == code
    assert result.queued is None


def _run_with_fds(
    setup: Setup, queue: StandIn | RealQueue, stdin: int, stdout: int, close_stdin: bool = False
) -> int:
    queue.reset()
    env = {"PATH": os.environ.get("PATH", ""), "DKPROXY_SOCKET": setup.socket, **queue.env()}
    proc = subprocess.run(WRAPPER, stdin=stdin, stdout=stdout, env=env, timeout=60, check=False,
                          preexec_fn=(lambda: os.close(0)) if close_stdin else None)  # fmt: skip
    assert queue.queued() is None
    return proc.returncode


def _reset_connection(data: bytes) -> socket.socket:
    """A TCP socket whose peer sent `data` and then reset the connection: read() fails."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    peer.sendall(data)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    time.sleep(0.2)
    return client


def test_unreadable_message_or_envelope(
    setup: Setup, queue: StandIn | RealQueue, tmp_path: Path
) -> None:
    """Each way fd 0 or fd 1 can fail to read gives 54 (qmail-queue's read error) and
    queues nothing. (A directory on fd 0 or fd 1 stops Python before any code runs: exit 1,
    which qmail treats as temporary too.)"""
    envelope = tmp_path / "envelope"
    envelope.write_bytes(b"Fa@b\0Tc@d\0\0")
    message = tmp_path / "message"
    message.write_bytes(lf_message())
    write_only = os.open(tmp_path / "wo", os.O_WRONLY | os.O_CREAT)  # read() gives EBADF
    try:
        with open(envelope, "rb") as fd1:
            assert _run_with_fds(setup, queue, write_only, fd1.fileno()) == 54
        with open(envelope, "rb") as fd1:
            assert _run_with_fds(setup, queue, write_only, fd1.fileno(), close_stdin=True) == 54
        with _reset_connection(lf_message()) as reset, open(envelope, "rb") as fd1:
            assert _run_with_fds(setup, queue, reset.fileno(), fd1.fileno()) == 54
        with open(message, "rb") as fd0:
            assert _run_with_fds(setup, queue, fd0.fileno(), write_only) == 54
        with _reset_connection(b"Fa@b\0") as reset, open(message, "rb") as fd0:
            assert _run_with_fds(setup, queue, fd0.fileno(), reset.fileno()) == 54
    finally:
        os.close(write_only)


def test_real_queue_failure_code_is_passed_through(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    if isinstance(queue, StandIn):
        for code in (11, 31, 53, 71, 81):
            result = run(setup, queue, lf_message(), exit_code=code, **pct_env(setup))
            assert result.code == code
        result = run(setup, queue, lf_message(), exit_code=-9, **pct_env(setup))  # killed
        assert result.code not in range(0, 41)
    else:
        long_address = b"x" * 1100 + b"@example.net"
        result = run(setup, queue, lf_message(), b"Fa@b\0T" + long_address + b"\0\0",
                     **pct_env(setup))  # fmt: skip
        assert result.code == 11  # qmail-queue: address too long


@pytest.mark.parametrize(("size", "code"), [(2_000, 0), (2_000_000, 53)])
def test_queue_that_stops_reading_never_gives_success(
    setup: Setup, tmp_path: Path, size: int, code: int
) -> None:
    """A qmail-queue that exits 0 without reading: a message that fit into the pipe is its
    to judge (0); one it did not take in full is a write error (53), never 0."""
    queue = StandIn(tmp_path)
    quitter = tmp_path / "quitter"
    quitter.write_text("#!/bin/sh\nsleep 1\nexit 0\n")  # after our writes, unread
    quitter.chmod(0o755)
    message = lf_message(f"alice@{DOMAIN}", b"z" * size + b"\n")
    result = run(setup, queue, message, DKQUEUE=str(quitter), **pct_env(setup))
    assert result.code == code


def test_missing_real_queue_is_temporary(setup: Setup, tmp_path: Path) -> None:
    queue = StandIn(tmp_path)
    result = run(setup, queue, lf_message(), DKQUEUE=str(tmp_path / "absent"), **pct_env(setup))
    assert result.code == 120 and result.queued is None


def test_nothing_left_in_temporary_directories(
    setup: Setup, queue: StandIn | RealQueue, tmp_path: Path
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    big = lf_message(f"alice@{DOMAIN}", b"x" * 70 + b"\n" * 1 + b"y" * 3_000_000 + b"\n")
    for service in (True, False):
        for message in (lf_message(), big):
            result = run(setup, queue, message, service=service, tmp=tmp, **pct_env(setup))
            assert result.code == 0, result.stderr
        result = run(setup, queue, lf_message(), b"Xbad\0", service=service, tmp=tmp)
        assert result.code == 91
    leftovers = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("in."))
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Case:
    name: str
    dk: str  # the qmail-dk letter this message must get
    dkim: str  # a qmail-dkim letter it must get
    dk_status: str
    dkim_status: str


def _sign(setup: Setup, message: bytes, kind: str, selector: str = "default") -> bytes:
    key = setup.keys / DOMAIN / "default"
    signed = sign_mail_dkim(message, str(key), DOMAIN, selector, kind=kind)
    return signed.replace(b"\r\n", b"\n")  # as qmail stores it


def build_case(setup: Setup, name: str) -> bytes:
    """A message (LF) whose DomainKeys and DKIM verdicts are those named by `name`."""
    base = lf_message(f"alice@{DOMAIN}", b"Original body.\n")
    if name == "good":
        return _sign(setup, _sign(setup, base, "dkim"), "domainkeys")
    if name == "unsigned":
        return base
    if name == "body-altered":
        return _sign(setup, _sign(setup, base, "dkim"), "domainkeys") + b"Appended.\n"
    if name == "header-altered":
        signed = _sign(setup, _sign(setup, base, "dkim"), "domainkeys")
        return signed.replace(b"Subject: qmail test", b"Subject: qmail TEST")
    if name in ("no-key", "revoked", "bad-key"):
        selector = {"no-key": "nokey", "revoked": "revoked", "bad-key": "badkey"}[name]
        return _sign(setup, _sign(setup, base, "dkim", selector), "domainkeys", selector)
    if name == "syntax":
        return (b"DomainKey-Signature: a=rsa-sha1; q=dns; garbage\n"
                b"DKIM-Signature: v=1; a=rsa-sha256; nonsense\n" + base)  # fmt: skip
    raise AssertionError(name)


CASES = [
    Case("good", "A", "A", "good", "good"),
    Case("unsigned", "C", "S", "no signature", "no signatures"),
    Case("body-altered", "B", "U", "bad", "bad"),
    Case("header-altered", "B", "I", "bad", "bad"),
    Case("no-key", "D", "Q", "no key", "no key"),
    Case("revoked", "J", "N", "revoked", "revoked"),
    Case("bad-key", "E", "R", "bad format", "bad key"),
    Case("syntax", "G", "H", "bad format", "bad format"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_verification_letters_and_exit_codes(
    setup: Setup, queue: StandIn | RealQueue, case: Case
) -> None:
    message = build_case(setup, case.name)
    others = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVW" if c not in (case.dk, case.dkim))
    # Not listed: queued, with Authentication-Results and the legacy status fields on top.
    result = run(setup, queue, message, DKVERIFY=others.replace("T", ""),
                 DKIMVERIFY="".join(c for c in others if c not in "T"),
                 DKPROXY_STATUS="1")  # fmt: skip
    assert result.code == 0, result.stderr
    assert result.queued is not None
    fields = added_fields(result.queued, message)
    assert field_names(fields) == ["Authentication-Results", "DKIM-Status", "DomainKey-Status"]
    assert f"DomainKey-Status: {case.dk_status}\n".encode() in fields
    assert f"DKIM-Status: {case.dkim_status}\n".encode() in fields
    assert fields.startswith(f"Authentication-Results: {AUTHSERV};".encode())
    # Upper case: permanent refusal (13); lower case: temporary (82); nothing queued.
    for variable, letter in (("DKVERIFY", case.dk), ("DKIMVERIFY", case.dkim)):
        for value, code in ((letter.upper(), 13), (letter.lower(), 82)):
            result = run(setup, queue, message, **{variable: value})
            assert (result.code, variable, value) == (code, variable, value), result.stderr
            assert result.queued is None


def test_dns_failure_letters(setup: Setup, queue: StandIn | RealQueue) -> None:
    """No answer from DNS: DomainKeys F (cannot verify), DKIM P (temporary DNS failure)."""
    message = build_case(setup, "good")
    dead = {"DKPROXY_DNS_SERVER": setup.dns.blackhole_address(), "DKPROXY_DNS_TIMEOUT": "0.5"}
    result = run(setup, queue, message, DKVERIFY="DEfh", DKIMVERIFY="Q", **dead)
    assert result.code == 82 and result.queued is None
    result = run(setup, queue, message, DKIMVERIFY="P", **dead)
    assert result.code == 13 and result.queued is None
    result = run(setup, queue, message, DKVERIFY="ABCDEGJ", DKIMVERIFY="p", **dead)
    assert result.code == 82 and result.queued is None


def test_permanent_letter_wins_over_temporary(setup: Setup, queue: StandIn | RealQueue) -> None:
    message = build_case(setup, "body-altered")
    result = run(setup, queue, message, DKVERIFY="b", DKIMVERIFY="U")
    assert result.code == 13


@pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
def test_verify_output_matches_dkproxy_in(
    setup: Setup, queue: StandIn | RealQueue, service: bool
) -> None:
    """Authentication-Results as `dkproxy in` writes it (dkim, domainkeys, spf, dmarc), a
    forged one claiming our authserv-id removed, foreign ones kept."""
    message = build_case(setup, "good")
    forged = f"Authentication-Results: {AUTHSERV}; dkim=pass header.d=bank.test\n".encode()
    foreign = b"Authentication-Results: other.example; spf=pass\n"
    received = b"Received: from x by y; Mon, 30 Nov 2026 10:00:00 +0000\n"
    incoming = received + forged + foreign + message
    result = run(setup, queue, incoming, service=service, DKVERIFY="", TCPREMOTEIP="192.0.2.7")
    assert result.code == 0, result.stderr
    assert result.queued is not None
    stored = result.queued.message
    assert stored.endswith(foreign + message)
    assert forged not in stored and stored.count(b"Authentication-Results:") == 2
    header = stored[: stored.index(received)].decode()
    assert header.startswith(f"Authentication-Results: {AUTHSERV};\n\t")
    for clause in ("dkim=pass", "header.d=qmail-a.test", "domainkeys=pass", "spf=none",
                   "smtp.mailfrom=a@qmail-a.test", "dmarc=none"):  # fmt: skip
        assert clause in header, header
    assert "\r" not in header


def test_inbound_config_actions_refuse(setup: Setup, queue: StandIn | RealQueue) -> None:
    """DKPROXY_CONFIG with an inbound configuration: its hostname and actions apply."""
    conf = setup.conf / "in.toml"
    conf.write_text(
        f'mode = "in"\nhostname = "in.qmail.test"\ndns_server = "{setup.dns.address}"\n'
        '[actions]\n"dkim.fail" = "reject"\n"dkim.none" = "tempfail"\n'
    )
    result = run(setup, queue, build_case(setup, "body-altered"), DKPROXY_CONFIG=str(conf))
    assert result.code == 13 and result.queued is None
    result = run(setup, queue, build_case(setup, "unsigned"), DKPROXY_CONFIG=str(conf))
    assert result.code == 82 and result.queued is None
    message = build_case(setup, "good")
    result = run(setup, queue, message, DKPROXY_CONFIG=str(conf))
    assert result.code == 0 and result.queued is not None
    assert added_fields(result.queued, message).startswith(
        b"Authentication-Results: in.qmail.test;"
    )


def test_unparsable_header_is_queued_with_a_verdict(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    message = b" continuation first\nFrom: a@b\n\nbody\n"
    result = run(setup, queue, message, DKIMVERIFY="GHI")
    assert result.code == 0 and result.queued is not None
    assert b"dkim=none" in added_fields(result.queued, message)
    result = run(setup, queue, message, DKIMVERIFY="S")  # no signature seen: S applies
    assert result.code == 13 and result.queued is None


# ---------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize(
    ("stored", "wire"),
    [
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\r\nb\n", b"a\r\nb\r\n"),  # a CR already before LF is not doubled
        (b"a\rb\n", b"a\rb\r\n"),  # a bare CR stays
        (b"a\r\r\nb", b"a\r\r\nb"),
        (b"\n\n", b"\r\n\r\n"),
        (b"no line end", b"no line end"),
    ],
)
def test_wire_form(stored: bytes, wire: bytes) -> None:
    from tests.support.verifiers import to_crlf

    assert wire_form(stored) == wire == to_crlf(stored)


def test_wire_offsets_map_back_to_the_stored_message() -> None:
    from dkproxy.qmail import _bare_lfs, _original_offset

    stored = b"A: 1\nB: 2\r\nC: 3\nD: 4\n\nbody\n"
    wire = wire_form(stored)
    bare = _bare_lfs(stored, len(stored))
    starts = [0, *(i + 1 for i, byte in enumerate(wire) if byte == 0x0A)]
    stored_starts = [0, *(i + 1 for i, byte in enumerate(stored) if byte == 0x0A)]
    assert [_original_offset(bare, w) for w in starts] == stored_starts


@pytest.mark.parametrize(
    ("envelope", "sender"),
    [(b"Fa@b\0Tc@d\0\0", "a@b"), (b"F\0Tc@d\0Te@f\0\0", ""), (b"Fx\0\0", "x")],
)
def test_envelope_sender(envelope: bytes, sender: str) -> None:
    from dkproxy.qmail_client import envelope_sender

    assert envelope_sender(envelope) == sender


def test_letters_verdict() -> None:
    from dkproxy.qmail_letters import letters_verdict

    assert letters_verdict(["T", "U"], "FGHu") == 82
    assert letters_verdict(["T", "U"], "Tu") == 13
    assert letters_verdict(["A"], "BCDEFGHIJKbcdefghijk") == 0
    assert letters_verdict(["S"], "") == 0


def test_authentication_results_are_those_of_dkproxy_in(
    setup: Setup, queue: StandIn | RealQueue
) -> None:
    """The field the wrapper adds is, byte for byte but for line ends, the one `dkproxy in`'s
    verifier writes for the same message, client and sender."""
    import asyncio
    from types import SimpleNamespace

    from dkproxy.config import HostPort, InboundConfig
    from dkproxy.inbound import InboundVerifier

    message = _sign(setup, _sign(setup, lf_message(f"alice@{DOMAIN}"), "dkim"), "domainkeys")
    result = run(setup, queue, message, b"Falice@qmail-a.test\0Tb@example.net\0\0",
                 DKVERIFY="", TCPREMOTEIP="192.0.2.7")  # fmt: skip
    assert result.code == 0 and result.queued is not None
    ours = added_fields(result.queued, message)
    cfg = InboundConfig(hostname=AUTHSERV, dns_server=HostPort.parse(setup.dns.address))
    envelope = SimpleNamespace(client_address="192.0.2.7", client_helo=None,
                               mail_from="alice@qmail-a.test")  # fmt: skip
    outcome = asyncio.run(InboundVerifier(cfg)(wire_form(message), envelope))  # type: ignore[arg-type]
    assert outcome.prepend == [ours.replace(b"\n", b"\r\n")]


# ---------------------------------------------------------------------------------------------
# notqmail end to end: qmail-inject and qmail-smtpd with QMAILQUEUE set to the wrapper.
# Defined only where notqmail is installed and usable (see _queue_params); the stand-in tests
# above cover every point without it.

NOTQMAIL = "qmail-queue" in _queue_params() and all(
    os.path.exists(f"/var/qmail/{name}")
    for name in ("bin/qmail-inject", "bin/qmail-smtpd", "control/me", "control/rcpthosts")
)

if NOTQMAIL:

    def _notqmail_env(setup: Setup, service: bool = True, **extra: str) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "QMAILQUEUE": _SCRIPT if os.path.exists(_SCRIPT) else WRAPPER[0],
            "DKQUEUE": REAL_QUEUE,
            "DKPROXY_SOCKET": setup.socket if service else str(setup.conf / "none.sock"),
            "DKPROXY_DNS_SERVER": setup.dns.address,
            "DKPROXY_HOSTNAME": AUTHSERV,
            **extra,
        }

    def _smtpd(env: dict[str, str], message: bytes, rcpt: str) -> list[str]:
        """One SMTP transaction with qmail-smtpd on pipes; its replies after DATA."""
        wire = wire_form(message).replace(b"\r\n.", b"\r\n..")
        script = (f"HELO client.test\r\nMAIL FROM:<alice@{DOMAIN}>\r\nRCPT TO:<{rcpt}>\r\n"
                  "DATA\r\n").encode() + wire + b".\r\nQUIT\r\n"  # fmt: skip
        proc = subprocess.run(["/var/qmail/bin/qmail-smtpd"], input=script, capture_output=True,
                              env={**env, "TCPREMOTEIP": "127.0.0.1"}, cwd="/var/qmail",
                              timeout=120, check=False)  # fmt: skip
        return proc.stdout.decode("utf-8", "replace").splitlines()[-2:]

    @pytest.mark.parametrize("service", [True, False], ids=["service", "in-process"])
    def test_notqmail_qmail_inject_queues_signed_mail(setup: Setup, service: bool) -> None:
        queue = RealQueue()
        queue.reset()
        message = lf_message(f"Alice <alice@{DOMAIN}>", b"Local mail.\n")
        proc = subprocess.run(
            ["/var/qmail/bin/qmail-inject", "-f", f"alice@{DOMAIN}", "bob@example.net"],
            input=message, capture_output=True, timeout=120, check=False,
            env=_notqmail_env(setup, service, **pct_env(setup)),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        queued = queue.queued()
        assert queued is not None
        assert queued.envelope == f"Falice@{DOMAIN}\0Tbob@example.net\0\0".encode()
        assert mail_dkim(setup, queued.message) == [
            ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip

    def test_notqmail_qmail_smtpd_signs_relay_clients_and_applies_letters(setup: Setup) -> None:
        queue = RealQueue()
        message = lf_message(f"alice@{DOMAIN}", b"Via SMTP.\n")
        queue.reset()
        relay = _notqmail_env(setup, RELAYCLIENT="", **pct_env(setup))
        replies = _smtpd(relay, message, "bob@example.net")
        assert replies[0].startswith("250 ok"), replies
        queued = queue.queued()
        assert queued is not None
        assert mail_dkim(setup, queued.message) == [
            ("domainkeys", DOMAIN, "pass"), ("dkim", DOMAIN, "pass")]  # fmt: skip
        me = Path("/var/qmail/control/me").read_text().strip()
        altered = build_case(setup, "body-altered")
        for letters, reply in (("U", "554 "), ("u", "451 "), ("GHI", "250 ok")):
            queue.reset()
            replies = _smtpd(_notqmail_env(setup, DKIMVERIFY=letters), altered, f"postmaster@{me}")
            assert replies[0].startswith(reply), (letters, replies)
            assert (queue.queued() is not None) == (reply == "250 ok")

    def test_notqmail_failure_is_a_temporary_smtp_error(setup: Setup) -> None:
        """A key the wrapper cannot use: the client sees 451 and nothing is queued."""
        queue = RealQueue()
        queue.reset()
        env = _notqmail_env(setup, RELAYCLIENT="", DKIMSIGN=str(setup.keys / "fixed" / "absent"))
        replies = _smtpd(env, lf_message(), "bob@example.net")
        assert replies[0].startswith("451 "), replies
        assert queue.queued() is None

"""Running dkproxy-qmail-queue as qmail does, for tests/test_qmail*.py.

A stand-in qmail-queue that follows the protocol exactly (fd 0 to EOF, then fd 1; records
both; exits with a chosen code), notqmail's real qmail-queue when installed (what it queued
is read back from /var/qmail/queue and removed), a running `dkproxy qmail-service` with keys
published in the tests' NSD, and messages as qmail stores them (LF line ends).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dkproxy.qmail import wire_form
from tests.support.dnsserver import DNSServer
from tests.support.testkeys import KeySet, dns_record, make_ed25519_key, make_rsa_key
from tests.support.verifiers import sign_mail_dkim, verify_mail_dkim

REAL_QUEUE = "/var/qmail/bin/qmail-queue"
QUEUE_DIR = "/var/qmail/queue"
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "dkproxy-qmail-queue")
WRAPPER = (
    [CONSOLE_SCRIPT]
    if os.path.exists(CONSOLE_SCRIPT)
    else [sys.executable, "-m", "dkproxy.qmail_client"]
)

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


def qmail_send_running() -> bool:
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


def queue_params() -> list[str]:
    """The stand-in always; notqmail's qmail-queue when installed, we are root (to read and
    remove what it queues) and qmail-send is not running (it would take the messages)."""
    params = ["stand-in"]
    if os.path.exists(REAL_QUEUE) and os.geteuid() == 0 and not qmail_send_running():
        params.append("qmail-queue")
    return params


def make_queue(kind: str, directory: Path) -> StandIn | RealQueue:
    return StandIn(directory) if kind == "stand-in" else RealQueue()


@dataclass
class Setup:
    dns: DNSServer
    keys: Path  # the service's allowed directory: keys/<domain>/<selector>
    conf: Path
    socket: str


def qmail_setup(dns_server: DNSServer, key_dir: KeySet, base: Path) -> Iterator[Setup]:
    """Keys under `base`, published in NSD, and a qmail service allowed to read them."""
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


@dataclass(frozen=True)
class Case:
    name: str
    dk: str  # the qmail-dk letter this message must get
    dkim: str  # a qmail-dkim letter it must get
    dk_status: str
    dkim_status: str


def sign_lf(setup: Setup, message: bytes, kind: str, selector: str = "default") -> bytes:
    key = setup.keys / DOMAIN / "default"
    signed = sign_mail_dkim(message, str(key), DOMAIN, selector, kind=kind)
    return signed.replace(b"\r\n", b"\n")  # as qmail stores it


def build_case(setup: Setup, name: str) -> bytes:
    """A message (LF) whose DomainKeys and DKIM verdicts are those named by `name`."""
    base = lf_message(f"alice@{DOMAIN}", b"Original body.\n")
    if name == "good":
        return sign_lf(setup, sign_lf(setup, base, "dkim"), "domainkeys")
    if name == "unsigned":
        return base
    if name == "body-altered":
        return sign_lf(setup, sign_lf(setup, base, "dkim"), "domainkeys") + b"Appended.\n"
    if name == "header-altered":
        signed = sign_lf(setup, sign_lf(setup, base, "dkim"), "domainkeys")
        return signed.replace(b"Subject: qmail test", b"Subject: qmail TEST")
    if name in ("no-key", "revoked", "bad-key"):
        selector = {"no-key": "nokey", "revoked": "revoked", "bad-key": "badkey"}[name]
        return sign_lf(setup, sign_lf(setup, base, "dkim", selector), "domainkeys", selector)
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

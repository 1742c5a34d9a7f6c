"""dkproxy-qmail-queue signing and the qmail-queue protocol, run as qmail runs it.

Each test runs the installed wrapper with the message on fd 0 and the envelope on fd 1 and
checks its exit status and what reached "the real qmail-queue": a stand-in that follows the
protocol exactly and, when notqmail is installed in /var/qmail, the real qmail-queue too
(tests/support/qmail.py). Work is done by a running `dkproxy qmail-service` or, when no
service answers, in the wrapper's own process; tests that matter for both run both ways.
Signatures are checked by Perl Mail::DKIM with keys served by NSD. Verification:
tests/test_qmail_verify.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dkproxy.qmail import wire_form
from dkproxy.qmail_client import ask_service
from tests.support.dnsserver import DNSServer
from tests.support.qmail import (
    DOMAIN,
    OTHER,
    WRAPPER,
    RealQueue,
    Setup,
    StandIn,
    added_fields,
    field_names,
    lf_message,
    mail_dkim,
    make_queue,
    pct_env,
    qmail_setup,
    queue_params,
    run,
)
from tests.support.testkeys import KeySet
from tests.support.verifiers import verify_dkimpy


@pytest.fixture(params=queue_params())
def queue(request: pytest.FixtureRequest, tmp_path: Path) -> StandIn | RealQueue:
    return make_queue(request.param, tmp_path)


@pytest.fixture(scope="module")
def setup(
    dns_server: DNSServer, key_dir: KeySet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    yield from qmail_setup(dns_server, key_dir, tmp_path_factory.mktemp("qmail"))


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

"""Every explicit limit, at its edge and one past it, through the running daemon.

A limit is only a limit if the input right at it is served and the input one past it gets
the documented answer, and the session (or the worker) goes on serving afterwards. The
options are set on the command line here; tests/test_config.py-style parsing of the same
names in both configuration formats is checked at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dkproxy import config
from tests.support.client import RawClient
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import dns_record, make_rsa_key
from tests.support.verifiers import sign_mail_dkim
from tests.test_inbound import ar_results

HEAD = b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: limits\r\n"


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("keys") / "example.org.key"), 1024)


@pytest.fixture
def capture() -> Iterator[CaptureServer]:
    with CaptureServer() as server:
        yield server


def start(keyfile: str, relay: str, *options: str) -> ProxyProcess:
    args = [f"--keyfile={keyfile}", "--selector=sel", "--domain=example.org", *options]
    return ProxyProcess("out", args, relay).start()


def session(proxy: ProxyProcess) -> RawClient:
    client = RawClient(proxy.host, proxy.port, timeout=30)
    assert client.reply()[0] == 220
    assert client.command("EHLO client.example")[0] == 250
    return client


def send(client: RawClient, message: bytes, rcpts: int = 1, mail: str = "") -> tuple[int, str]:
    assert client.command(f"MAIL FROM:<alice@example.org>{mail}")[0] == 250
    for n in range(rcpts):
        assert client.command(f"RCPT TO:<r{n}@example.net>")[0] == 250
    assert client.command("DATA")[0] == 354
    client.send(message + b".\r\n")
    return client.reply()


def sized(size: int) -> bytes:
    """A CRLF message of exactly `size` octets."""
    body = size - len(HEAD) - 2
    lines = b"".join(b"x" * 98 + b"\r\n" for _ in range(body // 100))
    rest = body - len(lines)
    tail = b"y" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    message = HEAD + b"\r\n" + lines + tail
    assert len(message) == size, (len(message), size)
    return message


def test_message_size_at_and_past_the_limit(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--max_message_size=5000")
    with proxy, session(proxy) as client:
        assert "SIZE 5000" in client.command("EHLO again.example")[1].splitlines()
        assert send(client, sized(5000))[0] == 250
        # past it: 552 after the data, which is read to its end and dropped
        assert send(client, sized(5001))[0] == 552
        assert client.command("NOOP")[0] == 250
        # declared past it on MAIL: refused before any data (RFC 1870 6.1)
        assert client.command("MAIL FROM:<alice@example.org> SIZE=5001")[0] == 552
        assert send(client, sized(5000), mail=" SIZE=5000")[0] == 250
    assert [len(tx.data or b"") > 5000 for tx in capture.messages] == [True, True]
    assert all(tx.data and tx.data.endswith(sized(5000)) for tx in capture.messages)
    assert capture.commands.count("DATA") == 2


def test_recipients_at_and_past_the_limit(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--max_recipients=3")
    with proxy, session(proxy) as client:
        assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
        for n in range(3):
            assert client.command(f"RCPT TO:<r{n}@example.net>")[0] == 250
        code, text = client.command("RCPT TO:<r3@example.net>")
        assert (code, text.split()[0]) == (452, "4.5.3")  # RFC 5321 4.5.3.1.8
        assert client.command("DATA")[0] == 354
        client.send(HEAD + b"\r\nhello\r\n.\r\n")
        assert client.reply()[0] == 250
        # the count is per message: the next one may have three again (pipelined here)
        client.send(
            b"MAIL FROM:<alice@example.org>\r\n"
            + b"".join(b"RCPT TO:<s%d@example.net>\r\n" % n for n in range(4))
        )
        assert [code for code, _ in client.replies(5)] == [250, 250, 250, 250, 452]
    (tx,) = capture.messages
    assert tx.accepted_rcpts == ["r0@example.net", "r1@example.net", "r2@example.net"]
    assert not any("r3@" in line for line in capture.commands)


def test_command_line_length_at_and_past_the_limit(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--max_command_line=600")
    with proxy, session(proxy) as client:
        assert client.command(b"NOOP " + b"x" * 595)[0] == 250  # 600 octets
        assert client.command(b"NOOP " + b"x" * 596)[0] == 500
        assert client.command(b"NOOP " + b"x" * 100_000)[0] == 500
        local = "a" * (600 - len("RCPT TO:<@example.net>"))
        assert client.command("MAIL FROM:<alice@example.org>")[0] == 250
        assert client.command(f"RCPT TO:<{local}@example.net>")[0] == 250
        assert client.command(f"RCPT TO:<{local}b@example.net>")[0] == 500
    assert f"RCPT TO:<{local}@example.net>" in capture.commands


def _header(fields: int, size: int | None = None) -> bytes:
    """A header block of `fields` fields (one of them folded), of `size` octets if given.

    The padding goes into folded lines of under 998 characters: a longer line would be broken
    (as Postfix's smtp client sends it on) and so change the size.
    """
    pad = b""
    if size is not None:
        needed = size - len(_header(fields))
        count = -(-needed // 900)  # continuation lines, each " " + padding + CRLF
        share, extra = divmod(needed - 3 * count, count)
        pad = b"".join(b"\r\n " + b"p" * (share + (i < extra)) for i in range(count))
    lines = [b"From: alice@example.org\r\n", b"Subject: folded" + pad + b"\r\n continued\r\n"]
    lines += [b"X-N: %d\r\n" % n for n in range(fields - 2)]
    return b"".join(lines)


def test_header_block_size_and_field_count(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--max_header_size=2048", "--max_header_fields=10")
    at_size, past_size = _header(8, 2048), _header(8, 2049)
    assert (len(at_size), len(past_size)) == (2048, 2049)
    with proxy, session(proxy) as client:
        assert send(client, _header(10) + b"\r\nbody\r\n")[0] == 250
        assert send(client, _header(11) + b"\r\nbody\r\n")[0] == 552
        assert send(client, _header(10))[0] == 250  # no body at all: all of it is header
        assert send(client, at_size + b"\r\nbody\r\n")[0] == 250
        assert send(client, past_size + b"\r\nbody\r\n")[0] == 552
        assert send(client, past_size)[0] == 552
        assert client.command("NOOP")[0] == 250
    assert len(capture.messages) == 3
    assert capture.commands.count("DATA") == 3


def test_concurrent_sessions_per_worker(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--workers=1", "--max_sessions=2")
    with proxy:
        first, second = session(proxy), session(proxy)
        with RawClient(proxy.host, proxy.port) as third:
            assert third.reply()[0] == 421
            assert third.closed_by_peer()
        first.command("QUIT")
        first.close()
        time.sleep(0.3)
        with session(proxy) as fourth:
            assert send(fourth, HEAD + b"\r\nhi\r\n")[0] == 250
        assert send(second, HEAD + b"\r\nhi\r\n")[0] == 250
        second.close()
    assert len(capture.messages) == 2


def test_messages_per_session(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--max_messages_per_session=2")
    with proxy:
        with session(proxy) as client:
            assert send(client, HEAD + b"\r\n1\r\n")[0] == 250
            assert send(client, HEAD + b"\r\n2\r\n")[0] == 250
            code, _ = client.command("MAIL FROM:<alice@example.org>")
            assert code == 421
            assert client.closed_by_peer()
        with session(proxy) as client:
            assert send(client, HEAD + b"\r\n3\r\n")[0] == 250
    assert len(capture.messages) == 3


def test_command_timeout(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--command_timeout=1.5")
    with proxy:
        with session(proxy) as busy:  # a command every half second keeps it open
            for _ in range(6):
                time.sleep(0.5)
                assert busy.command("NOOP")[0] == 250
        with session(proxy) as idle:
            started = time.monotonic()
            code, _ = idle.reply()  # nothing sent: the server speaks first
            assert code == 421 and 1.2 <= time.monotonic() - started <= 15
            assert idle.closed_by_peer()
        with RawClient(proxy.host, proxy.port) as slow:  # a command line that never ends
            slow.reply()
            slow.send(b"EHLO slow")
            assert slow.reply()[0] == 421


def test_data_timeout(keyfile: str, capture: CaptureServer) -> None:
    proxy = start(keyfile, capture.address, "--data_timeout=1.5", "--command_timeout=60")
    with proxy:
        with session(proxy) as steady:  # a line every half second: never 1.5 s of silence
            assert steady.command("MAIL FROM:<alice@example.org>")[0] == 250
            assert steady.command("RCPT TO:<bob@example.net>")[0] == 250
            assert steady.command("DATA")[0] == 354
            steady.send(HEAD + b"\r\n")
            for n in range(6):
                time.sleep(0.5)
                steady.send(b"line %d\r\n" % n)
            steady.send(b".\r\n")
            assert steady.reply()[0] == 250
        with session(proxy) as stalled:
            assert stalled.command("MAIL FROM:<alice@example.org>")[0] == 250
            assert stalled.command("RCPT TO:<bob@example.net>")[0] == 250
            assert stalled.command("DATA")[0] == 354
            stalled.send(HEAD + b"\r\npart of the body")
            started = time.monotonic()
            assert stalled.reply()[0] == 421
            assert 1.2 <= time.monotonic() - started <= 15
            assert stalled.closed_by_peer()
    assert len(capture.messages) == 1


# -- inbound: signatures checked, DNS answers used --------------------------------------------

MESSAGE_IN = (
    HEAD + b"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <l@example.org>\r\n\r\nhi\r\n"
)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer) -> Iterator[str]:
    key = make_rsa_key(str(tmp_path_factory.mktemp("in") / "k.pem"), 1024, traditional=True)
    junk = ["v=spf1 -all", "x=junk", "y=junk", "z=junk"]
    dns_server.publish(
        {
            "lim1._domainkey.example.org": [dns_record(key)],
            "lim3._domainkey.example.org": [dns_record(key), *junk[:2]],
            "lim4._domainkey.example.org": [dns_record(key), *junk[:3]],
        }
    )
    yield key
    dns_server.unpublish(*(f"lim{n}._domainkey.example.org" for n in (1, 3, 4)))


def inbound(tmp_path: Path, relay: str, dns: DNSServer, *options: str) -> ProxyProcess:
    conf = tmp_path / "in.conf"
    proxy = ProxyProcess("in", [f"--conf_file={conf}", *options], positional=False)
    conf.write_text(
        f"listen {proxy.address}\nrelay {relay}\nhostname mx.example.test\n"
        f"dns_server {dns.address}\n"
    )
    return proxy.start()


def test_signatures_checked_at_and_past_max_signatures(
    tmp_path: Path, signer: str, dns_server: DNSServer, capture: CaptureServer
) -> None:
    twice = sign_mail_dkim(
        sign_mail_dkim(MESSAGE_IN, signer, "example.org", "lim1"), signer, "example.org", "lim1"
    )
    thrice = sign_mail_dkim(twice, signer, "example.org", "lim1")
    proxy = inbound(tmp_path, capture.address, dns_server, "--max_signatures=2")
    with proxy, session(proxy) as client:
        assert send(client, twice)[0] == 250
        assert send(client, thrice)[0] == 250
    at, past = (ar_results(tx.data or b"")["dkim"] for tx in capture.messages)
    assert [r.result for r in at] == ["pass", "pass"]
    assert [r.result for r in past] == ["pass", "pass", "policy"]
    assert "not checked" in str(past[2])


def test_dns_answers_at_and_past_max_dns_answers(
    tmp_path: Path, signer: str, dns_server: DNSServer, capture: CaptureServer
) -> None:
    at = sign_mail_dkim(MESSAGE_IN, signer, "example.org", "lim3")
    past = sign_mail_dkim(MESSAGE_IN, signer, "example.org", "lim4")
    proxy = inbound(tmp_path, capture.address, dns_server, "--max_dns_answers=3")
    with proxy, session(proxy) as client:
        assert send(client, at)[0] == 250
        assert send(client, past)[0] == 250
    results = [ar_results(tx.data or b"")["dkim"][0].result for tx in capture.messages]
    assert results == ["pass", "temperror"]


# -- both configuration formats ---------------------------------------------------------------

LIMITS = {
    "max_recipients": ("7", 7),
    "max_messages_per_session": ("8", 8),
    "max_sessions": ("9", 9),
    "max_command_line": ("1000", 1000),
    "max_header_size": ("64k", 65536),
    "max_header_fields": ("11", 11),
    "command_timeout": ("12.5", 12.5),
    "data_timeout": ("13", 13.0),
}


def test_limits_in_both_configuration_formats(tmp_path: Path, keyfile: str) -> None:
    defaults = config.parse_proxy_command(
        "out", [f"--keyfile={keyfile}", "--selector=s", "--domain=example.org"]
    )
    assert (defaults.max_recipients, defaults.max_sessions, defaults.max_header_fields) == (
        1000,
        500,
        1000,
    )
    conf = tmp_path / "out.conf"
    conf.write_text(
        f"keyfile {keyfile}\nselector s\ndomain example.org\n"
        + "".join(f"{name} {text}\n" for name, (text, _) in LIMITS.items())
    )
    toml = tmp_path / "out.toml"
    toml.write_text(
        f'mode = "out"\n[defaults]\nkey = "{keyfile}"\nselector = "s"\n[limits]\n'
        + "".join(
            f"{n} = {v if isinstance(v, int | float) else repr(v)}\n"
            for n, (_, v) in LIMITS.items()
        )
    )
    for argv in ([f"--conf_file={conf}"], ["-c", str(toml)]):
        cfg = config.parse_proxy_command("out", argv)
        for name, (_, value) in LIMITS.items():
            assert getattr(cfg, name) == value, (argv, name)
    inbound_toml = tmp_path / "in.toml"
    inbound_toml.write_text(
        'mode = "in"\nhostname = "mx.example.test"\n[limits]\nmax_dns_answers = 4\n'
    )
    assert config.parse_proxy_command("in", ["-c", str(inbound_toml)]).max_dns_answers == 4
    for bad in ("max_recipients 0", "max_command_line 100", "data_timeout 0"):
        conf.write_text(f"keyfile {keyfile}\nselector s\ndomain example.org\n{bad}\n")
        with pytest.raises(config.ConfigError, match=bad.split()[0]):
            config.parse_proxy_command("out", [f"--conf_file={conf}"])


# -- trust: XFORWARD ----------------------------------------------------------------------------


def test_xforward_only_from_xforward_hosts(keyfile: str, capture: CaptureServer) -> None:
    """XFORWARD says who the real client was (SPF, the log line): only the configured MTA
    may send it. By default that is loopback; here our 127.0.0.1 client is not in the list."""
    xforward = "XFORWARD NAME=forged.example ADDR=192.0.2.66"
    with start(keyfile, capture.address) as proxy, session(proxy) as client:
        assert client.command(xforward)[0] == 250  # default: loopback is the MTA
    proxy = start(keyfile, capture.address, "--xforward_hosts=192.0.2.0/24",
                  "--xforward_hosts=2001:db8::/32")  # fmt: skip
    with proxy, session(proxy) as client:
        ehlo = client.command("EHLO again.example")[1]
        assert "XFORWARD" not in ehlo
        assert client.command(xforward)[0] == 550
        assert send(client, HEAD + b"\r\nhi\r\n")[0] == 250
    assert capture.commands.count(xforward) == 1
    assert capture.messages[-1].xforward == []
    base = [f"--keyfile={keyfile}", "--selector=s", "--domain=example.org"]
    cfg = config.parse_proxy_command("out", [*base, "--xforward_hosts=10.0.0.0/8"])
    assert cfg.xforward_hosts == ["10.0.0.0/8"]
    with pytest.raises(config.ConfigError, match="xforward_hosts"):
        config.parse_proxy_command("out", [*base, "--xforward_hosts=bogus"])

"""dkproxy behind a real Postfix, wired with the master.cf lines shipped in conf/.

An administrator pastes conf/postfix-master-out.cf (or -in.cf) into master.cf; these tests run
exactly those lines (only the ports moved to free loopback ports, and the submission service's
TLS/SASL requirements replaced by "mynetworks may submit") in a private Postfix instance
(tests/support/postfix.py), whose relayhost is Postfix's smtp-sink:

    outbound: client -> smtpd (content_filter=dksign) -> dksign smtp client (XFORWARD)
              -> dkproxy out -> reinjection smtpd -> queue -> relayhost = smtp-sink
    inbound:  client -> smtpd (content_filter=dkverify) -> dkverify smtp client (XFORWARD)
              -> dkproxy in -> reinjection smtpd -> queue -> relayhost = smtp-sink

What arrives must verify with Perl Mail::DKIM and go-msgauth against keys served by NSD, keep
the submitted message byte for byte below the fields added on the way, and nothing may be lost
when dkproxy cannot reach its downstream: Postfix keeps the mail deferred until it can retry.
"""

from __future__ import annotations

import quopri
import random
import re
import smtplib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import authres
import pytest

from tests.support.dnsserver import DNSServer
from tests.support.postfix import PostfixInstance, adapt_master_cf
from tests.support.proxy import ProxyProcess
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.testkeys import dns_record, make_rsa_key
from tests.support.tools import free_port
from tests.support.verifiers import (
    VerifierResult,
    sign_mail_dkim,
    signature_tags,
    verify_go_msgauth,
    verify_mail_dkim_many,
)

CONF = Path(__file__).resolve().parent.parent / "conf"
DOMAIN = "example.org"
SELECTOR = "postfix2026"
SENDER = "alice@example.org"
RCPT = "bob@example.net"
CLIENT_HELO = "client.example.org"
AUTHSERV = "mx.example.net"
LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------------
# the shipped master.cf snippets, moved to free ports


#: The submission service's TLS and SASL requirements replaced by "mynetworks may submit"
#: (the tests have no certificates or SASL users); everything else is run as shipped.
OPEN_SUBMISSION: dict[str, str | None] = {
    "smtpd_tls_security_level": None,
    "smtpd_sasl_auth_enable": None,
    "smtpd_client_restrictions": "permit_mynetworks,reject",
}


def outbound_services(
    submission: int, filter_port: int, reinject: int, snippet: str = "postfix-master-out.cf"
) -> str:
    """An outbound snippet of conf/ (postfix-master-out.cf, or -out-proxy.cf for the
    before-queue recipe) on test ports, its submission service open to mynetworks."""
    return adapt_master_cf(
        (CONF / snippet).read_text(encoding="utf-8"),
        ports={10027: filter_port, 10028: reinject},
        services={"submission": f"{LOOPBACK}:{submission}"},
        options={"submission": OPEN_SUBMISSION},
    )


def inbound_services(
    public: int, filter_port: int, reinject: int, snippet: str = "postfix-master-in.cf"
) -> str:
    """An inbound snippet of conf/ (postfix-master-in.cf, or -in-proxy.cf for the
    before-queue recipe) on test ports, its port-25 smtpd moved to `public`."""
    return adapt_master_cf(
        (CONF / snippet).read_text(encoding="utf-8"),
        ports={10025: filter_port, 10026: reinject},
        services={"smtp": f"{LOOPBACK}:{public}"},
    )


def postfix_downgrades_8bit() -> bool:
    """Whether the shipped dksign transport makes Postfix convert 8-bit MIME to 7 bits before
    signing: it must hide both 8BITMIME and SMTPUTF8 (dkproxy passes on its downstream's
    SMTPUTF8, and Postfix takes a server offering SMTPUTF8 to support 8BITMIME as well)."""
    text = (CONF / "postfix-master-out.cf").read_text(encoding="utf-8")
    found = re.search(r"^dksign\s.*?^\s+-o smtp_discard_ehlo_keywords=(\S*)", text, re.M | re.S)
    hidden = set(found.group(1).lower().split(",")) if found else set()
    return {"8bitmime", "smtputf8"} <= hidden


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer) -> Iterator[str]:
    """A 2048-bit RSA key published as postfix2026._domainkey.example.org."""
    path = make_rsa_key(str(tmp_path_factory.mktemp("postfix-key") / "dkim.pem"))
    name = f"{SELECTOR}._domainkey.{DOMAIN}"
    dns_server.publish({name: [dns_record(path)]})
    yield path
    dns_server.unpublish(name)


def sign_args(key: str) -> list[str]:
    """dkproxy out: DKIM (rsa-sha256, relaxed) and DomainKeys (nofws), as DKIMproxy users do."""
    return [
        f"--keyfile={key}",
        f"--selector={SELECTOR}",
        f"--domain={DOMAIN}",
        "--signature=dkim(c=relaxed)",
        "--signature=domainkeys(c=nofws)",
    ]


@pytest.fixture
def postfix() -> Iterator[Callable[..., PostfixInstance]]:
    """Factory for private Postfix instances; each is stopped and removed at teardown, after
    printing its log (pytest shows it when the test failed)."""
    instances: list[PostfixInstance] = []

    def start(**options: Any) -> PostfixInstance:
        instance = PostfixInstance(**options)
        instances.append(instance)
        return instance.start()

    yield start
    for instance in instances:
        print(f"=== Postfix {instance.dir}\n{instance.diagnostics()}")
        instance.cleanup()


@pytest.fixture
def dkproxy() -> Iterator[Callable[..., ProxyProcess]]:
    """Factory: dkproxy(mode, args, relay, port=None) starts a daemon; all are stopped at
    teardown and their logs printed."""
    proxies: list[ProxyProcess] = []
    with ExitStack() as stack:

        def start(
            mode: str, args: Sequence[str], relay: str, port: int | None = None
        ) -> ProxyProcess:
            proxy = ProxyProcess(mode, args, relay=relay, port=port)
            proxies.append(proxy)
            return stack.enter_context(proxy)

        yield start
    for proxy in proxies:
        print(f"=== dkproxy {proxy.mode} on {proxy.address}\n{proxy.log}")


# --------------------------------------------------------------------------------------------
# messages and what arrives


class Recipe(NamedTuple):
    """A shipped recipe running: a private Postfix, dkproxy as its filter, a sink behind."""

    front: int  # the port clients use: submission (outbound) or port 25 (inbound)
    filter_port: int  # dkproxy's
    reinject: int  # the smtpd dkproxy hands the mail back to
    sink: SmtpSink  # Postfix's relayhost
    proxy: ProxyProcess
    mta: PostfixInstance


@pytest.fixture
def recipe(
    postfix: Callable[..., PostfixInstance],
    dkproxy: Callable[..., ProxyProcess],
    smtp_sink: Callable[..., SmtpSink],
) -> Callable[..., Recipe]:
    """Factory: `recipe(services, mode, args, relay=None, main=None)` starts a sink, dkproxy
    (relaying to the reinjection smtpd unless `relay` says otherwise) and a Postfix running
    `services(front, filter_port, reinject)`, e.g. `outbound_services`."""

    def start(
        services: Callable[[int, int, int], str],
        mode: str,
        args: list[str],
        relay: str | None = None,
        main: dict[str, str] | None = None,
    ) -> Recipe:
        front, filter_port, reinject = free_port(), free_port(), free_port()
        sink = smtp_sink()
        proxy = dkproxy(mode, args, relay or f"{LOOPBACK}:{reinject}", port=filter_port)
        mta = postfix(services=services(front, filter_port, reinject),
                      relayhost=f"[{LOOPBACK}]:{sink.port}", main=main)  # fmt: skip
        return Recipe(front, filter_port, reinject, sink, proxy, mta)

    return start


def message(subject: str, body: bytes, *extra: str) -> bytes:
    """A complete message: with Date, Message-ID, From and To present Postfix's cleanup adds
    no header fields of its own below the submitted ones."""
    head = [
        f"From: Alice <{SENDER}>",
        f"To: Bob <{RCPT}>",
        f"Subject: {subject}",
        "Date: Sun, 22 Nov 2026 10:00:00 +0000",
        f"Message-ID: <{subject}.postfix-test@example.org>",
        *extra,
    ]
    return "".join(f"{line}\r\n" for line in head).encode("ascii") + b"\r\n" + body


def attachment_message(subject: str, size: int) -> bytes:
    """multipart/mixed with `size` bytes of (seeded) random data, base64 in 76-column lines."""
    import base64

    payload = base64.encodebytes(random.Random(2026).randbytes(size)).replace(b"\n", b"\r\n")
    body = (
        b"--BOUNDARY\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee attached.\r\n"
        b"--BOUNDARY\r\nContent-Type: application/octet-stream; name=data.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="data.bin"\r\n\r\n'
        + payload + b"--BOUNDARY--\r\n"
    )  # fmt: skip
    return message(
        subject, body, "MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="BOUNDARY"'
    )


def submit(port: int, data: bytes, mail_options: Sequence[str] = ()) -> None:
    """Submit one message over SMTP, the way a mail client or application would."""
    with smtplib.SMTP(LOOPBACK, port, local_hostname=CLIENT_HELO, timeout=60) as client:
        refused = client.sendmail(SENDER, [RCPT], data, mail_options=list(mail_options))
        assert refused == {}


def parse_fields(block: bytes) -> list[tuple[str, bytes]]:
    """(lower-case name, raw field with its folding) for a block of complete header fields."""
    assert block.endswith(b"\r\n"), block[-200:]
    fields: list[tuple[str, bytes]] = []
    for line in block[:-2].split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            assert fields, f"continuation line without a field: {line!r}"
            fields[-1] = (fields[-1][0], fields[-1][1] + b"\r\n" + line)
        else:
            name, colon, _ = line.partition(b":")
            assert colon, f"not a header field: {line!r}"
            fields.append((name.strip().decode("ascii").lower(), line))
    return fields


def fields_above(delivered: bytes, original: bytes) -> list[tuple[str, bytes]]:
    """The header fields added on top of `original`, which must arrive byte for byte."""
    assert delivered.endswith(original), (
        "the submitted message did not arrive unchanged below the added fields:\n"
        + delivered[:3000].decode("utf-8", "replace")
    )
    return parse_fields(delivered[: len(delivered) - len(original)])


def downgraded(original: bytes, delivered: bytes) -> bytes:
    """The tail of `delivered` that stands for `original` after Postfix's 8-bit to 7-bit
    conversion, checked: the same header fields in the same order but Content-Transfer-Encoding
    (now quoted-printable), and a body that decodes to the original body."""
    head, body = original.split(b"\r\n\r\n", 1)
    fields = parse_fields(head + b"\r\n")
    got_head, got_body = delivered.split(b"\r\n\r\n", 1)
    got = parse_fields(got_head + b"\r\n")[-len(fields) :]
    for (name, raw), (got_name, got_raw) in zip(fields, got, strict=True):
        assert name == got_name
        if name == "content-transfer-encoding":
            assert got_raw.lower() == b"content-transfer-encoding: quoted-printable", got_raw
        else:
            assert raw == got_raw
    assert quopri.decodestring(got_body) == body
    return b"".join(raw + b"\r\n" for _, raw in got) + b"\r\n" + got_body


def by_subject(messages: list[SinkMessage]) -> dict[str, SinkMessage]:
    found: dict[str, SinkMessage] = {}
    for msg in messages:
        subject = msg.header("Subject")
        assert subject is not None and subject not in found, subject
        found[subject] = msg
    return found


def wait_log(mta: PostfixInstance, pattern: str, count: int, timeout: float = 15.0) -> str:
    """Wait until `pattern` matches `count` maillog lines (Postfix logs just after the reply
    that completes a delivery, and postlogd writes asynchronously)."""
    regex = re.compile(pattern, re.MULTILINE)
    deadline = time.monotonic() + timeout
    while True:
        log = mta.maillog()
        found = len(regex.findall(log))
        if found >= count or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert found == count, f"{found} maillog lines match {pattern!r}, expected {count}"
    return log


def sent_to(port: int) -> str:
    """A maillog pattern for one recipient delivered to 127.0.0.1:`port`."""
    return rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, .*status=sent \(250 "


def verdicts(results: list[VerifierResult]) -> list[tuple[str, str, str, str | None]]:
    return sorted((r.kind, r.result, r.domain, r.selector) for r in results)


SIGNED_BOTH = [("dkim", "pass", DOMAIN, SELECTOR), ("domainkeys", "pass", DOMAIN, SELECTOR)]


def assert_signed_by_dkproxy(delivered: list[bytes], dns: DNSServer) -> None:
    """Our two signatures are present, made with our key, and verify with Mail::DKIM (DKIM
    and DomainKeys) and go-msgauth (DKIM)."""
    for data in delivered:
        tags = dict(signature_tags(data))
        assert set(tags) == {"dkim-signature", "domainkey-signature"}
        assert tags["dkim-signature"]["a"] == "rsa-sha256"
        assert tags["dkim-signature"]["d"] == DOMAIN
        assert tags["dkim-signature"]["s"] == SELECTOR
        assert tags["domainkey-signature"]["a"] == "rsa-sha1"
        assert tags["domainkey-signature"]["c"] == "nofws"
    for results in verify_mail_dkim_many(delivered, dns):
        assert verdicts(results) == SIGNED_BOTH, results
    for results in verify_go_msgauth(delivered, dns):
        assert verdicts(results) == [("dkim", "pass", DOMAIN, SELECTOR)], results


def assert_signed_in_between(added: list[tuple[str, bytes]]) -> None:
    """Signatures sit between the reinjection smtpd's Received (added after dkproxy) and the
    submission smtpd's (added before dkproxy, from our client's HELO)."""
    names = [name for name, _ in added]
    assert len(names) == 4, names
    assert names[0] == "received" and names[3] == "received", names
    assert sorted(names[1:3]) == ["dkim-signature", "domainkey-signature"], names
    assert added[3][1].startswith(f"Received: from {CLIENT_HELO} ".encode()), added[3][1]


# --------------------------------------------------------------------------------------------
# outbound


def test_outbound_signing_through_postfix(
    recipe: Callable[..., Recipe], signing_key: str, dns_server: DNSServer
) -> None:
    submission, filter_port, _, sink, _, mta = recipe(
        outbound_services, "out", sign_args(signing_key)
    )
    eight_bit = (
        ".a line starting with a dot\r\n"
        "..two dots\r\n"
        ".\r\n"
        "Grüße aus Köln, 8-bit UTF-8 in the body\r\n"
        ". \r\n"
        "...\r\n"
    ).encode()
    cases: dict[str, tuple[bytes, tuple[str, ...]]] = {
        "plain": (message("plain", b"Hello Bob.\r\n\r\nA plain 7-bit message.\r\n"), ()),
        "dots-8bit": (
            message(
                "dots-8bit",
                eight_bit,
                "MIME-Version: 1.0",
                "Content-Type: text/plain; charset=utf-8",
                "Content-Transfer-Encoding: 8bit",
            ),
            ("BODY=8BITMIME",),
        ),
        "attachment": (attachment_message("attachment", 2 * 1024 * 1024), ()),
    }
    for data, options in cases.values():
        submit(submission, data, options)

    arrived = by_subject(sink.wait_for(len(cases), timeout=40))
    assert set(arrived) == set(cases)
    if postfix_downgrades_8bit():
        # Postfix rewrote the 8-bit part as quoted-printable before dkproxy signed it.
        data, _ = cases["dots-8bit"]
        cases["dots-8bit"] = (downgraded(data, arrived["dots-8bit"].data), ())
        assert "BODY=8BITMIME" not in arrived["dots-8bit"].mail_params
    else:
        # The 8-bit body went through untouched and is still declared as such on the last hop.
        assert "BODY=8BITMIME" in arrived["dots-8bit"].mail_params
    for subject, (data, _) in cases.items():
        msg = arrived[subject]
        assert (msg.mail_from, msg.rcpts) == (SENDER, [RCPT])
        assert_signed_in_between(fields_above(msg.data, data))
    assert_signed_by_dkproxy([arrived[s].data for s in cases], dns_server)

    # Every message went through dkproxy once, was re-injected with XFORWARD (the reinjection
    # smtpd logs the original queue ID it was told), and was relayed to the sink once.
    wait_log(mta, sent_to(filter_port), 3)
    log = wait_log(mta, sent_to(sink.port), 3)
    assert len(re.findall(r"client=localhost\[127\.0\.0\.1\], orig_queue_id=", log)) == 3
    mta.wait_queue(lambda queue: not queue)


# --------------------------------------------------------------------------------------------
# downstream of dkproxy unavailable


def test_postfix_defers_while_dkproxy_cannot_relay_and_delivers_after_flush(
    recipe: Callable[..., Recipe],
    dkproxy: Callable[..., ProxyProcess],
    signing_key: str,
    dns_server: DNSServer,
) -> None:
    submission, filter_port, reinject, sink, broken, mta = recipe(
        outbound_services, "out", sign_args(signing_key),
        relay=f"{LOOPBACK}:{free_port()}",  # nothing listens there
        # No automatic retry within the test: only `postqueue -f` can deliver it.
        main={"queue_run_delay": "300s", "minimal_backoff_time": "300s"},
    )  # fmt: skip
    data = message("deferred", b"Must not be lost.\r\n")
    submit(submission, data)

    queue = mta.wait_queue(lambda q: [e.queue_name for e in q] == ["deferred"])
    (entry,) = queue
    assert entry.sender == SENDER
    ((address, reason),) = entry.recipients
    assert address == RCPT
    assert re.search(r"127\.0\.0\.1\[127\.0\.0\.1\].*\b4\d\d 4\.\d+\.\d+ ", reason), reason
    listing = mta.postqueue("-p")  # what the administrator looks at
    assert entry.queue_id in listing and reason in listing
    wait_log(mta, rf":{filter_port}, .*dsn=4\.\d+\.\d+, status=deferred \(.*\b4\d\d ", 1)
    assert sink.messages() == []
    assert "downstream unavailable" in broken.log

    # dkproxy comes back with a working relay on the same port; the administrator flushes.
    broken.stop()
    dkproxy("out", sign_args(signing_key), f"{LOOPBACK}:{reinject}", port=filter_port)
    mta.flush()
    (msg,) = sink.wait_for(1, timeout=30)
    assert_signed_in_between(fields_above(msg.data, data))
    assert_signed_by_dkproxy([msg.data], dns_server)
    mta.wait_queue(lambda q: not q)
    assert len(sink.messages()) == 1


# --------------------------------------------------------------------------------------------
# inbound


def auth_results(data: bytes) -> dict[str, list[authres.core.AuthenticationResult]]:
    """Our Authentication-Results field (authserv-id AUTHSERV, exactly one), by method."""
    head = data.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    ours = []
    for name, raw in parse_fields(head):
        if name == "authentication-results":
            parsed = authres.AuthenticationResultsHeader.parse(raw.decode("utf-8"))
            if parsed.authserv_id == AUTHSERV:
                ours.append(parsed)
    assert len(ours) == 1, head.decode("utf-8", "replace")
    by_method: dict[str, list[authres.core.AuthenticationResult]] = {}
    for result in ours[0].results:
        by_method.setdefault(result.method, []).append(result)
    return by_method


def props(result: authres.core.AuthenticationResult) -> dict[tuple[str, str], str]:
    return {(p.type, p.name): p.value for p in result.properties}


def test_inbound_verification_through_postfix(
    recipe: Callable[..., Recipe],
    dkproxy: Callable[..., ProxyProcess],
    signing_key: str,
    dns_server: DNSServer,
) -> None:
    verify_args = [f"--hostname={AUTHSERV}", f"--dns_server={dns_server.address}"]
    public, filter_port, _, sink, _, mta = recipe(inbound_services, "in", verify_args)
    # An independent signer (Perl Mail::DKIM: DKIM, then DomainKeys over it) ...
    by_perl = message("perl-signed", b"Signed by Mail::DKIM.\r\n")
    by_perl = sign_mail_dkim(by_perl, signing_key, DOMAIN, SELECTOR)
    by_perl = sign_mail_dkim(by_perl, signing_key, DOMAIN, SELECTOR, kind="domainkeys")
    submit(public, by_perl)
    # ... our own outbound proxy, sending straight to the inbound MX ...
    ours = message("dkproxy-signed", b"Signed by dkproxy out.\r\n")
    signer = dkproxy("out", sign_args(signing_key), f"{LOOPBACK}:{public}")
    submit(signer.port, ours)
    # ... and no signature at all.
    unsigned = message("unsigned", b"Nobody signed this.\r\n")
    submit(public, unsigned)

    arrived = by_subject(sink.wait_for(3, timeout=40))
    assert set(arrived) == {"perl-signed", "dkproxy-signed", "unsigned"}
    for subject in ("perl-signed", "dkproxy-signed"):
        results = auth_results(arrived[subject].data)
        (dkim,) = results["dkim"]
        (domainkeys,) = results["domainkeys"]
        assert (dkim.result, domainkeys.result) == ("pass", "pass"), subject
        assert props(dkim)[("header", "d")] == DOMAIN
        assert props(dkim)[("header", "s")] == SELECTOR
        assert props(domainkeys)[("header", "d")] == DOMAIN
    results = auth_results(arrived["unsigned"].data)
    assert [r.result for r in results["dkim"]] == ["none"]
    assert [r.result for r in results["domainkeys"]] == ["none"]

    # Only Authentication-Results is added between the two Received fields.
    for subject, original in (("perl-signed", by_perl), ("unsigned", unsigned)):
        names = [name for name, _ in fields_above(arrived[subject].data, original)]
        assert names == ["received", "authentication-results", "received"], names
    added = [name for name, _ in fields_above(arrived["dkproxy-signed"].data, ours)]
    assert added[:3] == ["received", "authentication-results", "received"], added
    assert sorted(added[3:]) == ["dkim-signature", "domainkey-signature"], added

    wait_log(mta, sent_to(filter_port), 3)
    wait_log(mta, sent_to(sink.port), 3)
    mta.wait_queue(lambda q: not q)


# --------------------------------------------------------------------------------------------
# outbound: locally submitted mail (sendmail, cron) through pickup


def local_services(submission: int, filter_port: int, reinject: int) -> str:
    """postfix-master-out.cf plus postfix-master-out-local.cf (pickup's content_filter)."""
    local = adapt_master_cf(
        (CONF / "postfix-master-out-local.cf").read_text(encoding="utf-8"),
        ports={10027: filter_port},
    )
    return outbound_services(submission, filter_port, reinject) + local


def test_locally_submitted_mail_is_signed_via_pickup(
    recipe: Callable[..., Recipe], signing_key: str, dns_server: DNSServer
) -> None:
    submission, filter_port, _, sink, _, mta = recipe(local_services, "out", sign_args(signing_key))
    # What cron or a script hands to sendmail: LF line ends, no Date or Message-ID of its own.
    cron = b"From: Cron Daemon <alice@example.org>\nTo: bob@example.net\nSubject: cron\n\nok\n"
    script = message("script", b"Report from a script.\r\n").replace(b"\r\n", b"\n")
    mta.sendmail(SENDER, [RCPT], cron)
    mta.sendmail(SENDER, [RCPT], script)
    submit(submission, message("smtp", b"And one over SMTP.\r\n"))  # the SMTP path still works

    arrived = by_subject(sink.wait_for(3, timeout=60))
    assert set(arrived) == {"cron", "script", "smtp"}
    assert_signed_by_dkproxy([msg.data for msg in arrived.values()], dns_server)
    # The script's message arrives as written (in CRLF form) below the fields added.
    added = fields_above(arrived["script"].data, script.replace(b"\n", b"\r\n"))
    names = [name for name, _ in added]
    assert names[0] == "received" and names[-1] == "received", names
    assert sorted(names[1:3]) == ["dkim-signature", "domainkey-signature"], names
    assert b"from userid 0" in added[-1][1]  # pickup's Received: signed, then re-injected
    wait_log(mta, sent_to(filter_port), 3)
    mta.wait_queue(lambda queue: not queue)


# --------------------------------------------------------------------------------------------
# before-queue (smtpd_proxy_filter): outbound on submission, inbound on port 25

OUT_PROXY_CF = "postfix-master-out-proxy.cf"
IN_PROXY_CF = "postfix-master-in-proxy.cf"


def test_outbound_before_queue_signs_on_the_way_into_the_queue(
    recipe: Callable[..., Recipe], signing_key: str, dns_server: DNSServer
) -> None:
    submission, filter_port, _, sink, signer, mta = recipe(
        partial(outbound_services, snippet=OUT_PROXY_CF), "out", sign_args(signing_key)
    )
    eight_bit = "Grüße aus Köln\r\n.leading dot\r\n".encode()
    cases = {
        "plain": (message("plain", b"Hello Bob.\r\n"), ()),
        "eight-bit": (
            message(
                "eight-bit",
                eight_bit,
                "MIME-Version: 1.0",
                "Content-Type: text/plain; charset=utf-8",
                "Content-Transfer-Encoding: 8bit",
            ),
            ("BODY=8BITMIME",),
        ),
        "attachment": (attachment_message("attachment", 512 * 1024), ()),
    }
    for data, options in cases.values():
        submit(submission, data, options)
    arrived = by_subject(sink.wait_for(len(cases), timeout=60))
    for subject, (data, _) in cases.items():
        # Signed between the submission smtpd's Received (below) and the queueing smtpd's.
        assert_signed_in_between(fields_above(arrived[subject].data, data))
    assert "BODY=8BITMIME" in arrived["eight-bit"].mail_params  # untouched, as with a milter
    assert_signed_by_dkproxy([msg.data for msg in arrived.values()], dns_server)
    # Queued once per message: one queue ID each, no second pass through a content filter.
    log = wait_log(mta, sent_to(sink.port), len(cases))
    assert len(re.findall(r"qmgr\[\d+\]: \w+: from=<alice@example\.org>", log)) == len(cases)
    assert not re.search(sent_to(filter_port), log)  # nothing was delivered *to* dkproxy
    assert len(re.findall(r"rcpts=1 .* signed=", signer.log)) == len(cases)

    # Several recipients (speed_adjust replays them all through dkproxy at the end of DATA):
    # one signed copy for all of them.
    many = [RCPT, "carol@example.net", "dave@example.net"]
    with smtplib.SMTP(LOOPBACK, submission, local_hostname=CLIENT_HELO, timeout=60) as client:
        assert client.sendmail(SENDER, many, message("three", b"To three.\r\n")) == {}
    three = by_subject(sink.wait_for(len(cases) + 1, timeout=60))["three"]
    assert [arg.strip("<>").split(">")[0] for arg in three.rcpt_args] == many, three.rcpt_args
    assert_signed_by_dkproxy([three.data], dns_server)

    # dkproxy down: the client is told to come back later; nothing is queued unsigned.
    # (With speed_adjust Postfix opens the proxy session once it has the whole message, so
    # the 4xx answers the end of DATA; it tells the postmaster, whose notice goes to the sink.)
    signer.stop()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        submit(submission, message("while-down", b"Must not be queued unsigned.\r\n"))
    assert 400 <= refused.value.smtp_code < 500, refused.value
    time.sleep(1)
    assert mta.queue() == []
    assert "while-down" not in {msg.header("Subject") for msg in sink.messages()}


def test_inbound_before_queue_rejects_at_smtp_time(
    recipe: Callable[..., Recipe], signing_key: str, clean_dns: DNSServer
) -> None:
    strict = "strict.example"
    clean_dns.publish({f"_dmarc.{strict}": ["v=DMARC1; p=reject"], strict: ["v=spf1 -all"]})
    verify_args = [f"--hostname={AUTHSERV}", f"--dns_server={clean_dns.address}",
                   "--reject_fail"]  # fmt: skip
    public, _, _, sink, verifier, mta = recipe(
        partial(inbound_services, snippet=IN_PROXY_CF), "in", verify_args
    )
    good = message("perl-signed", b"Signed by Mail::DKIM.\r\n")
    good = sign_mail_dkim(good, signing_key, DOMAIN, SELECTOR)
    submit(public, good)
    # From a domain whose DMARC record says p=reject, unsigned and failing SPF: refused
    # inside the SMTP session, with dkproxy's answer to the end of DATA.
    for number, (author, envelope) in enumerate(
        [(f"mallory@{strict}", f"mallory@{strict}"), (f"ceo@{strict}", "bounce@elsewhere.test")]
    ):
        forged = message(f"forged-{number}", b"Pay this invoice.\r\n").replace(
            f"<{SENDER}>".encode(), f"<{author}>".encode()
        )
        with (
            smtplib.SMTP(LOOPBACK, public, local_hostname=CLIENT_HELO, timeout=60) as client,
            pytest.raises(smtplib.SMTPDataError) as rejected,
        ):
            client.sendmail(envelope, [RCPT], forged)
        assert rejected.value.smtp_code == 550, rejected.value
        assert b"5.7.1" in rejected.value.smtp_error, rejected.value

    (msg,) = sink.wait_for(1, timeout=40)
    results = auth_results(msg.data)
    assert [r.result for r in results["dkim"]] == ["pass"]
    names = [name for name, _ in fields_above(msg.data, good)]
    assert names == ["received", "authentication-results", "received"], names
    log = wait_log(mta, r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 ", 2)
    assert "bounce" not in log.lower().replace("bounce@elsewhere.test", "")
    assert len(re.findall(r"dmarc=fail", verifier.log)) == 2
    time.sleep(1)
    assert mta.queue() == []  # nothing accepted, so nothing to bounce later
    assert len(sink.messages()) == 1

"""`dkproxy in` started as root with `user nobody`: every lazily loaded piece of the verifier
(public suffix list, IDNA tables, codecs) is loaded before privileges are dropped.

On this machine (as on many hosts) the Python that runs dkproxy lives where `nobody` cannot read
(pyenv under /root), so anything first imported or read after the drop fails; the daemon used
to answer 451 to every message because the public suffix list was first read then.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess
from tests.support.sink import CaptureServer
from tests.support.testkeys import KeySet, dns_record
from tests.support.verifiers import sign_mail_dkim
from tests.test_inbound import ar_results, send, start_inbound

MESSAGE = (
    "From: Jörg <joerg@exämple.org>\r\n"
    "To: bob@example.net\r\n"
    "Subject: privileges\r\n"
    "Message-ID: <priv-1@example.org>\r\n"
    "\r\n"
    "Hello Bob.\r\n"
).encode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_inbound_as_root_with_user_nobody_gives_verdicts(
    tmp_path: Path, key_dir: KeySet, dns_server: DNSServer
) -> None:
    key = str(key_dir / "rsa2048-pkcs1.pem")
    dns_server.publish({
        "priv._domainkey.xn--exmple-cua.org": [dns_record(key)],
        "_dmarc.xn--exmple-cua.org": ["v=DMARC1; p=reject"],
        "_dmarc.example.com": ["v=DMARC1; p=reject"],
    })  # fmt: skip
    tmp_path.chmod(0o755)
    signed = sign_mail_dkim(MESSAGE, key, "xn--exmple-cua.org", "priv")
    # A display name in a charset nothing has decoded yet (its codec loads on first use).
    unsigned = MESSAGE.replace(
        "Jörg <joerg@exämple.org>".encode(), b"=?iso-2022-jp?B?GyRCJUYlOSVIGyhC?= <a@EXAMPLE.com.>"
    )
    try:
        with CaptureServer() as capture:
            proxy = start_inbound(
                tmp_path, capture.address, dns_server, "user nobody", "reject_fail"
            )
            try:
                code, text = send(proxy, signed)
                assert code == 250, (code, text, proxy.log)
                code, text = send(proxy, unsigned, xforward="ADDR=198.51.100.9")
                assert code == 550 and "DMARC" in text, (code, text)
            finally:
                proxy.stop()
            assert "running as uid 65534" in proxy.log
            assert "Traceback" not in proxy.log and "internal" not in proxy.log.lower()
            (tx,) = capture.messages
            assert tx.data is not None
            results = ar_results(tx.data)
            assert [r.result for r in results["dkim"]] == ["pass"]
            assert [r.result for r in results["dmarc"]] == ["pass"]
    finally:
        dns_server.unpublish(
            "priv._domainkey.xn--exmple-cua.org", "_dmarc.xn--exmple-cua.org",
            "_dmarc.example.com",
        )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")
def test_outbound_as_root_with_user_nobody_signs(key_dir: KeySet) -> None:
    key = str(key_dir / "rsa2048-pkcs1.pem")
    message = MESSAGE.replace(b"Subject: privileges", b"Subject: =?koi8-r?B?8NLJ18XU?=")
    with CaptureServer() as capture:
        args = [f"--keyfile={key}", "--selector=priv", "--domain=exämple.org", "--user=nobody"]
        with ProxyProcess("out", args, capture.address) as proxy:
            code, text = send(proxy, message, sender="joerg@xn--exmple-cua.org")
            assert code == 250, (code, text, proxy.log)
        assert "running as uid 65534" in proxy.log and "Traceback" not in proxy.log
        (tx,) = capture.messages
        assert tx.data is not None and tx.data.endswith(message)
        assert tx.data.startswith(b"DKIM-Signature:") and b"d=xn--exmple-cua.org" in tx.data

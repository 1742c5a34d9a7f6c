"""The Prometheus endpoint of a running daemon with two workers counts exactly what was sent.

Messages of known outcomes go through the real daemon (`dkproxy out` / `dkproxy in`, two
worker processes sharing the socket, so the counters must be summed across processes); the
scrape, parsed with prometheus-client's own parser, must match the messages one for one.
"""

from __future__ import annotations

import smtplib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess, run_dkproxy
from tests.support.sink import SmtpSink
from tests.support.testkeys import KeySet, dns_record
from tests.support.tools import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode("utf-8")


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def message(sender: str | None, subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    head = [f"From: <{sender}>"] if sender else []
    head += ["To: <bob@example.net>", f"Subject: {subject}", f"Message-ID: <{subject}@test>"]
    return "".join(f"{line}\r\n" for line in head).encode() + b"\r\n" + body


def send(proxy: ProxyProcess, data: bytes) -> int:
    """One message in its own session; the reply code to the end of DATA (or to MAIL)."""
    with proxy.smtp() as client:
        client.ehlo("client.example.org")
        try:
            client.sendmail("alice@example.org", ["bob@example.net"], data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code
        except smtplib.SMTPSenderRefused as exc:
            return exc.smtp_code
    return 250


@pytest.fixture
def metrics_port() -> Iterator[int]:
    yield free_port()


def test_metrics_off_by_default(smtp_sink: type[SmtpSink], key_dir: KeySet) -> None:
    sink = smtp_sink()
    args = [f"--keyfile={key_dir.rsa2048.path}", "--selector=s", "--domain=example.org"]
    with ProxyProcess("out", [*args, "--workers=1"], relay=sink.address) as proxy:
        assert send(proxy, message("alice@example.org", "one")) == 250
    assert "metrics" not in proxy.log
    assert "PROMETHEUS" not in proxy.log


def test_outbound_counters_match_the_messages_sent(
    smtp_sink: type[SmtpSink], key_dir: KeySet, metrics_port: int, tmp_path: Path
) -> None:
    sink = smtp_sink()
    args = [
        f"--keyfile={key_dir.rsa2048.path}",
        "--selector=sel2048",
        "--domain=example.org,example.com",
        "--signature=dkim(c=relaxed)",
        "--signature=domainkeys(c=nofws)",
        "--workers=2",
        "--max_message_size=20000",
        f"--metrics=127.0.0.1:{metrics_port}",
    ]
    # Known outcomes, in an interleaved order so that both workers see several kinds.
    plan = (
        ["signed"] * 7 + ["not_configured"] * 3 + ["no_from"] * 2 + ["too_big"] * 2
    ) * 2  # fmt: skip
    with ProxyProcess("out", args, relay=sink.address, env={"TMPDIR": str(tmp_path)}) as proxy:
        assert "metrics on http://127.0.0.1:" in proxy.log
        # The workers' files live in one private directory under $TMPDIR ...
        (directory,) = tmp_path.glob("dkproxy-metrics-*")
        assert directory.stat().st_mode & 0o777 == 0o700
        before = samples(scrape(metrics_port))
        assert value(before, "dkproxy_messages_total", outcome="signed") == 0
        assert value(before, "dkproxy_sessions_open") == 0
        sizes = []
        for number, kind in enumerate(plan):
            if kind == "signed":
                data = message("alice@example.org", f"m{number}")
            elif kind == "not_configured":
                data = message("carol@elsewhere.test", f"m{number}")
            elif kind == "no_from":
                data = message(None, f"m{number}")
            else:
                data = message("alice@example.org", f"m{number}", b"x" * 76 + b"\r\n") * 300
            code = send(proxy, data)
            assert code == (552 if kind == "too_big" else 250), (kind, code)
            if kind != "too_big":
                sizes.append(len(data))
        found = samples(scrape(metrics_port))
        # Both workers served (the sums below cover more than one process's files).
        pids = {line.split("[", 1)[1].split("]", 1)[0] for line in proxy.log.splitlines()
                if "rcpts=1" in line}  # fmt: skip
    assert len(pids) == 2, proxy.log
    assert not directory.exists()  # ... removed when the daemon exits
    assert len(sink.wait_for(len(sizes), timeout=30)) == len(sizes)

    assert value(found, "dkproxy_messages_total", outcome="signed") == 14
    assert value(found, "dkproxy_messages_total", outcome="unsigned") == 10
    assert value(found, "dkproxy_messages_total", outcome="rejected") == 4
    assert value(found, "dkproxy_messages_total", outcome="tempfailed") == 0
    assert value(found, "dkproxy_unsigned_total", reason="not_configured") == 6
    assert value(found, "dkproxy_unsigned_total", reason="no_from") == 4
    assert value(found, "dkproxy_unsigned_total", reason="signing_error") == 0
    signatures = {
        (dict(labels)["domain"], dict(labels)["algorithm"]): count
        for (name, labels), count in found.items()
        if name == "dkproxy_signatures_total"
    }
    assert signatures == {("example.org", "rsa-sha256"): 14, ("example.org", "rsa-sha1"): 14}
    assert value(found, "dkproxy_sessions_total") == len(plan)
    assert value(found, "dkproxy_sessions_open") == 0
    assert value(found, "dkproxy_processing_seconds_count") == len(plan)
    assert value(found, "dkproxy_message_size_bytes_count") == len(sizes)
    assert value(found, "dkproxy_message_size_bytes_sum") == sum(sizes)
    assert value(found, "dkproxy_downstream_errors_total", kind="connect") == 0


def test_sessions_open_and_downstream_errors(
    smtp_sink: type[SmtpSink], key_dir: KeySet, metrics_port: int
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    args = [
        f"--keyfile={key_dir.rsa2048.path}",
        "--selector=sel2048",
        "--domain=example.org",
        "--workers=2",
        f"--metrics={metrics_port}",  # a bare port: loopback
    ]
    with ProxyProcess("out", args, relay=dead) as proxy:
        for _ in range(3):
            with pytest.raises(smtplib.SMTPConnectError):
                proxy.smtp()
        found = samples(scrape(metrics_port))
    assert value(found, "dkproxy_downstream_errors_total", kind="connect") == 3
    assert value(found, "dkproxy_sessions_total") == 3

    sink = smtp_sink()
    with ProxyProcess("out", args, relay=sink.address) as proxy:
        clients = [proxy.smtp() for _ in range(4)]
        for client in clients:
            client.ehlo("client.example.org")  # the session is being served by now
        assert value(samples(scrape(metrics_port)), "dkproxy_sessions_open") == 4
        for client in clients[:3]:
            client.quit()
        deadline = time.monotonic() + 10
        while value(samples(scrape(metrics_port)), "dkproxy_sessions_open") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        clients[3].quit()


def test_inbound_verdicts_and_dns_counters(
    smtp_sink: type[SmtpSink], key_dir: KeySet, clean_dns: DNSServer, metrics_port: int
) -> None:
    clean_dns.publish({"metrics._domainkey.example.org": [dns_record(key_dir.rsa2048.path)]})
    with open(key_dir.rsa2048.path, "rb") as handle:
        private = handle.read()

    def signed(subject: str) -> bytes:
        data = message("alice@example.org", subject)
        signature = dkim.sign(data, b"metrics", b"example.org", private, linesep=b"\r\n")
        return signature + data

    sink = smtp_sink()
    args = [
        "--hostname=mx.example.net",
        f"--dns_server={clean_dns.address}",
        "--no-spf",
        "--no-dmarc",
        "--workers=2",
        f"--metrics=127.0.0.1:{metrics_port}",
    ]
    with ProxyProcess("in", args, relay=sink.address) as proxy:
        for number in range(6):
            assert send(proxy, signed(f"pass{number}")) == 250
        for number in range(3):
            broken = signed(f"fail{number}").replace(b"Hello.", b"Hallo.")
            assert send(proxy, broken) == 250
        for number in range(4):
            assert send(proxy, message("alice@example.org", f"none{number}")) == 250
        found = samples(scrape(metrics_port))
    assert len(sink.wait_for(13, timeout=30)) == 13
    assert value(found, "dkproxy_messages_total", outcome="verified") == 13
    assert value(found, "dkproxy_verify_results_total", method="dkim", result="pass") == 6
    assert value(found, "dkproxy_verify_results_total", method="dkim", result="fail") == 3
    assert value(found, "dkproxy_verify_results_total", method="dkim", result="none") == 4
    assert value(found, "dkproxy_verify_results_total", method="domainkeys", result="none") == 13
    assert not [key for key in found if key[0] == "dkproxy_verify_results_total"
                and dict(key[1])["method"] in ("spf", "dmarc")]  # fmt: skip
    # Nine signed messages need the key record; the seven without a passing signature also
    # need the DomainKeys policy of example.org. Two names: at most one query per name and
    # worker goes out, the rest come from the cache.
    lookups = value(found, "dkproxy_dns_lookups_total")
    hits = value(found, "dkproxy_dns_cache_hits_total")
    assert 2 <= lookups <= 4 and lookups + hits == 9 + 7, (lookups, hits)


def test_metrics_option_in_both_config_formats(tmp_path: pytest.TempPathFactory) -> None:
    conf = tmp_path / "dkimproxy_in.conf"  # type: ignore[operator]
    conf.write_text("listen 127.0.0.1:10025\nrelay 127.0.0.1:10026\nmetrics 127.0.0.1:9120\n")
    toml = tmp_path / "in.toml"  # type: ignore[operator]
    toml.write_text('mode = "in"\nmetrics = "[::1]:9121"\n')
    bad = tmp_path / "bad.conf"  # type: ignore[operator]
    bad.write_text("listen 127.0.0.1:10025\nmetrics 127.0.0.1:99999\n")
    from dkproxy import config

    assert str(config.parse_proxy_command("in", [f"--conf_file={conf}"]).metrics) == (
        "127.0.0.1:9120"
    )
    assert str(config.parse_proxy_command("in", ["-c", str(toml)]).metrics) == "[::1]:9121"
    assert config.parse_proxy_command("in", ["--metrics=9122"]).metrics.port == 9122  # type: ignore[union-attr]
    assert config.parse_proxy_command("in", ["--metrics=9122"]).metrics.host == "127.0.0.1"  # type: ignore[union-attr]
    assert config.parse_proxy_command("in", []).metrics is None
    proc = run_dkproxy("in", f"--conf_file={bad}")
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "99999" in proc.stderr


def test_metrics_port_in_use_stops_the_start(key_dir: KeySet) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = run_dkproxy(
            "out", f"--keyfile={key_dir.rsa2048.path}", "--selector=s", "--domain=example.org",
            f"--metrics=127.0.0.1:{port}", f"127.0.0.1:{free_port()}", "127.0.0.1:25",
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr

"""Shared fixtures: one NSD for the session, session keys, SMTP sink factories.

Heavy things start lazily, on first use by a test, never at import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.support.dnsserver import DNSServer
from tests.support.sink import CaptureServer, SmtpSink
from tests.support.testkeys import KeySet, make_key_set

# Property tests: a few hundred examples per property in the default suite (fast, random
# each run, so CI keeps exploring); `./dev fuzz` selects the "fuzz" profile, which runs many
# more, bounded in time by the dev script. Deadlines are off: the machine is shared and some
# properties talk to a running daemon or to Perl.
settings.register_profile(
    "default",
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("fuzz", parent=settings.get_profile("default"), max_examples=5000)
settings.load_profile("default")


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DNSServer]:
    """NSD on 127.0.0.1:<port>, shared by the session; publish with unique names per test,
    or use the `clean_dns` fixture, which also undoes a test's changes."""
    server = DNSServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def clean_dns(dns_server: DNSServer) -> Iterator[DNSServer]:
    """The session DNS server, with whatever the test published removed afterwards."""
    state = dns_server.snapshot()
    try:
        yield dns_server
    finally:
        dns_server.restore(state)


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    """Session keys: rsa2048 (selector sel2048), rsa1024 (sel1024), ed25519 (seled), rsa512
    (sel512, for "too short" tests), rsa2048_pkcs1 (selpkcs1, "BEGIN RSA PRIVATE KEY").

    Files: rsa2048.pem, rsa1024.pem, ed25519.pem, rsa512.pem, rsa2048-pkcs1.pem; the object
    is path-like (os.fspath, `key_dir / "rsa2048.pem"`).
    """
    return make_key_set(str(tmp_path_factory.mktemp("keys")))


@pytest.fixture
def smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    """Factory: `smtp_sink(**options)` starts a Postfix smtp-sink; stopped at teardown."""
    started: list[SmtpSink] = []

    def factory(**options: Any) -> SmtpSink:
        sink = SmtpSink(**options).start()
        started.append(sink)
        return sink

    yield factory
    for sink in started:
        sink.stop()


@pytest.fixture
def capture_server() -> Iterator[Callable[..., CaptureServer]]:
    """Factory: `capture_server(**options)` starts a byte-exact CaptureServer; stopped at
    teardown."""
    started: list[CaptureServer] = []

    def factory(**options: Any) -> CaptureServer:
        server = CaptureServer(**options).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()

"""`./dev demo` (the README's first command): `dkproxy demo` signs one message three ways
through the real outbound proxy and verifies every signature; a verdict that fails is shown
as a failure, never as "signing works"."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from dkproxy.mailauth.keys import load_signing_key
from dkproxy.tools import demo
from tests.support.proxy import ROOT
from tests.test_service import dkproxy_program

EXPECTED_VERDICTS = [
    "domainkeys=pass header.d=example.com header.s=demo",
    "dkim=pass header.d=example.com header.s=demo header.a=rsa-sha256",
    "dkim=pass header.d=example.com header.s=demo-ed header.a=ed25519-sha256",
]


def test_demo_reports_all_three_signatures_verified() -> None:
    """What `./dev demo` runs once the virtualenv exists: the `dkproxy demo` entry point."""
    proc = subprocess.run(
        [dkproxy_program(), "demo"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("$ dkproxy out --keyfile=")
    assert "\nproxy answered: 250 " in out
    delivered = out.split("---- message as delivered downstream", 1)[1].split("\n-----", 1)[0]
    assert len(re.findall(r"^DKIM-Signature:", delivered, re.MULTILINE)) == 2
    assert len(re.findall(r"^DomainKey-Signature:", delivered, re.MULTILINE)) == 1
    assert "\n..a line that starts" not in delivered  # dot-stuffing undone on the way
    assert "\n.a line that starts with a dot survives dot-stuffing." in delivered
    verdicts = [line for line in out.splitlines() if re.match(r"(dkim|domainkeys)=", line)]
    assert verdicts == EXPECTED_VERDICTS
    assert out.rstrip().endswith("all 3 signatures verify: signing works.")
    # The daemon's own log line for the message (stderr) names the three signatures.
    assert "signed=dkim(d=example.com,s=demo,a=rsa-sha256)," in proc.stderr


@pytest.mark.parametrize(
    ("original", "changed", "unpublished"),
    [
        (b"Hello Bob,", b"Hello Eve,", None),  # the body: every body hash fails
        (b"Subject: dkproxy demo", b"Subject: dkproxy demo!", None),  # a signed field
        (None, None, "demo-ed"),  # no key published for one selector
    ],
    ids=["body", "subject", "unpublished-key"],
)
def test_demo_says_failed_when_a_signature_does_not_verify(
    original: bytes | None,
    changed: bytes | None,
    unpublished: str | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's verdict is the verifier's: on the message the demo produced, changed after
    signing or missing a key, it says FAILED and returns 1."""
    assert asyncio.run(demo._run(tmp_path)) == 0  # keeps its keys in tmp_path
    out = capsys.readouterr().out
    text = out.split("---- message as delivered downstream " + "-" * 30 + "\n", 1)[1]
    delivered = text.split("\n" + "-" * 67 + "\n", 1)[0].replace("\n", "\r\n").encode()
    records = {
        f"{selector}._domainkey.example.com.": load_signing_key(str(tmp_path / name)).dns_record
        for selector, name in (("demo", "rsa.key"), ("demo-ed", "ed25519.key"))
    }
    assert demo._verify(delivered, records) == 0  # as printed, it verifies
    capsys.readouterr()
    if original is not None and changed is not None:
        assert original in delivered
        delivered = delivered.replace(original, changed)
    if unpublished is not None:
        del records[f"{unpublished}._domainkey.example.com."]
    assert demo._verify(delivered, records) == 1
    shown = capsys.readouterr().out
    assert "signature verification FAILED" in shown
    assert "signing works" not in shown

"""Members of issue 16's kinds replayed beyond the ones the issue names (red-team review).

Each test is one more member of a kind: IDN in every configured identifier, full stops other
than "." in a domain, and (with hypothesis) arbitrary From/Sender values that must give a
verdict rather than an exception in the policy and the verifier.
"""

from __future__ import annotations

import pytest

from dkproxy import config
from dkproxy.addresses import canonical_domain, parse_mailboxes
from dkproxy.signer import OutboundSigner
from tests.support.testkeys import make_rsa_key

UMESSAGE = "From: Jörg <jörg@Exämple.org>\r\nSubject: idn\r\n\r\nbody\r\n".encode()


@pytest.fixture(scope="module")
def rsa_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("replayed") / "key.pem"))


def _signer(*args: str) -> OutboundSigner:
    cfg = config.parse_proxy_command("out", [*args, "127.0.0.1:1", "127.0.0.1:2"])
    return OutboundSigner.from_config(cfg)  # type: ignore[arg-type]


def _dkim_tags(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    field = head.split("DKIM-Signature:", 1)[1]
    field = field.split("\r\n")[0] + "".join(
        line for line in field.split("\r\n")[1:] if line[:1] in (" ", "\t")
    )
    tags = (t.strip().split("=", 1) for t in field.replace("\t", "").split(";") if "=" in t)
    return {k.strip(): v.replace(" ", "") for k, v in tags}


@pytest.mark.parametrize(
    "option",
    [
        "--identity=@exämple.org",
        "--identity=@EXÄMPLE.ORG.",
        "--signature=dkim(i=@exämple.org)",
        "--signature=dkim(i=joe@Mail.Exämple.org.)",
        "--signature=dkim(d=exämple.org,i=@xn--exmple-cua.org)",
    ],
)
def test_u_label_identity_is_accepted_and_signed_in_a_labels(rsa_key: str, option: str) -> None:
    signer = _signer(f"--keyfile={rsa_key}", "--selector=s", "--domain=exämple.org", option)
    outcome = signer.sign(UMESSAGE)
    assert outcome.prepend, outcome.summary
    tags = _dkim_tags(b"".join(outcome.prepend) + UMESSAGE)
    assert tags["d"] == "xn--exmple-cua.org"
    assert tags["i"].rpartition("@")[2] in ("xn--exmple-cua.org", "mail.xn--exmple-cua.org")
    assert tags["i"].isascii()


@pytest.mark.parametrize("stop", ["\u3002", "\uff0e", "\uff61"])
def test_other_full_stops_and_a_root_dot_in_them(stop: str) -> None:
    # UTS 46 maps these to "."; written last they are the root dot, which is dropped.
    assert canonical_domain(f"exämple{stop}org") == "xn--exmple-cua.org"
    assert canonical_domain(f"exämple{stop}org{stop}") == "xn--exmple-cua.org"
    found = parse_mailboxes(f"Jörg <joerg@EXÄMPLE{stop}org{stop}>")
    assert found.domains == ["xn--exmple-cua.org"], found.problems

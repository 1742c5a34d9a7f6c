"""Key selection: which signatures a message gets, and start-up checks of keys and maps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkproxy.config import ConfigError, OutboundConfig, load_config_file, parse_proxy_command
from dkproxy.mailauth.keys import KeyCache
from dkproxy.mailauth.message import Address, Message
from dkproxy.policy import Selection, SigningPolicy

#: A throw-away 512-bit RSA key (cryptography refuses to generate one): signing with it must
#: be refused at start-up (RFC 8301).
RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVAIBADANBgkqhkiG9w0BAQEFAASCAT4wggE6AgEAAkEA1XxEUgZGpCuTNjCU
nk4NX6yuSaeG3ucm4hEehUgDTZJF+ohz3X2N+IPpL2Or0n1lOPcqi0m5SUBz+xJI
yVAmjQIDAQABAkBLktIct1wKgeJ7LHdwEvFpDRglushj4DBDlwvW4sdIjfle3r1w
9EzKbGqGFNswaDVodRCiFk5asfxFT2QzDlgBAiEA/jLeGLRLsANE0wH8a8wYJdgW
TdhKNgVtFXJeRuljM70CIQDW/4r4eMzngYDixfNrC6eRHVHuc7dMWKevIzvY40CD
EQIhAOjokrbv+6l6VUVBPJdImZeTNlx9IQH+VsSf1eIDVfHBAiAVmI+mC8RRUNHY
dZfQ3dfUHMTZFeiIk7MsRXbCf3lAcQIgZGFtcxfFfrtpiJAxwZ0KnAioQDKuV0V/
AAyUvOzjzG8=
-----END PRIVATE KEY-----
"""


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RSA keys rsa1.key/rsa2.key (1024 bits: fast, and the RFC 8301 minimum), an Ed25519 key."""
    directory = tmp_path_factory.mktemp("keys")
    for name in ("rsa1", "rsa2"):
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    ed = ed25519.Ed25519PrivateKey.generate()
    (directory / "ed.key").write_bytes(
        ed.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "weak.key").write_bytes(RSA_512_PEM)
    (directory / "garbage.key").write_text("this is not a key\n")
    return directory


def policy_from(path: Path, text: str) -> SigningPolicy:
    path.write_text(text)
    cfg = load_config_file(str(path), "out")
    assert isinstance(cfg, OutboundConfig)
    return SigningPolicy.from_config(cfg)


def policy_cli(*argv: str) -> SigningPolicy:
    cfg = parse_proxy_command("out", list(argv))
    assert isinstance(cfg, OutboundConfig)
    return SigningPolicy.from_config(cfg)


def summary(selection: Selection) -> list[tuple[str, str, str]]:
    return [(s.kind, s.domain, s.selector) for s in selection.specs]


def msg(*headers: str) -> Message:
    return Message(("\r\n".join(headers) + "\r\n\r\nbody\r\n").encode())


# --- DKIMproxy's default signatures ---------------------------------------------------------------


def test_dkimproxy_sample_single_domain(tmp_path: Path, keydir: Path) -> None:
    policy = policy_from(
        tmp_path / "dkimproxy_out.conf",
        "listen 127.0.0.1:10027\nrelay 127.0.0.1:10028\ndomain example.org\n"
        "signature dkim(c=relaxed)\nsignature domainkeys(c=nofws)\n"
        f"keyfile {keydir / 'rsa1.key'}\nselector selector1\n",
    )
    own = policy.select(Address("alice", "example.org"), None)
    assert summary(own) == [
        ("dkim", "example.org", "selector1"),
        ("domainkeys", "example.org", "selector1"),
    ]
    dkim, dk = own.specs
    assert (dkim.algorithm, dkim.canonicalization, dkim.key.kind) == (
        "rsa-sha256",
        "relaxed/simple",  # Mail::DKIM reads c=relaxed as relaxed/simple
        "rsa",
    )
    assert (dk.algorithm, dk.canonicalization) == ("rsa-sha1", "nofws")
    assert own.reason is None
    assert dkim.source.endswith("dkimproxy_out.conf:4")

    # One domain signs EVERY message with it (DKIMproxy 1.4); DomainKeys only for own senders.
    foreign = policy.select(Address("bob", "gmail.com"), None)
    assert summary(foreign) == [("dkim", "example.org", "selector1")]
    assert foreign.reason is not None and "DomainKeys requires the sender domain" in foreign.reason
    subdomain = policy.select(Address("carol", "mail.example.org"), None)
    assert [s.kind for s in subdomain.specs] == ["dkim", "domainkeys"]
    nobody = policy.select(None, None)
    assert summary(nobody) == [("dkim", "example.org", "selector1")]


def test_implicit_dkim_signature_when_none_configured(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=postfix", "--domain=example.org"
    )
    selection = policy.select(Address("a", "example.org"), None)
    assert summary(selection) == [("dkim", "example.org", "postfix")]
    assert selection.specs[0].canonicalization == "relaxed/simple"


def test_two_domains_choose_by_sender_with_parent_fallback(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        "--domain=Example.ORG,example.com",
        "--signature=dkim",
        "--signature=domainkeys",
    )
    assert summary(policy.select(Address("a", "example.com"), None))[0][1] == "example.com"
    deep = policy.select(Address("a", "mail.sub.example.org"), None)
    assert summary(deep) == [("dkim", "example.org", "s1"), ("domainkeys", "example.org", "s1")]
    other = policy.select(Address("a", "example.net"), None)
    assert other.specs == ()
    assert other.reason is not None and "not one of the configured domains" in other.reason
    assert "example.org, example.com" in other.reason
    # "notexample.org" is not below example.org.
    assert policy.select(Address("a", "notexample.org"), None).specs == ()
    none = policy.select(None, None)
    assert none.specs == () and "no sender" in (none.reason or "")


def test_sender_header_beats_from(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", "--domain=example.org,example.com"
    )
    message = msg(
        "From: Alice <alice@example.org>",
        "Sender: list-bounces@lists.example.com",
        "Subject: hi",
    )
    selection = policy.select(message.sender(), message.list_id())
    assert summary(selection) == [("dkim", "example.com", "s1")]
    only_from = msg("From: Alice <alice@example.org>", "Subject: hi")
    assert summary(policy.select(only_from.sender(), None)) == [("dkim", "example.org", "s1")]


def test_signature_with_own_domain_needs_no_domain_option(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", "--signature=dkim(d=example.net)"
    )
    assert summary(policy.select(Address("x", "anything.example"), None)) == [
        ("dkim", "example.net", "s1")
    ]


def test_signature_domain_overrides_matched_domain(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        "--domain=a.example,b.example",
        "--signature=dkim(d=signer.example)",
    )
    assert summary(policy.select(Address("x", "b.example"), None)) == [
        ("dkim", "signer.example", "s1")
    ]
    # ...but a sender outside the list still gets nothing (best_domain fails first).
    assert policy.select(Address("x", "c.example"), None).specs == ()


# --- canonicalization, algorithms, headers, identity --------------------------------------------


def test_method_options(keydir: Path) -> None:
    key = f"--keyfile={keydir / 'rsa1.key'}"
    policy = policy_cli(
        key,
        "--selector=s1",
        "--domain=example.org",
        "--method=simple",
        "--signature=dkim",
        "--signature=domainkeys",
    )
    specs = policy.select(Address("a", "example.org"), None).specs
    assert [s.canonicalization for s in specs] == ["simple/simple", "simple"]

    policy = policy_cli(
        key,
        "--selector=s1",
        "--domain=example.org",
        "--dkim_method=relaxed/relaxed",
        "--domainkeys_method=simple",
        "--signature=dkim",
        "--signature=domainkeys(c=nofws)",
    )
    specs = policy.select(Address("a", "example.org"), None).specs
    assert [s.canonicalization for s in specs] == ["relaxed/relaxed", "nofws"]

    # DKIMproxy applies --method to DomainKeys too, where "relaxed" is invalid.
    with pytest.raises(ConfigError) as info:
        policy_cli(
            key,
            "--selector=s1",
            "--domain=example.org",
            "--method=relaxed",
            "--signature=domainkeys",
        )
    assert str(info.value).startswith("command line: --signature: domainkeys:")
    assert "nofws or simple" in str(info.value)


def test_ed25519_key_gets_ed25519_algorithm(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=rsa1",
        "--domain=example.org",
        "--signature=dkim",
        f"--signature=dkim(key={keydir / 'ed.key'},s=ed1)",
    )
    specs = policy.select(Address("a", "example.org"), None).specs
    assert [(s.algorithm, s.key.kind, s.selector) for s in specs] == [
        ("rsa-sha256", "rsa", "rsa1"),
        ("ed25519-sha256", "ed25519", "ed1"),
    ]


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        ("dkim(a=rsa-sha1)", "RFC 8301"),
        ("dkim(key={ed},a=rsa-sha256)", "does not fit the ed25519 key"),
        ("dkim(a=ed25519-sha256)", "does not fit the rsa key"),
        ("domainkeys(key={ed})", "DomainKeys needs an RSA key"),
        ("domainkeys(a=rsa-sha256)", "only supports a=rsa-sha1"),
        ("dkim(h=to:subject)", "h= must include from"),
        ("dkim(i=user@other.example)", "not within d=example.org"),
        ("dkim(d=$keydomain,s=x)", None),
        ("domainkeys(i=@example.org)", "no i= tag"),
    ],
)
def test_signature_errors_at_start_up(
    tmp_path: Path, keydir: Path, signature: str, expected: str | None
) -> None:
    conf = tmp_path / "dkimproxy_out.conf"
    text = (
        f"domain example.org\nkeyfile {keydir / 'rsa1.key'}\nselector s1\n"
        f"signature {signature.format(ed=keydir / 'ed.key')}\n"
    )
    if expected is None:  # valid: $keydomain is the configured domain
        policy = policy_from(conf, text)
        assert summary(policy.select(Address("a", "example.org"), None)) == [
            ("dkim", "example.org", "x")
        ]
        return
    with pytest.raises(ConfigError) as info:
        policy_from(conf, text)
    assert (info.value.source, info.value.line) == (str(conf), 4)
    assert expected in info.value.message


def test_headers_and_identity_are_applied(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        "--domain=example.org",
        "--identity=@example.org",
        "--signature=dkim(h=From:To:Subject)",
        "--signature=dkim(i=bounces@mail.example.org,s=s2)",
    )
    first, second = policy.select(Address("a", "example.org"), None).specs
    assert first.headers == ("from", "to", "subject")
    assert first.identity == "@example.org"  # --identity, as documented by DKIMproxy
    assert second.identity == "bounces@mail.example.org"  # a signature's own i= wins


# --- key and file problems ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyname", "expected"),
    [
        ("missing.key", "cannot read key file"),
        ("garbage.key", "found text that is neither PEM nor base64"),
        ("weak.key", "512 bits"),
        (".", "cannot read key file"),
    ],
)
def test_key_problems_name_the_config_line(
    tmp_path: Path, keydir: Path, keyname: str, expected: str
) -> None:
    conf = tmp_path / "dkimproxy_out.conf"
    conf.write_text(f"domain example.org\nselector s1\n\nkeyfile {keydir / keyname}\n")
    cfg = load_config_file(str(conf))
    assert isinstance(cfg, OutboundConfig)
    with pytest.raises(ConfigError) as info:
        SigningPolicy.from_config(cfg)
    assert (info.value.source, info.value.line) == (str(conf), 4)
    assert str(keydir / keyname) in info.value.message
    assert expected in info.value.message


def test_key_named_by_signature_points_at_that_line(tmp_path: Path, keydir: Path) -> None:
    conf = tmp_path / "dkimproxy_out.conf"
    with pytest.raises(ConfigError) as info:
        policy_from(
            conf,
            f"domain example.org\nselector s1\nkeyfile {keydir / 'rsa1.key'}\n"
            f"signature dkim\nsignature dkim(key={keydir / 'weak.key'},s=old)\n",
        )
    assert info.value.line == 5 and "512 bits" in info.value.message


def test_min_rsa_bits_is_enforced(keydir: Path) -> None:
    with pytest.raises(ConfigError, match="1024 bits; at least 2048"):
        policy_cli(
            f"--keyfile={keydir / 'rsa1.key'}",
            "--selector=s1",
            "--domain=example.org",
            "--min-rsa-bits=2048",
        )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--selector=s1", "--domain=example.org"], "no key file"),
        (["--keyfile={rsa}", "--domain=example.org"], "no selector"),
        (["--keyfile={rsa}", "--selector=s1"], "domain not specified"),
    ],
)
def test_missing_essentials(keydir: Path, argv: list[str], expected: str) -> None:
    args = [a.format(rsa=keydir / "rsa1.key") for a in argv]
    with pytest.raises(ConfigError) as info:
        policy_cli(*args)
    assert expected in str(info.value)


def test_keys_are_loaded_once(tmp_path: Path, keydir: Path) -> None:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text("a.example dkim\nb.example dkim(s=other)\n")
    cfg = parse_proxy_command(
        "out",
        [f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", f"--sender_map={sender_map}"],
    )
    assert isinstance(cfg, OutboundConfig)
    cache = KeyCache()
    policy = SigningPolicy.from_config(cfg, cache)
    first = policy.select(Address("x", "a.example"), None).specs[0]
    second = policy.select(Address("x", "b.example"), None).specs[0]
    assert first.key is second.key


# --- sender_map ---------------------------------------------------------------------------------


@pytest.fixture
def mapped(tmp_path: Path, keydir: Path) -> SigningPolicy:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text(
        "# DKIMproxy's documented example, plus more\n"
        "jason@long.name  dkim(d=example.com)\n"
        "\n"
        "; semicolon comments too\n"
        "widget.example   domainkeys\n"
        "example.org      dkim(c=relaxed,a=rsa-sha256), domainkeys(c=nofws)\n"
        "a.my.example     dkim(key=" + str(keydir / "rsa2.key") + ",s=key1)\n"
        "my.example       dkim(s=key2)\n"
        "Boss@My.Example  dkim(s=boss)\n"
    )
    return policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        f"--sender_map={sender_map}",
        "--domain=fallback.example",
        "--signature=dkim",
    )


def test_sender_map_documented_examples(mapped: SigningPolicy) -> None:
    assert summary(mapped.select(Address("jason", "long.name"), None)) == [
        ("dkim", "example.com", "s1")
    ]
    assert summary(mapped.select(Address("x", "widget.example"), None)) == [
        ("domainkeys", "widget.example", "s1")
    ]
    both = mapped.select(Address("x", "example.org"), None)
    assert [(s.kind, s.domain, s.canonicalization) for s in both.specs] == [
        ("dkim", "example.org", "relaxed/simple"),
        ("domainkeys", "example.org", "nofws"),
    ]
    # "a.my.example -> key1, my.example -> key2; user2@b.my.example -> key2".
    assert summary(mapped.select(Address("user1", "a.my.example"), None)) == [
        ("dkim", "a.my.example", "key1")
    ]
    b_sel = mapped.select(Address("user2", "b.my.example"), None)
    assert summary(b_sel) == [("dkim", "my.example", "key2")]  # d= is the matched key
    assert b_sel.rule is not None and "sender_map my.example" in b_sel.rule


def test_sender_map_address_beats_domain_and_extensions(mapped: SigningPolicy) -> None:
    assert summary(mapped.select(Address("boss", "my.example"), None)) == [
        ("dkim", "my.example", "boss")
    ]
    assert summary(mapped.select(Address("Boss+Travel", "my.example"), None)) == [
        ("dkim", "my.example", "boss")
    ]
    assert summary(mapped.select(Address("jason+lists", "long.name"), None)) == [
        ("dkim", "example.com", "s1")
    ]
    assert summary(mapped.select(Address("clerk", "my.example"), None)) == [
        ("dkim", "my.example", "key2")
    ]


def test_sender_map_miss_falls_back_to_default_signatures(mapped: SigningPolicy) -> None:
    # Single --domain: the default signature applies to every unmatched sender.
    miss = mapped.select(Address("x", "your.example"), None)
    assert summary(miss) == [("dkim", "fallback.example", "s1")]
    assert miss.rule is not None and miss.rule.startswith("default signatures")


def test_sender_map_without_default_signature_leaves_mail_unsigned(
    tmp_path: Path, keydir: Path
) -> None:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text("example.org dkim\n")
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", f"--sender_map={sender_map}"
    )
    selection = policy.select(Address("x", "your.example"), None)
    assert selection.specs == ()
    assert selection.reason == "no signing rule matches sender 'x@your.example'"
    assert policy.select(None, None).reason is not None


def test_sender_map_catch_all_and_dead_entries(tmp_path: Path, keydir: Path) -> None:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text(
        ".example.org dkim\n"  # DKIMproxy never matches this form
        "example.org dkim(s=old)\n"
        "example.org dkim(s=new)\n"  # later line wins (LookupMap hash)
        ". dkim(d=$senderdomain,i=$sender)\n"
    )
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", f"--sender_map={sender_map}"
    )
    assert summary(policy.select(Address("x", "sub.example.org"), None)) == [
        ("dkim", "example.org", "new")
    ]
    anyone = policy.select(Address("x.y", "customer.example"), None)
    assert [(s.domain, s.identity) for s in anyone.specs] == [
        ("customer.example", "x.y@customer.example")
    ]
    # No sender: only the catch-all applies, and its macros cannot be filled.
    nobody = policy.select(None, None)
    assert nobody.specs == () and "needs a sender address" in (nobody.reason or "")
    assert nobody.rule is not None and "catch-all" in nobody.rule
    assert any(f"{sender_map}:1" in w and "never matches" in w for w in policy.warnings)
    assert any(f"{sender_map}:3" in w and "later entry wins" in w for w in policy.warnings)
    assert any("warning:" in line for line in policy.describe())


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (". dkim", "catch-all entry must give d="),
        ("example.org", "has no signature list"),
        ("example.org dkim(c=relaxed", "unbalanced"),
        ("example.org dkim(d=$nope)", "unknown macro $nope"),
        ("example.org dkim(a=rsa-sha1)", "RFC 8301"),
        ("bad..domain dkim", "not an address or domain"),
        ("example.org dkim(key=/nonexistent/x.key)", "cannot read key file"),
    ],
)
def test_sender_map_errors_name_map_file_and_line(
    tmp_path: Path, keydir: Path, line: str, expected: str
) -> None:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text(f"# comment\nother.example dkim\n{line}\n")
    with pytest.raises(ConfigError) as info:
        policy_cli(
            f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", f"--sender_map={sender_map}"
        )
    assert (info.value.source, info.value.line) == (str(sender_map), 3), str(info.value)
    assert expected in info.value.message


def test_missing_map_file_names_the_option(tmp_path: Path, keydir: Path) -> None:
    conf = tmp_path / "dkimproxy_out.conf"
    conf.write_text(f"keyfile {keydir / 'rsa1.key'}\nselector s1\nsender_map {tmp_path / 'nope'}\n")
    cfg = load_config_file(str(conf))
    assert isinstance(cfg, OutboundConfig)
    with pytest.raises(ConfigError) as info:
        SigningPolicy.from_config(cfg)
    assert (info.value.source, info.value.line) == (str(conf), 3)
    assert "sender_map" in info.value.message and "cannot read" in info.value.message


# --- listid_map ---------------------------------------------------------------------------------


@pytest.fixture
def listed(tmp_path: Path, keydir: Path) -> SigningPolicy:
    listid_map = tmp_path / "listid_map"
    listid_map.write_text(
        "kernel.org                   dkim(d=kernel.org)\n"
        "xorg-devel.lists.x.org       dkim(d=lists.x.org)\n"
        "announce.example.org         dkim\n"
        "lists.example.net            dkim(s=lists)\n"
    )
    sender_map = tmp_path / "sender_map"
    sender_map.write_text("example.org dkim(s=sender)\n")
    return policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        f"--listid_map={listid_map}",
        f"--sender_map={sender_map}",
    )


def test_listid_map_beats_sender_map(listed: SigningPolicy) -> None:
    alice = Address("alice", "example.org")
    assert summary(listed.select(alice, "linux-kernel.vger.kernel.org")) == [
        ("dkim", "kernel.org", "s1")
    ]
    assert summary(listed.select(alice, "xorg-devel.lists.x.org")) == [
        ("dkim", "lists.x.org", "s1")
    ]
    # Without d=: a full match signs as the List-Id minus its first label...
    assert summary(listed.select(alice, "announce.example.org")) == [("dkim", "example.org", "s1")]
    # ...and a suffix match as the suffix.
    assert summary(listed.select(alice, "dev.lists.example.net")) == [
        ("dkim", "lists.example.net", "lists")
    ]


def test_listid_map_miss_or_absent_uses_sender_map(listed: SigningPolicy) -> None:
    alice = Address("alice", "example.org")
    assert summary(listed.select(alice, "other.example.com")) == [("dkim", "example.org", "sender")]
    assert summary(listed.select(alice, None)) == [("dkim", "example.org", "sender")]
    message = msg("From: alice@example.org", "List-Id: Kernel list <linux-kernel.vger.kernel.org>")
    assert summary(listed.select(message.sender(), message.list_id())) == [
        ("dkim", "kernel.org", "s1")
    ]


# --- macros and their sanitising --------------------------------------------------------------


@pytest.fixture
def macro_policy(keydir: Path) -> SigningPolicy:
    # DKIMproxy's tests/macros.t set-up.
    return policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        "--method=relaxed",
        "--signature=dkim(d=$senderdomain,i=$sender)",
    )


def test_macros_fill_sender_values(macro_policy: SigningPolicy) -> None:
    (spec,) = macro_policy.select(Address("smith", "foo.domain3.example"), None).specs
    assert (spec.domain, spec.identity) == ("foo.domain3.example", "smith@foo.domain3.example")
    (spec,) = macro_policy.select(Address("jlong", "domain1.example"), None).specs
    assert (spec.domain, spec.identity) == ("domain1.example", "jlong@domain1.example")


def test_macros_take_the_a_label_domain_of_a_utf8_sender(macro_policy: SigningPolicy) -> None:
    sender = msg("From: Jörg <jörg@EXÄMPLE.org>").sender()
    assert sender == Address("jörg", "xn--exmple-cua.org")
    selection = macro_policy.select(sender, None)
    # d= is the A-label; i= cannot carry the UTF-8 local part, so that signature is skipped.
    assert selection.specs == ()
    assert "has characters a DKIM tag cannot carry" in (selection.reason or "")
    (spec,) = macro_policy.select(msg("From: anna@exämple.org").sender(), None).specs
    assert (spec.domain, spec.identity) == ("xn--exmple-cua.org", "anna@xn--exmple-cua.org")


@pytest.mark.parametrize(
    "sender",
    [
        Address("a;b", "example.org"),
        Address("a=b", "example.org"),
        Address("a b", "example.org"),
        Address("a\r\nX-Evil: 1", "example.org"),
        Address('"quoted"', "example.org"),
        Address("a", "example.org; s=evil"),
        Address("a", "exa mple.org"),
        Address("a", "example.org\r\nX-Evil: 1"),
        Address("a", "-bad-.example"),
        Address("a" * 65, "example.org"),
    ],
)
def test_unsafe_sender_values_are_refused(macro_policy: SigningPolicy, sender: Address) -> None:
    selection = macro_policy.select(sender, None)
    assert selection.specs == ()
    assert selection.reason is not None and "skipped" in selection.reason
    assert "\r" not in selection.reason and "\n" not in selection.reason


def test_macro_needs_a_sender(macro_policy: SigningPolicy) -> None:
    selection = macro_policy.select(None, None)
    assert selection.specs == ()
    assert "needs a sender address" in (selection.reason or "")


def test_identity_macro_outside_fixed_domain_is_skipped(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        "--domain=example.org",
        "--signature=dkim(i=$sender)",
        "--signature=dkim(s=s2)",
    )
    own = policy.select(Address("a", "mail.example.org"), None)
    assert [s.identity for s in own.specs] == ["a@mail.example.org", None]
    foreign = policy.select(Address("a", "gmail.com"), None)
    assert [s.selector for s in foreign.specs] == ["s2"]
    assert "not within d=example.org" in (foreign.reason or "")


def test_single_domain_macro(keydir: Path) -> None:
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", "--domain=$senderdomain"
    )
    assert summary(policy.select(Address("a", "b.example"), None)) == [("dkim", "b.example", "s1")]
    keys = policy.signing_keys()
    assert [(d, s) for d, s, _, _ in keys] == [("$senderdomain", "s1")]


def test_key_macro_in_map(tmp_path: Path, keydir: Path) -> None:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text("example.org dkim(d=mail.$key,i=@mail.$keydomain)\n")
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}", "--selector=s1", f"--sender_map={sender_map}"
    )
    (spec,) = policy.select(Address("a", "x.example.org"), None).specs
    assert (spec.domain, spec.identity) == ("mail.example.org", "@mail.example.org")


# --- native TOML rules --------------------------------------------------------------------------


def test_toml_rules(tmp_path: Path, keydir: Path) -> None:
    conf = tmp_path / "out.toml"
    conf.write_text(
        f"""mode = "out"
[defaults]
key = "{keydir / "rsa1.key"}"
selector = "s1"

[[sign]]
match = "example.org"
  [[sign.signature]]
  type = "dkim"

[[sign]]
match = ".example.org"
  [[sign.signature]]
  selector = "sub"

[[sign]]
match = "quiet.example.org"
signature = []

[[sign]]
match = ["*"]
  [[sign.signature]]
  domain = "relay.example"
  key = "{keydir / "ed.key"}"

[[sign]]
match = "list-id:*"
  [[sign.signature]]
  domain = "lists.example"
"""
    )
    cfg = load_config_file(str(conf))
    assert isinstance(cfg, OutboundConfig)
    policy = SigningPolicy.from_config(cfg)
    assert summary(policy.select(Address("a", "example.org"), None)) == [
        ("dkim", "example.org", "s1")
    ]
    # ".example.org" is subdomains only, and beats "example.org" for them.
    assert summary(policy.select(Address("a", "x.example.org"), None)) == [
        ("dkim", "example.org", "sub")
    ]
    quiet = policy.select(Address("a", "quiet.example.org"), None)
    assert quiet.specs == () and "do not sign" in (quiet.reason or "")
    other = policy.select(Address("a", "other.example"), None)
    assert [(s.domain, s.algorithm) for s in other.specs] == [("relay.example", "ed25519-sha256")]
    listed = policy.select(Address("a", "example.org"), "anything.example.com")
    assert summary(listed) == [("dkim", "lists.example", "s1")]
    described = "\n".join(policy.describe())
    assert "rule example.org" in described and "ed25519" in described


def test_toml_rule_clashing_with_sender_map_entry(tmp_path: Path, keydir: Path) -> None:
    sender_map = tmp_path / "sender_map"
    sender_map.write_text("example.org dkim\n")
    conf = tmp_path / "out.toml"
    conf.write_text(
        f'mode = "out"\nsender_map = "{sender_map}"\n[defaults]\nkey = "{keydir / "rsa1.key"}"\n'
        'selector = "s1"\n[[sign]]\nmatch = "example.org"\n[[sign.signature]]\ntype = "dkim"\n'
    )
    cfg = load_config_file(str(conf))
    assert isinstance(cfg, OutboundConfig)
    with pytest.raises(ConfigError) as info:
        SigningPolicy.from_config(cfg)
    assert str(info.value).startswith(f"{conf}: sign[0]: 'example.org' is already configured")


# --- introspection ------------------------------------------------------------------------------


def test_describe_and_signing_keys(tmp_path: Path, keydir: Path) -> None:
    sender_map = tmp_path / "sender_map"
    key2 = keydir / "rsa2.key"
    sender_map.write_text(
        f"example.org dkim(key={key2},s=k2), domainkeys(key={key2},s=k2)\n. dkim(d=$senderdomain)\n"
    )
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        f"--sender_map={sender_map}",
        "--domain=a.example,b.example",
        "--signature=dkim",
    )
    keys = [(d, s, os.path.basename(k.path), src) for d, s, k, src in policy.signing_keys()]
    assert ("example.org", "k2", "rsa2.key", f"{sender_map}:1") in keys
    assert ("$senderdomain", "s1", "rsa1.key", f"{sender_map}:2") in keys
    assert ("a.example", "s1", "rsa1.key", "command line: --signature") in keys
    assert ("b.example", "s1", "rsa1.key", "command line: --signature") in keys
    assert len(keys) == 4  # DKIM and DomainKeys share example.org/k2
    described = policy.describe()
    assert described[0].startswith("sender_map example.org")
    assert any("d=$senderdomain" in line for line in described)
    assert any(line.startswith("default signatures, domain b.example") for line in described)


# --- the shipped examples -----------------------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def test_shipped_toml_example_behaves_as_its_comments_say(tmp_path: Path, keydir: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("example.org.rsa.key", "news.key", "lists.key"):
        shutil.copy(keydir / "rsa1.key", keys / name)
    shutil.copy(keydir / "ed.key", keys / "example.org.ed25519.key")
    conf = tmp_path / "dkproxy-out.toml"
    shutil.copy(CONF_DIR / "dkproxy-out.toml.example", conf)
    cfg = load_config_file(str(conf))
    assert isinstance(cfg, OutboundConfig)
    policy = SigningPolicy.from_config(cfg)

    org = policy.select(Address("a", "example.org"), None)
    assert [(s.kind, s.domain, s.selector, s.algorithm) for s in org.specs] == [
        ("dkim", "example.org", "s2026", "rsa-sha256"),
        ("dkim", "example.org", "ed2026", "ed25519-sha256"),
        ("domainkeys", "example.org", "s2026", "rsa-sha1"),
    ]
    assert summary(policy.select(Address("a", "mail.example.com"), None))[0][1] == "example.com"
    news = policy.select(Address("newsletter", "example.org"), None)
    assert [(s.selector, s.identity) for s in news.specs] == [
        ("news2026", "newsletter@example.org")
    ]
    assert policy.select(Address("a", "test.example.org"), None).specs == ()
    assert summary(policy.select(Address("a", "example.org"), "announce.lists.example.org")) == [
        ("dkim", "lists.example.org", "lists2026")
    ]
    assert policy.select(Address("a", "elsewhere.example"), None).specs == ()


def test_shipped_map_examples(tmp_path: Path, keydir: Path) -> None:
    shutil.copy(keydir / "rsa2.key", tmp_path / "lists.key")
    shutil.copy(keydir / "ed.key", tmp_path / "ed25519.key")
    for name in ("sender_map", "listid_map"):
        text = (CONF_DIR / f"{name}.example").read_text()
        (tmp_path / name).write_text(text.replace("/etc/dkimproxy/", f"{tmp_path}/"))
    policy = policy_cli(
        f"--keyfile={keydir / 'rsa1.key'}",
        "--selector=s1",
        f"--sender_map={tmp_path / 'sender_map'}",
        f"--listid_map={tmp_path / 'listid_map'}",
    )
    assert summary(policy.select(Address("jason", "long.name"), None)) == [
        ("dkim", "example.com", "s1")
    ]
    assert [s.kind for s in policy.select(Address("a", "example.org"), None).specs] == [
        "dkim",
        "domainkeys",
    ]
    assert summary(policy.select(Address("a", "lists.example.org"), None)) == [
        ("dkim", "lists.example.org", "lists2026")
    ]
    net = policy.select(Address("a", "example.net"), None).specs
    assert [(s.selector, s.algorithm) for s in net] == [
        ("rsa2026", "rsa-sha256"),
        ("ed2026", "ed25519-sha256"),
    ]
    assert summary(policy.select(None, "dev.spamassassin.apache.org")) == [
        ("dkim", "apache.org", "s1")
    ]
    assert policy.select(Address("a", "unlisted.example"), None).specs == ()

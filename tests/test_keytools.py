"""keygen, dnscheck and check-config, against a real DNS server and real verifiers.

The central claim of keygen is that its zone lines are right as written: the generated zone
file is loaded into NSD unchanged, the real `dkproxy out` signs with the generated key, and
Mail::DKIM (DKIM and DomainKeys), go-msgauth and dkimpy verify the result by fetching the key
over DNS. dnscheck is shown each kind of broken record it must recognise; check-config is shown
broken configurations and must point at the file and line.
"""

from __future__ import annotations

import io
import os
import pwd
import re
import smtplib
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dkproxy.mailauth.keys import load_signing_key
from dkproxy.tools import keytools
from dkproxy.tools.keygen import split_txt
from tests.support.dnsserver import DNSServer
from tests.support.proxy import ProxyProcess, run_dkproxy
from tests.support.sink import SmtpSink
from tests.support.testkeys import KeySet, make_ed25519_key, make_rsa_key
from tests.support.verifiers import (
    sign_mail_dkim,
    verify_dkimpy,
    verify_go_msgauth,
    verify_mail_dkim,
)

LINE = re.compile(r"^(?P<status>[a-z]+(?: [a-z]+)?) +(?P<name>\S+)  (?P<detail>.*)$")


@dataclass
class Run:
    status: int
    out: str
    err: str

    def lines_for(self, name: str) -> list[re.Match[str]]:
        found = [LINE.match(line) for line in self.out.splitlines()]
        return [m for m in found if m is not None and m.group("name") == name]


def keytool(capsys: pytest.CaptureFixture[str], command: str, *args: str) -> Run:
    """Run `dkproxy COMMAND ARGS` in-process (the same code path the CLI dispatches to)."""
    capsys.readouterr()
    out = io.StringIO()
    status = keytools.main(command, list(args), out)
    return Run(status, out.getvalue(), capsys.readouterr().err)


def _message(sender: str, subject: str) -> bytes:
    return (
        f"From: Alice <{sender}>\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
        "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@keytools.test>\r\n"
        "\r\nHello Bob,\r\n  this was signed with a key from dkproxy keygen.\r\n"
    ).encode()


# ---------------------------------------------------------------------------------------------
# keygen: files
# ---------------------------------------------------------------------------------------------


def _panel_value(out: str, name: str) -> str:
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("name:") and f"({name})" in line:
            return lines[i + 1].removeprefix("value: ")
    raise AssertionError(f"no panel value for {name} in:\n{out}")


def test_keygen_writes_private_key_0600_and_split_zone_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = keytool(capsys, "keygen", "--domain", "Example.ORG", "--selector", "s1", "--out",
                  str(tmp_path))  # fmt: skip
    assert run.status == 0, run.err
    key_path = tmp_path / "example.org.s1.key"
    zone_path = tmp_path / "example.org.s1.zone"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    pem = key_path.read_text()
    # PKCS#1: the form DKIMproxy's Mail::DKIM re-wraps keys into, so the file works there too.
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----\n")
    key = load_signing_key(str(key_path))
    assert (key.kind, key.bits) == ("rsa", 2048)  # the defaults

    zone = zone_path.read_text()
    assert zone == run.out.split("--- BIND zone lines for example.org ---\n")[1].split("\n---")[0]
    # A 2048-bit record is longer than one character-string can be; every quoted piece fits.
    strings = re.findall(r'"([^"]*)"', zone)
    assert len(key.dns_record) > 255
    assert len(strings) >= 2
    assert all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings) == key.dns_record
    assert "s1._domainkey.example.org.\t" in zone  # absolute owner name
    # ... and one unsplit value for web panels.
    assert _panel_value(run.out, "s1._domainkey.example.org") == key.dns_record
    assert "dkproxy dnscheck --domain example.org --selector s1 --keyfile" in run.out


def test_keygen_ed25519_record_and_optional_policy_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = keytool(capsys, "keygen", "-d", "example.net", "-s", "ed1", "--type", "ed25519",
                  "--out", str(tmp_path), "--dk-policy", "some", "--dmarc", "quarantine",
                  "--dmarc-rua", "reports@example.net")  # fmt: skip
    assert run.status == 0, run.err
    key_path = tmp_path / "example.net.ed1.key"
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")
    key = load_signing_key(str(key_path))
    assert key.kind == "ed25519"
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", key.dns_record)
    zone = (tmp_path / "example.net.ed1.zone").read_text()
    assert f'ed1._domainkey.example.net.\t3600\tIN\tTXT\t"{key.dns_record}"' in zone
    assert '_domainkey.example.net.\t3600\tIN\tTXT\t"o=~"' in zone
    assert (
        '_dmarc.example.net.\t3600\tIN\tTXT\t"v=DMARC1; p=quarantine; '
        'rua=mailto:reports@example.net"'
    ) in zone
    assert _panel_value(run.out, "_dmarc.example.net").startswith("v=DMARC1; p=quarantine")


def test_keygen_never_overwrites_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ("keygen", "--domain", "example.org", "--selector", "s1", "--out", str(tmp_path))
    assert keytool(capsys, *args).status == 0
    key_path = tmp_path / "example.org.s1.key"
    first = key_path.read_bytes()

    again = keytool(capsys, *args)
    assert again.status == 1
    assert f"{key_path} already exists (use --force" in again.err
    assert key_path.read_bytes() == first

    # Only the zone file in the way still blocks the run, and writes nothing.
    key_path.unlink()
    assert keytool(capsys, *args).status == 1
    assert not key_path.exists()

    forced = keytool(capsys, *args, "--force")
    assert forced.status == 0, forced.err
    assert key_path.read_bytes() != first
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert [p.name for p in sorted(tmp_path.iterdir())] == [
        "example.org.s1.key",
        "example.org.s1.zone",
    ]  # no temporary files left behind


def test_keygen_date_selectors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    month = datetime.now(UTC).strftime("%Y%m")
    base = ("keygen", "--domain", "example.org", "--out", str(tmp_path))
    assert keytool(capsys, *base, "--selector", "auto").status == 0
    assert keytool(capsys, *base, "--date-selector").status == 0  # a second rotation this month
    assert keytool(capsys, *base, "--selector", "auto", "--type", "ed25519").status == 0
    names = sorted(p.name for p in tmp_path.glob("*.key"))
    assert names == [
        f"example.org.e{month}.key",
        f"example.org.s{month}.key",
        f"example.org.s{month}b.key",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--domain", "example.org", "--selector", "s1", "--bits", "512"], "--bits 512"),
        (["--domain", "example.org", "--selector", "s1", "--type", "ed25519", "--bits", "2048"],
         "RSA keys only"),
        (["--domain", "exa mple.org", "--selector", "s1"], "not a valid domain"),
        (["--domain", "example.org"], "--selector is required"),
        (["--domain", "example.org", "--selector", "bad_sel!"], "--selector"),
        (["--domain", "example.org", "--selector", "s1", "--dmarc-rua", "a@example.org"],
         "--dmarc-rua needs --dmarc"),
        (["--domain", "example.org", "--selector", "s1", "--date-selector"], "not both"),
    ],
)  # fmt: skip
def test_keygen_refuses_bad_options(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = keytool(capsys, "keygen", *args, "--out", str(tmp_path))
    assert run.status == 1
    assert message in run.err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_keygen_owner_gives_the_key_to_the_daemon_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nobody = pwd.getpwnam("nobody")
    run = keytool(capsys, "keygen", "--domain", "example.org", "--selector", "s1",
                  "--out", str(tmp_path), "--owner", "nobody")  # fmt: skip
    assert run.status == 0, run.err
    st = (tmp_path / "example.org.s1.key").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        nobody.pw_uid,
        nobody.pw_gid,
        0o600,
    )


# ---------------------------------------------------------------------------------------------
# keygen end to end: zone text served as-is, real proxy signs, real verifiers verify
# ---------------------------------------------------------------------------------------------


@dataclass
class Generated:
    domain: str
    selector: str
    key: str
    zone: str


def _generate(workdir: Path, domain: str, *extra: str) -> Generated:
    proc = run_dkproxy("keygen", "--domain", domain, "--selector", "auto", "--out",
                       str(workdir), *extra)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (key,) = workdir.glob(f"{domain}.*.key")
    selector = key.name.removeprefix(domain + ".").removesuffix(".key")
    return Generated(
        domain, selector, str(key), (workdir / f"{domain}.{selector}.zone").read_text()
    )


def _send_through_proxy(gen: Generated, signatures: list[str], count: int = 1) -> list[bytes]:
    with SmtpSink() as sink:
        args = ["--keyfile", gen.key, "--selector", gen.selector, "--domain", gen.domain]
        args += [f"--signature={s}" for s in signatures]
        with ProxyProcess("out", args, relay=sink.address) as proxy:
            with smtplib.SMTP(proxy.host, proxy.port, timeout=30) as client:
                for i in range(count):
                    sender = f"alice@{gen.domain}"
                    client.sendmail(sender, ["bob@example.net"], _message(sender, f"kg {i}"))
            return [m.data for m in sink.wait_for(count, timeout=30)]


@pytest.fixture(scope="module")
def rsa_generated(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer
) -> Iterator[Generated]:
    gen = _generate(tmp_path_factory.mktemp("kg-rsa"), "kg-rsa.keytools.test", "--dk-policy",
                    "all", "--dmarc", "none")  # fmt: skip
    dns_server.load_zone_text(gen.domain, gen.zone)  # exactly the generated text
    yield gen
    dns_server.unload_zone_text(gen.domain)


@pytest.fixture(scope="module")
def ed_generated(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DNSServer
) -> Iterator[Generated]:
    gen = _generate(tmp_path_factory.mktemp("kg-ed"), "kg-ed.keytools.test", "--type", "ed25519")
    dns_server.load_zone_text(gen.domain, gen.zone)
    yield gen
    dns_server.unload_zone_text(gen.domain)


def test_generated_zone_serves_split_record_that_joins_to_the_key(
    rsa_generated: Generated, dns_server: DNSServer
) -> None:
    name = f"{rsa_generated.selector}._domainkey.{rsa_generated.domain}"
    response = dns_server.query(name, tcp=True)
    (rrset,) = response.answer
    (rdata,) = list(rrset)
    assert len(rdata.strings) >= 2
    assert all(len(s) <= 255 for s in rdata.strings)
    key = load_signing_key(rsa_generated.key)
    assert b"".join(rdata.strings).decode() == key.dns_record
    assert dns_server.lookup_txt(f"_domainkey.{rsa_generated.domain}") == [b"o=-"]
    assert dns_server.lookup_txt(f"_dmarc.{rsa_generated.domain}") == [b"v=DMARC1; p=none"]


def test_dnscheck_accepts_freshly_generated_and_published_keys(
    rsa_generated: Generated, ed_generated: Generated, dns_server: DNSServer
) -> None:
    for gen, kind in ((rsa_generated, "rsa 2048 bits"), (ed_generated, "ed25519 256 bits")):
        proc = run_dkproxy("dnscheck", "--domain", gen.domain, "--selector", gen.selector,
                           "--keyfile", gen.key, "--dns-server", dns_server.address)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        first, summary = proc.stdout.splitlines()
        assert first.startswith(f"ok              {gen.selector}._domainkey.{gen.domain}  {kind}")
        assert summary == "dnscheck: all 1 key ok"


def test_rsa_key_from_keygen_signs_mail_that_mail_dkim_and_go_msgauth_verify(
    rsa_generated: Generated, dns_server: DNSServer
) -> None:
    (signed,) = _send_through_proxy(rsa_generated, ["dkim(c=relaxed)", "domainkeys(c=nofws)"])
    results = verify_mail_dkim(signed, dns_server)
    assert sorted((r.kind, r.result) for r in results) == [("dkim", "pass"), ("domainkeys", "pass")]
    assert all(r.selector == rsa_generated.selector for r in results)
    (go,) = verify_go_msgauth([signed], dns_server)
    assert [(r.domain, r.result) for r in go] == [(rsa_generated.domain, "pass")]


def test_rsa_key_from_keygen_also_loads_in_dkimproxy_mail_dkim_signer(
    rsa_generated: Generated, dns_server: DNSServer
) -> None:
    """Going back to DKIMproxy must not need a key conversion."""
    gen = rsa_generated
    message = _message(f"carol@{gen.domain}", "perl signer")
    signed = sign_mail_dkim(message, gen.key, gen.domain, gen.selector)
    assert [r.result for r in verify_mail_dkim(signed, dns_server)] == ["pass"]


def test_ed25519_key_from_keygen_signs_mail_that_go_msgauth_and_dkimpy_verify(
    ed_generated: Generated, dns_server: DNSServer
) -> None:
    (signed,) = _send_through_proxy(ed_generated, ["dkim(c=relaxed)"])
    assert b"a=ed25519-sha256" in signed.replace(b"\r\n ", b"").replace(b"\r\n\t", b"")
    (go,) = verify_go_msgauth([signed], dns_server)
    assert [(r.domain, r.result) for r in go] == [(ed_generated.domain, "pass")]
    assert [r.result for r in verify_dkimpy(signed, dns_server)] == ["pass"]


# ---------------------------------------------------------------------------------------------
# dnscheck: every failure kind against the loopback DNS server
# ---------------------------------------------------------------------------------------------

ZONE = "dnscheck.keytools.test"
LABELS = ["ok", "missing", "mismatch", "wrongtype", "revoked", "short", "nop", "base64",
          "truncated", "version", "vlast", "keytype", "quoted", "twice", "several", "stray",
          "testing", "hashes", "service"]  # fmt: skip


def _record_without_tags(record: str) -> str:
    return record.split("p=", 1)[1]


@dataclass(frozen=True)
class Broken:
    label: str
    records: list[str] | None  # None: nothing published
    status: str
    detail: str  # a fragment the detail must contain


def _broken_cases(keys: KeySet) -> list[Broken]:
    good = keys.rsa2048.dns_record
    p = _record_without_tags(good)
    return [
        Broken("ok", [good], "ok", f"rsa 2048 bits, matches {keys.rsa2048.path}"),
        Broken("missing", None, "missing", "no such name"),
        Broken("mismatch", [keys.rsa1024.dns_record], "mismatch",
               "published key (rsa 1024 bits) is not the public half of"),
        Broken("wrongtype", [keys.ed25519.dns_record], "mismatch", "published k=ed25519"),
        Broken("revoked", ["v=DKIM1; k=rsa; p="], "revoked", "empty p="),
        Broken("short", [keys.rsa512.dns_record], "too short", "512 bits"),
        Broken("nop", ["v=DKIM1; k=rsa"], "bad syntax", "no p= tag"),
        Broken("base64", [f"v=DKIM1; k=rsa; p={p[:100]}!{p[101:]}"], "bad syntax", "base64"),
        Broken("truncated", [f"v=DKIM1; k=rsa; p={p[:200]}"], "bad syntax",
               "does not decode to a public key"),
        Broken("version", [good.replace("DKIM1", "DKIM2")], "bad syntax", "v=DKIM2"),
        Broken("vlast", [f"k=rsa; p={p}; v=DKIM1"], "bad syntax", "must be the first tag"),
        Broken("keytype", [good.replace("k=rsa", "k=dsa")], "bad syntax", "unknown key type k=dsa"),
        Broken("quoted", [f'"{good[:200]}" "{good[200:]}"'], "bad syntax", "without quotes"),
        Broken("twice", [good + "; p=" + p], "bad syntax", "p= appears twice"),
        Broken("several", [good, keys.rsa1024.dns_record], "several records",
               "2 TXT records (all key records)"),
        Broken("stray", [good, "google-site-verification=abc"], "several records",
               "2 TXT records (1 of them key records)"),
        Broken("testing", [good + "; t=y"], "testing", "t=y"),
        Broken("hashes", [good.replace("k=rsa;", "k=rsa; h=sha1;")], "restricted", "h=sha1"),
        Broken("service", [good.replace("k=rsa;", "k=rsa; s=other;")], "restricted", "s=other"),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def broken_zone(dns_server: DNSServer, key_dir: KeySet) -> Iterator[list[Broken]]:
    cases = _broken_cases(key_dir)
    assert [c.label for c in cases] == LABELS
    dns_server.publish(
        {f"sel._domainkey.{c.label}.{ZONE}": c.records for c in cases if c.records is not None}
    )
    # A web panel that appends the domain to a full name the user typed.
    dns_server.publish({f"sel._domainkey.panel.{ZONE}.panel.{ZONE}": [key_dir.rsa2048.dns_record]})
    yield cases
    dns_server.unpublish(
        f"sel._domainkey.panel.{ZONE}.panel.{ZONE}",
        *(f"sel._domainkey.{c.label}.{ZONE}" for c in cases),
    )


@pytest.mark.parametrize("label", LABELS)
def test_dnscheck_reports_each_kind_of_record(
    label: str,
    broken_zone: list[Broken],
    key_dir: KeySet,
    dns_server: DNSServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (case,) = [c for c in broken_zone if c.label == label]
    domain = f"{label}.{ZONE}"
    run = keytool(capsys, "dnscheck", "--domain", domain, "--selector", "sel", "--keyfile",
                  key_dir.rsa2048.path, "--dns-server", dns_server.address)  # fmt: skip
    (line,) = run.lines_for(f"sel._domainkey.{domain}")
    assert line.group("status") == case.status, run.out
    assert case.detail in line.group("detail"), run.out
    assert run.status == (0 if case.status == "ok" else 1)
    summary = run.out.splitlines()[-1]
    assert summary.startswith("dnscheck: ")
    assert (case.status in summary) or summary == "dnscheck: all 1 key ok"


def test_dnscheck_testing_mode_passes_only_when_allowed(
    broken_zone: list[Broken], key_dir: KeySet, dns_server: DNSServer,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    args = ("--domain", f"testing.{ZONE}", "--selector", "sel", "--keyfile",
            key_dir.rsa2048.path, "--dns-server", dns_server.address)  # fmt: skip
    assert keytool(capsys, "dnscheck", *args).status == 1
    allowed = keytool(capsys, "dnscheck", *args, "--allow-testing")
    assert allowed.status == 0
    assert allowed.out.startswith("testing ")


def test_dnscheck_points_at_a_record_published_under_a_doubled_name(
    broken_zone: list[Broken], key_dir: KeySet, dns_server: DNSServer,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    domain = f"panel.{ZONE}"
    run = keytool(capsys, "dnscheck", "--domain", domain, "--selector", "sel",
                  "--dns-server", dns_server.address)  # fmt: skip
    (line,) = run.lines_for(f"sel._domainkey.{domain}")
    assert line.group("status") == "missing"
    assert f"a record exists at sel._domainkey.{domain}.{domain}" in line.group("detail")
    assert "enter only 'sel._domainkey'" in line.group("detail")
    assert run.status == 1


def test_dnscheck_without_keyfile_checks_the_record_alone(
    broken_zone: list[Broken], dns_server: DNSServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run = keytool(capsys, "dnscheck", "--domain", f"mismatch.{ZONE},ok.{ZONE}", "--selector",
                  "sel", "--dns-server", dns_server.address)  # fmt: skip
    assert run.status == 0, run.out
    for label, bits in (("mismatch", 1024), ("ok", 2048)):
        (line,) = run.lines_for(f"sel._domainkey.{label}.{ZONE}")
        assert line.group("status") == "ok"
        assert line.group("detail") == f"rsa {bits} bits (no key file given; not compared)"
    assert run.out.splitlines()[-1] == "dnscheck: all 2 keys ok"


def test_dnscheck_reports_dns_timeout_as_dns_error(
    key_dir: KeySet, dns_server: DNSServer, capsys: pytest.CaptureFixture[str]
) -> None:
    run = keytool(capsys, "dnscheck", "--domain", f"ok.{ZONE}", "--selector", "sel",
                  "--keyfile", key_dir.rsa2048.path, "--dns-server",
                  dns_server.blackhole_address(), "--timeout", "1")  # fmt: skip
    (line,) = run.lines_for(f"sel._domainkey.ok.{ZONE}")
    assert line.group("status") == "dns error"
    assert "timeout" in line.group("detail")
    assert run.status == 1


def test_dnscheck_checks_every_key_of_a_configuration(
    broken_zone: list[Broken], key_dir: KeySet, dns_server: DNSServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    sender_map = tmp_path / "sender_map"
    sender_map.write_text(
        f"ok.{ZONE}        dkim, domainkeys\n"
        f"revoked.{ZONE}   dkim\n"
        f"hosted.example   dkim(s=sel,d=$senderdomain,key={key_dir.ed25519.path})\n"
    )
    conf = tmp_path / "dkimproxy_out.conf"
    conf.write_text(f"keyfile {key_dir.rsa2048.path}\nselector sel\nsender_map {sender_map}\n")
    run = keytool(capsys, "dnscheck", "--config", str(conf), "--dns-server", dns_server.address)
    statuses = {
        m.group("name"): m.group("status")
        for m in (LINE.match(line) for line in run.out.splitlines())
        if m is not None
    }
    assert statuses == {
        f"sel._domainkey.ok.{ZONE}": "ok",  # dkim and domainkeys share one key: one line
        f"sel._domainkey.revoked.{ZONE}": "revoked",
        "sel._domainkey.$senderdomain": "skipped",
    }
    assert run.status == 1
    assert run.out.splitlines()[-1] == (
        "dnscheck: 3 keys: 1 ok, 1 revoked, 1 skipped (1 with problems)"
    )

    # Naming the hosted domain fills d=$senderdomain; its key (ed25519) is not published.
    filled = keytool(capsys, "dnscheck", "-c", str(conf), "--domain", f"ok.{ZONE}",
                     "--dns-server", dns_server.address)  # fmt: skip
    (line,) = [
        m for m in filled.lines_for(f"sel._domainkey.ok.{ZONE}") if "ed25519" in m.group("detail")
    ]
    assert line.group("status") == "mismatch"


def test_dnscheck_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert keytool(capsys, "dnscheck", "--domain", "example.org").status == 2
    missing_key = keytool(capsys, "dnscheck", "--domain", "example.org", "--selector", "s",
                          "--keyfile", str(tmp_path / "nope.key"))  # fmt: skip
    assert missing_key.status == 2
    assert f"{tmp_path / 'nope.key'}: cannot read key file" in missing_key.err
    assert keytool(capsys, "dnscheck", "-c", "x", "--selector", "s").status == 2


# ---------------------------------------------------------------------------------------------
# check-config
# ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o644) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.fixture
def private_key(tmp_path: Path) -> str:
    return make_rsa_key(str(tmp_path / "private.key"), 2048)


def test_check_config_prints_effective_rules(
    tmp_path: Path, private_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ed = make_ed25519_key(str(tmp_path / "ed.key"))
    sender_map = _write(tmp_path / "sender_map", (
        "# comment\n"
        "example.org   dkim(c=relaxed), domainkeys\n"
        f"news@example.org  dkim(key={ed},s=ed2026)\n"
    ))  # fmt: skip
    conf = _write(tmp_path / "dkimproxy_out.conf", (
        "listen 127.0.0.1:10027\nrelay 127.0.0.1:10028\n"
        f"keyfile {private_key}\nselector s2026\n"
        f"sender_map {sender_map}\n"
    ))  # fmt: skip
    run = keytool(capsys, "check-config", conf)
    assert run.status == 0, run.err
    out = run.out
    assert out.startswith(f"{conf}: outbound (signing) configuration\n")
    assert f"  {private_key}  rsa 2048 bits  (s=s2026 d=example.org)" in out
    assert f"  {ed}  ed25519 256 bits  (s=ed2026 d=example.org)" in out
    assert f"sender_map example.org ({sender_map}:2):" in out
    assert f"sender_map news@example.org ({sender_map}:3):" in out
    assert "dkim(d=example.org, s=s2026, a=rsa-sha256, c=relaxed/simple" in out
    assert "domainkeys(d=example.org, s=s2026, a=rsa-sha1, c=nofws" in out
    assert "dkim(d=example.org, s=ed2026, a=ed25519-sha256" in out
    assert out.endswith("configuration ok\n")
    assert "warning" not in out


def test_check_config_through_the_cli(tmp_path: Path, private_key: str) -> None:
    conf = _write(tmp_path / "out.toml", (
        'mode = "out"\n[defaults]\n'
        f'key = "{private_key}"\nselector = "s2026"\n'
        '[[sign]]\nmatch = "example.org"\n  [[sign.signature]]\n  type = "dkim"\n'
    ))  # fmt: skip
    proc = run_dkproxy("check-config", conf)
    assert proc.returncode == 0, proc.stderr
    assert "example.org" in proc.stdout
    assert proc.stdout.endswith("configuration ok\n")


@pytest.mark.parametrize(
    ("name", "text", "where", "message"),
    [
        ("typo.conf", "keyfile {key}\nselector s1\nselecter s2\n", "{file}:3: ", "selecter"),
        ("nokey.conf", "domain example.org\nkeyfile {dir}/missing.key\nselector s1\n",
         "{file}:2: ", "missing.key"),
        ("short.conf", "domain example.org\nkeyfile {short}\nselector s1\n", "{file}:2: ",
         "512 bits"),
        ("sig.conf", "keyfile {key}\nselector s1\nsignature dkim(c=nowsp)\n", "{file}:3: ",
         "nowsp"),
        ("dk.conf", "keyfile {ed}\nselector s1\ndomain example.org\nsignature domainkeys\n",
         "{file}:4: ", "DomainKeys needs an RSA key"),
        ("bad.toml", 'mode = "out"\n[defaults]\nkey = "{key}"\nselectr = "s1"\n', "{file}: ",
         "selectr"),
    ],
)  # fmt: skip
def test_check_config_errors_name_file_and_line(
    name: str,
    text: str,
    where: str,
    message: str,
    tmp_path: Path,
    private_key: str,
    key_dir: KeySet,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {"key": private_key, "dir": str(tmp_path), "short": key_dir.rsa512.path,
              "ed": key_dir.ed25519.path}  # fmt: skip
    conf = _write(tmp_path / name, text.format(**values))
    run = keytool(capsys, "check-config", conf)
    assert run.status == 1
    first = run.err.splitlines()[0]
    assert first.startswith(where.format(file=conf)), run.err
    assert message in first
    assert "configuration NOT usable" in run.err
    assert "configuration ok" not in run.out


def test_check_config_error_in_a_map_file_names_the_map_line(
    tmp_path: Path, private_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sender_map = _write(tmp_path / "sender_map", "example.org dkim\nexample.net dkim(q=1)\n")
    conf = _write(tmp_path / "out.conf", f"keyfile {private_key}\nselector s1\n"
                  f"sender_map {sender_map}\n")  # fmt: skip
    run = keytool(capsys, "check-config", conf)
    assert run.status == 1
    assert run.err.startswith(f"{sender_map}:2: ")


def test_check_config_warns_about_key_file_permissions(
    tmp_path: Path, private_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(private_key, 0o644)
    conf = _write(
        tmp_path / "out.conf", f"domain example.org\nkeyfile {private_key}\nselector s1\n"
    )
    run = keytool(capsys, "check-config", conf)
    assert run.status == 0
    assert f"warning: key file {private_key} is readable by every user (mode 0644)" in run.out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a root-owned key and another user")
def test_check_config_warns_when_the_daemon_user_cannot_read_the_key(
    tmp_path: Path, private_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _write(
        tmp_path / "out.conf",
        f"domain example.org\nkeyfile {private_key}\nselector s1\nuser nobody\n",
    )
    run = keytool(capsys, "check-config", conf)
    assert run.status == 0, run.err
    assert f"key file {private_key} is not readable by user nobody" in run.out
    os.chown(private_key, pwd.getpwnam("nobody").pw_uid, -1)
    assert "not readable" not in keytool(capsys, "check-config", conf).out


def test_check_config_dns_runs_dnscheck(
    broken_zone: list[Broken], key_dir: KeySet, dns_server: DNSServer, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    good = _write(tmp_path / "good.conf", (
        f"domain ok.{ZONE}\nkeyfile {key_dir.rsa2048.path}\nselector sel\n"
    ))  # fmt: skip
    run = keytool(capsys, "check-config", good, "--dns", "--dns-server", dns_server.address)
    assert run.status == 0, run.out + run.err
    assert "configuration ok\n\nok " in run.out
    assert run.out.endswith("dnscheck: all 1 key ok\n")

    bad = _write(tmp_path / "bad.conf", (
        f"domain missing.{ZONE}\nkeyfile {key_dir.rsa2048.path}\nselector sel\n"
    ))  # fmt: skip
    run = keytool(capsys, "check-config", bad, "--dns", "--dns-server", dns_server.address)
    assert run.status == 1
    assert run.lines_for(f"sel._domainkey.missing.{ZONE}")[0].group("status") == "missing"
    assert "configuration ok" in run.out  # the file itself is fine; DNS is not


def test_check_config_inbound(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = _write(tmp_path / "dkimproxy_in.conf", (
        "listen 127.0.0.1:10025\nrelay 127.0.0.1:10026\nhostname mx.example.org\n"
        "reject_fail yes\n"
    ))  # fmt: skip
    run = keytool(capsys, "check-config", conf)
    assert run.status == 0, run.err
    assert "inbound (verifying) configuration" in run.out
    assert "authserv-id (Authentication-Results)  mx.example.org" in run.out
    assert "dmarc.reject  reject" in run.out


@pytest.mark.parametrize(
    ("mode", "name", "text", "shown"),
    [
        ("out", "out.conf", "metrics 9121\n", "metrics: http://127.0.0.1:9121/metrics"),
        ("out", "out.conf", "", "metrics: off"),
        ("out", "out.toml", 'metrics = "[::1]:9200"\n', "metrics: http://[::1]:9200/metrics"),
        ("out", "out.toml", "", "metrics: off"),
        ("in", "in.conf", "metrics 10.0.0.7\n", "metrics: http://10.0.0.7:9120/metrics"),
        ("in", "in.conf", "", "metrics: off"),
    ],
)  # fmt: skip
def test_check_config_shows_the_metrics_endpoint_or_off(
    mode: str, name: str, text: str, shown: str, tmp_path: Path, private_key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Where the scraper must look: a bare port is on loopback, a bare host on port 9120."""
    if name.endswith(".toml"):
        text = (f'mode = "{mode}"\nlisten = "127.0.0.1:10027"\nrelay = "127.0.0.1:10028"\n'
                f'{text}[defaults]\nkey = "{private_key}"\nselector = "s1"\n'
                '[[sign]]\nmatch = "example.org"\n[[sign.signature]]\ntype = "dkim"\n')  # fmt: skip
    elif mode == "out":
        text = ("listen 127.0.0.1:10027\nrelay 127.0.0.1:10028\n"
                f"{text}keyfile {private_key}\nselector s1\ndomain example.org\n")  # fmt: skip
    else:
        text = f"listen 127.0.0.1:10025\nrelay 127.0.0.1:10026\nhostname mx.example.org\n{text}"
    run = keytool(capsys, "check-config", "--mode", mode, _write(tmp_path / name, text))
    assert run.status == 0, run.err
    assert [line for line in run.out.splitlines() if line.startswith("metrics")] == [shown]


def test_split_txt_respects_the_255_byte_limit_exactly() -> None:
    assert split_txt("a" * 255) == [b"a" * 255]
    assert split_txt("a" * 256) == [b"a" * 255, b"a"]
    assert split_txt("") == [b""]


# ---------------------------------------------------------------------------------------------
# key file formats DKIMproxy (Mail::DKIM) and OpenDKIM load
# ---------------------------------------------------------------------------------------------


def _key_forms(pem_path: str) -> dict[str, bytes]:
    """The RSA key at `pem_path` written in every form DKIMproxy or OpenDKIM users have."""
    from cryptography.hazmat.primitives import serialization

    with open(pem_path, "rb") as handle:
        key = serialization.load_pem_private_key(handle.read(), password=None)
    none = serialization.NoEncryption()
    pem = serialization.Encoding.PEM
    pkcs1 = key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, none)
    pkcs8 = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, none)

    def body(block: bytes) -> bytes:
        return b"".join(line + b"\n" for line in block.splitlines() if b"-----" not in line)

    return {
        "pem-pkcs1": pkcs1,
        "pem-pkcs8": pkcs8,
        "pem-pkcs1-crlf": pkcs1.replace(b"\n", b"\r\n"),
        "pem-pkcs8-crlf": pkcs8.replace(b"\n", b"\r\n"),
        "bare-pkcs1": body(pkcs1),
        "bare-pkcs8": body(pkcs8),
        "bare-pkcs1-one-line": b"".join(body(pkcs1).split()),
        "bare-pkcs8-crlf": body(pkcs8).replace(b"\n", b"\r\n"),
        # OpenSSL (OpenDKIM) skips text and other PEM blocks before the private key.
        "pkcs12-export": b"Bag Attributes\n    localKeyID: 01 00 00 00\nKey Attributes: <No"
        b" Attributes>\n" + pkcs8,
        "certificate-first": b"-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n"
        + pkcs1,
        # Saved by a Windows editor: byte order mark and CRLF; OpenSSL's PEM reader also
        # drops white space at the end of lines, and old Mac CR line ends read as line ends.
        "bom-pem-pkcs1-crlf": b"\xef\xbb\xbf" + pkcs1.replace(b"\n", b"\r\n"),
        "bom-bare-pkcs1-crlf": b"\xef\xbb\xbf" + body(pkcs1).replace(b"\n", b"\r\n"),
        "pem-trailing-blanks": b"".join(line + b" \t\r\n" for line in pkcs8.splitlines()),
        "pem-cr-only": pkcs1.replace(b"\n", b"\r"),
        "text-after-end": pkcs1 + b"\nsaved 2026-11-30 by the provider's console\n",
    }


def test_every_key_form_dkimproxy_loads_gives_the_same_key(
    rsa_generated: Generated, tmp_path: Path
) -> None:
    expected = load_signing_key(rsa_generated.key).public_p
    for name, data in _key_forms(rsa_generated.key).items():
        path = tmp_path / f"{name}.key"
        path.write_bytes(data)
        key = load_signing_key(str(path))
        assert (key.kind, key.bits, key.public_p) == ("rsa", 2048, expected), name


def test_headerless_keys_sign_mail_that_verifiers_and_dkimproxy_accept(
    rsa_generated: Generated, tmp_path: Path, dns_server: DNSServer
) -> None:
    """The field report: a base64 PKCS#1 body without BEGIN/END lines, as some providers hand
    keys out. DKIMproxy's Mail::DKIM signs with it, and so must `dkproxy out`."""
    forms = _key_forms(rsa_generated.key)
    for name in ("bare-pkcs1", "bare-pkcs8-crlf", "pem-pkcs1-crlf", "bom-pem-pkcs1-crlf",
                 "pem-trailing-blanks"):  # fmt: skip
        path = tmp_path / f"{name}.key"
        path.write_bytes(forms[name])
        gen = Generated(rsa_generated.domain, rsa_generated.selector, str(path), "")
        (signed,) = _send_through_proxy(gen, ["dkim(c=relaxed)", "domainkeys(c=nofws)"])
        results = verify_mail_dkim(signed, dns_server)
        assert sorted((r.kind, r.result) for r in results) == [
            ("dkim", "pass"),
            ("domainkeys", "pass"),
        ], name
        (go,) = verify_go_msgauth([signed], dns_server)
        assert [r.result for r in go] == ["pass"], name
        assert [r.result for r in verify_dkimpy(signed, dns_server)] == ["pass"], name
    bare = tmp_path / "bare-pkcs1.key"
    perl = sign_mail_dkim(_message("carol@x.test", "perl bare"), str(bare),
                          rsa_generated.domain, rsa_generated.selector)  # fmt: skip
    assert [r.result for r in verify_mail_dkim(perl, dns_server)] == ["pass"]


def test_key_forms_nobody_loads_are_refused_naming_file_and_format(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from dkproxy.mailauth.keys import KeyLoadError

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    none = serialization.NoEncryption()
    enc = serialization.Encoding
    fmt = serialization.PrivateFormat
    public_der = key.public_key().public_bytes(
        enc.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cases = {
        "public.pem": (
            key.public_key().public_bytes(enc.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "found a PEM 'PUBLIC KEY' block",
        ),
        "encrypted.pem": (
            key.private_bytes(enc.PEM, fmt.PKCS8, serialization.BestAvailableEncryption(b"secret")),
            "key is encrypted",
        ),
        "openssh.key": (key.private_bytes(enc.PEM, fmt.OpenSSH, none), "'OPENSSH PRIVATE KEY'"),
        "ec.pem": (ec_key.private_bytes(enc.PEM, fmt.TraditionalOpenSSL, none), "'EC PRIVATE KEY'"),
        "ec-pkcs8.pem": (ec_key.private_bytes(enc.PEM, fmt.PKCS8, none), "unsupported key type"),
        "key.der": (key.private_bytes(enc.DER, fmt.PKCS8, none), "binary DER data"),
        "public.b64": (base64_lines(public_der), "a base64 public key"),
        "random.b64": (base64_lines(os.urandom(100)), "100 bytes of base64 data"),
        "text.key": (b"ssh-rsa AAAA... user@host\n", "text that is neither PEM nor base64"),
    }
    for name, (data, found) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(KeyLoadError) as info:
            load_signing_key(str(path))
        assert str(info.value).startswith(f"{path}: "), name
        assert found in str(info.value), (name, str(info.value))


def base64_lines(raw: bytes) -> bytes:
    import base64

    return base64.encodebytes(raw)


def test_ed25519_key_forms_load(tmp_path: Path) -> None:
    """RFC 8463 keys: PKCS#8 PEM (openssl genpkey), its base64 body, dkimpy's base64 seed;
    LF or CRLF."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    body = b"".join(line + b"\r\n" for line in pem.splitlines() if b"-----" not in line)
    forms = {
        "pem": pem,
        "pem-crlf": pem.replace(b"\n", b"\r\n"),
        "bare-pkcs8-crlf": body,
        "seed": base64.b64encode(seed) + b"\n",
        "seed-crlf": base64.b64encode(seed) + b"\r\n",
        "bom-seed-crlf": b"\xef\xbb\xbf" + base64.b64encode(seed) + b"\r\n",
        "bare-pkcs8-one-line": b"".join(body.split()),
        "bom-pem-trailing-blanks": b"\xef\xbb\xbf"
        + b"".join(line + b"  \r\n" for line in pem.splitlines()),
    }
    expected = base64.b64encode(
        key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    for name, data in forms.items():
        path = tmp_path / f"{name}.key"
        path.write_bytes(data)
        loaded = load_signing_key(str(path))
        assert (loaded.kind, loaded.public_p) == ("ed25519", expected), name


def test_dkproxy_out_refuses_to_start_naming_the_key_file_and_its_form(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    path = tmp_path / "dkim.pub"
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    proc = run_dkproxy("out", f"--keyfile={path}", "--selector=s", "--domain=example.org",
                       "127.0.0.1:1", "127.0.0.1:2", timeout=30)  # fmt: skip
    assert proc.returncode != 0
    assert str(path) in proc.stderr and "found a PEM 'PUBLIC KEY' block" in proc.stderr

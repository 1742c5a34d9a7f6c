"""Configuration parsing: DKIMproxy 1.4 command lines and conf files, and native TOML."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dkproxy.config import (
    ConfigError,
    HelpRequested,
    HostPort,
    InboundConfig,
    OutboundConfig,
    help_text,
    load_config_file,
    parse_log_level,
    parse_proxy_command,
    parse_signature_list,
    parse_size,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: DKIMproxy 1.4's scripts/dkimproxy_out.conf.example, verbatim except the key path.
DKIMPROXY_SAMPLE = """\
# specify what address/port DKIMproxy should listen on
listen    127.0.0.1:10027

# specify what address/port DKIMproxy forwards mail to
relay     127.0.0.1:10028

# specify what domains DKIMproxy can sign for (comma-separated, no spaces)
domain    example.org

# specify what signatures to add
signature dkim(c=relaxed)
signature domainkeys(c=nofws)

# specify location of the private key
keyfile   /full/path/to/private.key

# specify the selector (i.e. the name of the key record put in DNS)
selector  selector1

# control how many processes DKIMproxy uses
#  - more information on these options (and others) can be found by
#    running `perldoc Net::Server::PreFork'.
#min_servers 5
#min_spare_servers 2
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def out(argv: list[str]) -> OutboundConfig:
    cfg = parse_proxy_command("out", argv)
    assert isinstance(cfg, OutboundConfig)
    return cfg


def inbound(argv: list[str]) -> InboundConfig:
    cfg = parse_proxy_command("in", argv)
    assert isinstance(cfg, InboundConfig)
    return cfg


# --- DKIMproxy conf files -----------------------------------------------------------------------


def test_dkimproxy_sample_conf_file(tmp_path: Path) -> None:
    path = write(tmp_path / "dkimproxy_out.conf", DKIMPROXY_SAMPLE)
    cfg = out([f"--conf_file={path}"])
    assert cfg.listen == HostPort(host="127.0.0.1", port=10027)
    assert cfg.relay == HostPort(host="127.0.0.1", port=10028)
    assert cfg.domains == ["example.org"]
    assert cfg.keyfile == "/full/path/to/private.key"
    assert cfg.selector == "selector1"
    assert [(s.kind, s.canonicalization) for s in cfg.signatures] == [
        ("dkim", "relaxed"),
        ("domainkeys", "nofws"),
    ]
    assert [s.source for s in cfg.signatures] == [f"{path}:11", f"{path}:12"]
    assert cfg.sources["selector"] == f"{path}:18"
    assert cfg.min_servers is None  # commented out
    assert cfg.source_files == [path]


def test_conf_file_separators_comments_and_flags(tmp_path: Path) -> None:
    path = write(
        tmp_path / "out.conf",
        "listen=127.0.0.1:2525   # trailing comment\n"
        "relay: mail.example.net\n"
        "--selector s1\n"
        "keyfile /k/a\\#b.key\n"
        "  domain   example.org, example.com  \n"
        "reject_error\n"
        "daemonize 0\n"
        "max_servers 7\n"
        "log_level 4\n",
    )
    cfg = load_config_file(path)
    assert isinstance(cfg, OutboundConfig)
    assert cfg.listen == HostPort(host="127.0.0.1", port=2525)
    assert cfg.relay == HostPort(host="mail.example.net", port=25)  # DKIMproxy default port
    assert cfg.selector == "s1"
    assert cfg.keyfile == "/k/a#b.key"
    assert cfg.domains == ["example.org", "example.com"]
    assert cfg.reject_error is True  # a bare flag line means "on"
    assert cfg.daemonize is False
    assert cfg.max_servers == 7
    assert cfg.log_level == "debug"  # Net::Server's numeric level 4


def test_unknown_option_in_conf_names_file_line_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "dkimproxy_out.conf", "domain example.org\n\nselecter s1\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert info.value.source == path
    assert info.value.line == 3
    assert str(info.value) == f"{path}:3: unknown option 'selecter'; did you mean 'selector'?"


def test_inbound_option_in_outbound_conf_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path / "o.conf", "domain example.org\nreject_fail 1\n")
    with pytest.raises(ConfigError) as info:
        parse_proxy_command("out", ["--conf_file", path])
    assert info.value.line == 2
    assert "only applies to dkproxy in" in info.value.message


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("listen 127.0.0.1", "has no port"),
        ("listen ::1:25", "brackets"),
        ("relay 10.0.0.1:99999", "bad port"),
        ("max_servers many", "expected an integer"),
        ("signature dkim(c=relaxed", "unbalanced parentheses"),
        ("signature dkimx", "invalid signature type"),
        ("signature dkim(selecter=x)", "unknown signature option"),
        ("signature dkim(c=nowsp)", "nowsp"),
        ("signature dkim(a=rsa-sha512)", "unknown algorithm"),
        ("signature dkim(d=exa mple.org)", "not a valid domain"),
        ("signature dkim(d=$sendrdomain)", "unknown macro $sendrdomain"),
        ("signature dkim(i=$sender;x)", "is not a valid domain name"),
        ("signature dkim(d=$senderdomain$)", "stray"),
        ("signature dkim(s=)", "needs a value"),
        ("signature dkim(h=from:to:bad header)", "not a header field name"),
        ("signature domainkeys(c=relaxed)", "nofws or simple"),
        ("selector bad_selector!", "not a valid DNS name"),
        ("dkim_method nofws", "relaxed or simple"),
        ("domain a.example,$senderdomain", "single domain"),
        ("keyfile", "needs a value"),
        ("cidr_allow 10.0.0.0/33", "not an address or network"),
        ("conf_file other.conf", "cannot include another"),
        ("!!! nonsense", "cannot parse"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path / "dkimproxy_out.conf", f"# header\nselector s1\n{line}\n")
    with pytest.raises(ConfigError) as info:
        parse_proxy_command("out", [f"--conf_file={path}"])
    assert (info.value.source, info.value.line) == (path, 3), str(info.value)
    assert expected in info.value.message


def test_repeated_scalar_last_wins_with_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "o.conf", "domain example.org\ndomain example.com\n")
    cfg = load_config_file(path, "out")
    assert cfg.domains == ["example.com"]
    assert any(f"{path}:2: domain given again" in w for w in cfg.warnings)


def test_net_server_options_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dkimproxy_out.conf",
        "domain example.org\npid_file /run/x.pid\nsetsid 1\nuser dkim\ngroup dkim\n"
        "min_spare_servers 2\nmax_requests 100\nproto tcp\nlog_file Sys::Syslog\n"
        "cidr_allow 127.0.0.1/32\ncidr_allow ::1\n",
    )
    cfg = load_config_file(path)
    assert isinstance(cfg, OutboundConfig)
    assert (cfg.pidfile, cfg.daemonize, cfg.user, cfg.group) == ("/run/x.pid", True, "dkim", "dkim")
    assert (cfg.min_spare_servers, cfg.max_requests) == (2, 100)
    assert cfg.syslog is True
    assert cfg.cidr_allow == ["127.0.0.1/32", "::1"]
    assert any("proto" in w and "ignored" in w for w in cfg.warnings)


def test_mode_is_guessed_from_options_or_name(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path / "a.conf", "keyfile /k\n")).mode == "out"
    assert load_config_file(write(tmp_path / "b.conf", "reject_fail 1\n")).mode == "in"
    named = write(tmp_path / "dkimproxy_in.conf", "listen 127.0.0.1:10025\nhostname mx.test\n")
    assert load_config_file(named).mode == "in"
    with pytest.raises(ConfigError, match="cannot tell"):
        load_config_file(write(tmp_path / "c.conf", "listen 127.0.0.1:1\n"))
    with pytest.raises(ConfigError, match="mixes outbound options"):
        load_config_file(write(tmp_path / "d.conf", "keyfile /k\nreject_fail 1\n"))


def test_dkimproxy_in_conf_sample_with_bare_flag(tmp_path: Path) -> None:
    # dkimproxy.in's manual shows exactly this file; "reject_fail" alone means on.
    path = write(
        tmp_path / "dkimproxy_in.conf",
        "# this is an example config file\nlisten      127.0.0.1:10025\n"
        "relay       127.0.0.1:10026\nhostname    myhost.example.com\nreject_fail\n",
    )
    cfg = inbound(["--conf_file", path])
    assert cfg.hostname == "myhost.example.com"
    assert cfg.reject_fail is True
    assert cfg.actions == {"dmarc.reject": "reject"}
    assert cfg.listen.port == 10025 and cfg.relay.port == 10026


# --- command lines ----------------------------------------------------------------------------


def test_dkimproxy_manual_example_command_line() -> None:
    cfg = out(
        [
            "--keyfile=private.key",
            "--selector=postfix",
            "--domain=example.org",
            "127.0.0.1:10027",
            "127.0.0.1:10028",
        ]
    )
    assert (cfg.keyfile, cfg.selector, cfg.domains) == ("private.key", "postfix", ["example.org"])
    assert cfg.listen == HostPort(host="127.0.0.1", port=10027)
    assert cfg.relay == HostPort(host="127.0.0.1", port=10028)
    # No signature/sender_map/listid_map: DKIMproxy's default single "dkim" signature.
    assert [(s.kind, s.canonicalization) for s in cfg.signatures] == [("dkim", None)]


def test_getopt_and_net_server_spellings() -> None:
    cfg = out(
        [
            "--keyfile",
            "/k",
            "-selector=s1",
            "domain=example.org",  # Net::Server takes a bare name=value
            "--reject-error",
            "--daemonize",
            "1",  # Net::Server takes the next word as a flag's value
            "--max-servers=9",
            "--signature=dkim(c=relaxed,a=rsa-sha256)",
            "--signature",
            "domainkeys",
            "--relay_host=smtp.example.net",
            "--relay_port=2525",
            "--port=10099",
            "--host=127.0.0.2",
        ]
    )
    assert (cfg.keyfile, cfg.selector, cfg.domains) == ("/k", "s1", ["example.org"])
    assert cfg.reject_error is True and cfg.daemonize is True
    assert cfg.max_servers == 9
    assert [s.kind for s in cfg.signatures] == ["dkim", "domainkeys"]
    assert cfg.signatures[0].algorithm == "rsa-sha256"
    assert cfg.relay == HostPort(host="smtp.example.net", port=2525)
    assert cfg.listen == HostPort(host="127.0.0.2", port=10099)


def test_no_flag_and_our_extensions() -> None:
    cfg = inbound(
        [
            "--no-spf",
            "--dmarc=no",
            "--dns-server=127.0.0.1:5353",
            "--dns_timeout",
            "2.5",
            "--workers=3",
            "--max-message-size=10M",
            "--hostname=mx.example.org",
            "[::1]:10025",
            "[::1]:10026",
        ]
    )
    assert cfg.spf is False and cfg.dmarc is False
    assert cfg.dns_server == HostPort(host="127.0.0.1", port=5353)
    assert cfg.dns_timeout == 2.5
    assert cfg.workers == 3
    assert cfg.max_message_size == 10 * 1024 * 1024
    assert str(cfg.listen) == "[::1]:10025"


def test_command_line_overrides_conf_file(tmp_path: Path) -> None:
    path = write(tmp_path / "dkimproxy_out.conf", DKIMPROXY_SAMPLE)
    cfg = out(
        [
            f"--conf_file={path}",
            "--selector=s2026",
            "--signature=dkim(c=simple)",
            "--listen=127.0.0.1:3000",
            "127.0.0.1:4000",  # positional arguments beat --listen (dkimproxy configure())
            "127.0.0.1:4001",
        ]
    )
    assert cfg.selector == "s2026"
    assert cfg.sources["selector"] == "command line: --selector"
    # A list option on the command line replaces the file's list (Net::Server process_args).
    assert [(s.kind, s.canonicalization) for s in cfg.signatures] == [("dkim", "simple")]
    assert cfg.keyfile == "/full/path/to/private.key"  # still from the file
    assert cfg.listen.port == 4000 and cfg.relay.port == 4001


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--selecter=x"], "command line: --selecter: unknown option 'selecter'; did you mean"),
        (["--keyfile"], "command line: --keyfile: needs a value"),
        (["--max_servers=x"], "command line: --max_servers: expected an integer"),
        (["127.0.0.1:1"], "command line: wrong number of arguments"),
        (["a:1", "b:2", "c:3"], "command line: wrong number of arguments"),
        (["--reject_fail"], "only applies to dkproxy in"),
        (["--min-rsa-bits=512"], "must be at least 1024"),
        (["--listen=[::1"], "bad address"),
        (["--signature=dkim(d=)"], "needs a value"),
        (["--conf_file=/nonexistent/dkimproxy_out.conf"], "cannot read configuration file"),
        (["-c", "a.conf", "--conf_file=b.conf"], "only one configuration file"),
        (["--no-keyfile"], "unknown option"),
    ],
)
def test_command_line_errors(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_proxy_command("out", argv)
    assert expected in str(info.value)


@pytest.mark.parametrize("flag", ["--help", "-h", "-?", "--help=1"])
def test_help(flag: str) -> None:
    with pytest.raises(HelpRequested) as info:
        parse_proxy_command("out", ["--domain=example.org", flag])
    assert "usage: dkproxy out" in info.value.text
    assert "--sender_map=FILE" in info.value.text
    assert "--reject_fail" not in info.value.text
    assert "--reject_fail" in help_text("in")


def test_defaults() -> None:
    cfg = out([])
    assert str(cfg.listen) == "127.0.0.1:10027" and str(cfg.relay) == "127.0.0.1:10028"
    assert (cfg.reject_error, cfg.relay_timeout, cfg.min_rsa_bits) == (False, 300.0, 1024)
    assert cfg.max_message_size == 64 * 1024 * 1024 and cfg.workers is None
    cfg_in = inbound(["--hostname=mx.test"])
    assert str(cfg_in.listen) == "127.0.0.1:10025" and str(cfg_in.relay) == "127.0.0.1:10026"
    assert (cfg_in.max_signatures, cfg_in.min_key_bits, cfg_in.dns_timeout) == (5, 1024, 5.0)
    assert cfg_in.spf and cfg_in.dmarc and cfg_in.actions == {}


def test_reject_error_inbound_maps_to_tempfail_actions() -> None:
    cfg = inbound(["--reject-error", "--hostname=mx.test"])
    assert cfg.actions == {"dkim.temperror": "tempfail", "domainkeys.temperror": "tempfail"}


def test_map_without_signature_warns_that_domain_is_unused(tmp_path: Path) -> None:
    cfg = out(["--domain=example.org", "--sender_map=/etc/sender_map", "--keyfile=/k"])
    assert cfg.signatures == []  # DKIMproxy: no default signature once a map is given
    assert any("'domain' has no effect" in w for w in cfg.warnings)


# --- value parsers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("127.0.0.1:10027", None, ("127.0.0.1", 10027)),
        ("[::1]:25", None, ("::1", 25)),
        ("[2001:db8::1]", 53, ("2001:db8::1", 53)),
        ("localhost:25", None, ("localhost", 25)),
        ("mail.example.net", 25, ("mail.example.net", 25)),
        ("*:10027", None, ("0.0.0.0", 10027)),
    ],
)
def test_hostport_parse(text: str, default: int | None, expected: tuple[str, int]) -> None:
    parsed = HostPort.parse(text, default)
    assert (parsed.host, parsed.port) == expected


@pytest.mark.parametrize(
    "text", ["", "10027", "host:port", "[::1:25", "[nothex]:25", "bad host:25", "::1:25", "h:-1"]
)
def test_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


def test_size_and_level_parsers() -> None:
    assert parse_size("0") == 0
    assert parse_size("512k") == 512 * 1024
    assert parse_size("64MiB") == 64 * 1024 * 1024
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError):
        parse_size("lots")
    assert [parse_log_level(x) for x in ("0", "2", "4", "WARN", "notice")] == [
        "error",
        "info",
        "debug",
        "warning",
        "info",
    ]


def test_signature_list_parsing_matches_dkimproxy_syntax() -> None:
    sigs = parse_signature_list(
        "dkim(c=relaxed,a=rsa-sha256), domainkeys(c=nofws), "
        "dkim( key=/k/ed.key , s=ed1, d=$senderdomain, i=$sender, h=From:To )",
        "m:1",
    )
    assert [s.kind for s in sigs] == ["dkim", "domainkeys", "dkim"]
    assert (sigs[0].canonicalization, sigs[0].algorithm) == ("relaxed", "rsa-sha256")
    third = sigs[2]
    assert (third.key, third.selector, third.domain, third.identity) == (
        "/k/ed.key",
        "ed1",
        "$senderdomain",
        "$sender",
    )
    assert third.headers == ["from", "to"]
    assert all(s.source == "m:1" for s in sigs)
    with pytest.raises(ValueError, match="given twice"):
        parse_signature_list("dkim(s=a,selector=b)", "x")


# --- native TOML --------------------------------------------------------------------------------

TOML_OUT = """\
mode = "out"
listen = "127.0.0.1:2027"
relay = "[::1]:2028"
max_message_size = "1M"

[defaults]
key = "keys/default.key"
selector = "s1"
headers = "from:to:subject"

[[sign]]
match = ["Example.org", ".example.org"]
  [[sign.signature]]
  type = "dkim"
  [[sign.signature]]
  type = "domainkeys"
  canonicalization = "simple"

[[sign]]
match = "list-id:lists.example.org"
signature = [{ domain = "lists.example.org", key = "/abs/lists.key", selector = "l1" }]

[[sign]]
match = "test.example.org"

[daemon]
user = "dkim"
workers = 2
cidr_allow = ["127.0.0.1/32"]

[log]
level = "debug"
syslog = true
"""


def test_toml_outbound(tmp_path: Path) -> None:
    path = write(tmp_path / "out.toml", TOML_OUT)
    cfg = load_config_file(path)
    assert isinstance(cfg, OutboundConfig)
    assert str(cfg.listen) == "127.0.0.1:2027" and str(cfg.relay) == "[::1]:2028"
    assert cfg.max_message_size == 1024 * 1024
    assert cfg.keyfile == str(tmp_path / "keys" / "default.key")  # relative to the file
    assert cfg.selector == "s1"
    assert [r.match for r in cfg.rules] == [
        "example.org",
        ".example.org",
        "list-id:lists.example.org",
        "test.example.org",
    ]
    first = cfg.rules[0].signatures
    assert [s.kind for s in first] == ["dkim", "domainkeys"]
    assert first[0].headers == ["from", "to", "subject"]  # from [defaults]
    assert first[1].canonicalization == "simple"
    assert first[1].source == f"{path}: sign[0].signature[1]"
    assert cfg.rules[2].signatures[0].key == "/abs/lists.key"
    assert cfg.rules[3].signatures == []
    assert cfg.signatures == []  # no DKIMproxy default signature when rules exist
    assert (cfg.user, cfg.workers, cfg.cidr_allow) == ("dkim", 2, ["127.0.0.1/32"])
    assert (cfg.log_level, cfg.syslog) == ("debug", True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('mode = "out"\nlisten = "127.0.0.1:1"\nlistn = "x"\n', "listn: unknown key (allowed:"),
        (
            'mode = "out"\n[[sign]]\nmatch = "a.example"\n[[sign.signature]]\nkeyy = "/k"\n',
            "sign[0].signature[0].keyy: unknown key (allowed: type, key,",
        ),
        (
            'mode = "out"\n[[sign]]\nmatch = "a.example"\n[[sign.signature]]\ntype = "dk"\n',
            "sign[0].signature[0].type: expected 'dkim', 'domainkeys' or 'arc'",
        ),
        ('mode = "out"\nrelay_timeout = "soon"\n', "relay_timeout:"),
        ('mode = "out"\nmax_message_size = "huge"\n', "max_message_size: expected a size"),
        ('mode = "out"\nlisten = "127.0.0.1"\n', "listen: '127.0.0.1' has no port"),
        ('mode = "out"\n[[sign]]\nmatch = "bad pattern"\n', "sign[0].match: 'bad pattern'"),
        (
            'mode = "out"\n[[sign]]\nmatch = "a.example"\n[[sign]]\nmatch = "A.example"\n',
            "sign[1].match: 'A.example' is already matched by sign[0]",
        ),
        (
            'mode = "out"\n[[sign]]\nmatch = "a.example"\n[[sign.signature]]\n'
            'canonicalization = "nowsp"\n',
            "sign[0].signature[0]: c=nowsp",
        ),
        ('mode = "out"\n[daemon]\nmin_servers = -1\n', "min_servers"),
        ('mode = "sideways"\n', "mode: expected 'out' or 'in'"),
    ],
)
def test_toml_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert info.value.source == path
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_toml_or_dkimproxy_format_is_recognised(tmp_path: Path) -> None:
    # Valid TOML, but only "name = number" lines: still a DKIMproxy file.
    legacy = write(tmp_path / "dkimproxy_out.conf", "max_servers = 5\nmin_servers = 2\n")
    cfg = out(["--conf_file", legacy])
    assert (cfg.max_servers, cfg.min_servers) == (5, 2)
    native = write(tmp_path / "proxy.conf", 'listen = "127.0.0.1:2500"\n')
    assert out(["--conf_file", native]).listen.port == 2500
    assert out(["-c", native]).listen.port == 2500


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'mode = "out"\n\nlisten = 127.0.0.1:1\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert (info.value.source, info.value.line) == (path, 3)
    assert "TOML syntax error" in info.value.message


def test_toml_mode_mismatch(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'mode = "in"\nhostname = "mx.test"\n')
    with pytest.raises(ConfigError, match="configures dkproxy in, not dkproxy out"):
        parse_proxy_command("out", ["-c", path])


def test_toml_inbound_actions_and_command_line_override(tmp_path: Path) -> None:
    path = write(
        tmp_path / "in.toml",
        'mode = "in"\nhostname = "mx.example.org"\ndns_server = "127.0.0.1"\n'
        'reject_error = true\n[actions]\ndkim.fail = "reject"\n"spf.softfail" = "tempfail"\n'
        'dkim.temperror = "accept"\n',
    )
    cfg = inbound(["--config", path, "--hostname=other.example.org", "--max-signatures=3"])
    assert cfg.dns_server == HostPort(host="127.0.0.1", port=53)
    assert cfg.hostname == "other.example.org"
    assert cfg.max_signatures == 3
    # An explicit action beats what reject_error implies.
    assert cfg.actions == {
        "dkim.fail": "reject",
        "spf.softfail": "tempfail",
        "dkim.temperror": "accept",
        "domainkeys.temperror": "tempfail",
    }
    assert cfg.source_files == [path]


@pytest.mark.parametrize(
    ("actions", "expected"),
    [
        ('dkim.fial = "reject"', "unknown dkim result 'fial'"),
        ('bimi.fail = "reject"', "unknown method 'bimi'"),
        ('dkim.fail = "bounce"', "expected one of accept, tempfail, reject"),
    ],
)
def test_toml_bad_actions(tmp_path: Path, actions: str, expected: str) -> None:
    path = write(tmp_path / "in.toml", f'mode = "in"\nhostname = "mx.test"\n[actions]\n{actions}\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert expected in str(info.value)
    assert str(info.value).startswith(f"{path}: actions.")


def test_command_line_value_error_names_option_after_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "o.toml", 'mode = "out"\n[daemon]\nmax_servers = 0\n')
    with pytest.raises(ConfigError) as info:
        parse_proxy_command("out", ["-c", path])
    assert str(info.value).startswith(f"{path}: daemon.max_servers:")


# --- the shipped examples -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("dkimproxy_out.conf.example", "out"),
        ("dkimproxy_in.conf.example", "in"),
        ("dkproxy-out.toml.example", "out"),
        ("dkproxy-in.toml.example", "in"),
    ],
)
def test_shipped_examples_parse(tmp_path: Path, name: str, mode: str) -> None:
    target = tmp_path / name
    shutil.copy(CONF_DIR / name, target)
    cfg = load_config_file(str(target))
    assert cfg.mode == mode
    if isinstance(cfg, OutboundConfig) and name.endswith(".toml.example"):
        assert any(r.match.startswith("list-id:") for r in cfg.rules)
    if isinstance(cfg, InboundConfig):
        assert cfg.hostname == "mx.example.org"


def test_u_labels_in_toml_and_dkimproxy_config_are_stored_as_a_labels(tmp_path: Path) -> None:
    """`domain`, d= and [[sign]] patterns accept U-labels and A-labels alike (RFC 8616): one
    canonical form, so every comparison with a sender's domain meets."""
    toml = write(
        tmp_path / "out.toml",
        'mode = "out"\nlisten = "127.0.0.1:1"\nrelay = "127.0.0.1:2"\n'
        '[defaults]\nkey = "/k"\nselector = "s"\n'
        '[[sign]]\nmatch = ["bücher.example", "jörg@EXÄMPLE.org", ".straße.de",'
        ' "list-id:news.bücher.example", "xn--bcher-kva.test"]\n'
        '  [[sign.signature]]\n  type = "dkim"\n  domain = "BÜCHER.example"\n',
    )
    cfg = load_config_file(toml)
    assert isinstance(cfg, OutboundConfig)
    assert [r.match for r in cfg.rules] == [
        "xn--bcher-kva.example",
        "jörg@xn--exmple-cua.org",
        ".xn--strae-oqa.de",
        "list-id:news.xn--bcher-kva.example",
        "xn--bcher-kva.test",
    ]
    assert {s.domain for r in cfg.rules for s in r.signatures} == {"xn--bcher-kva.example"}
    legacy = write(tmp_path / "out.conf", "keyfile /k\nselector s\ndomain exämple.org,Example.COM\n"
                   "signature dkim(d=bücher.example)\n")  # fmt: skip
    cfg = load_config_file(legacy)
    assert isinstance(cfg, OutboundConfig)
    assert cfg.domains == ["xn--exmple-cua.org", "example.com"]
    assert cfg.signatures[0].domain == "xn--bcher-kva.example"
    bad = write(tmp_path / "bad.conf", "keyfile /k\nselector s\ndomain ex_ä.org\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(bad)
    assert info.value.line == 3 and "ex_ä.org" in info.value.message


def test_allow_body_length_option(tmp_path: Path) -> None:
    path = write(tmp_path / "in.toml", 'mode = "in"\nallow_body_length = true\n')
    cfg = load_config_file(path)
    assert isinstance(cfg, InboundConfig) and cfg.allow_body_length is True
    conf = load_config_file(write(tmp_path / "in.conf", "reject_fail 1\n"))
    assert isinstance(conf, InboundConfig) and conf.allow_body_length is False

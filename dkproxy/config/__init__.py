"""Configuration: DKIMproxy 1.4 command lines and conf files, and dkproxy's native TOML.

One module per job: `options` (the option table and the conversion of `name value` settings),
`dkimproxy_conf` (conf files), `command_line` (command lines and --help), `toml` (the native
format), `models` (the validated pydantic models), `loader` (building them, load_config_file),
`signatures` (signature specifiers), `values` (shared value syntax), `errors` (ConfigError,
FILE:LINE messages) and `relay` (`dkproxy relay`'s own TOML file). This package re-exports the
names other packages use.

dkproxy must start from an unchanged DKIMproxy 1.4 init script, so the first job of this package
is to read what `dkimproxy.out` / `dkimproxy.in` read, with the same meaning. Facts taken from
DKIMproxy 1.4.1 (scripts/dkimproxy.out, scripts/dkimproxy.in, lib/LookupMap.pm) and the
Net::Server it is built on (Net::Server::process_args / _read_conf):

* Command line: `dkimproxy.out [options] LISTENADDR:PORT RELAYADDR:PORT`. Net::Server takes
  `--name=value`, `--name value` and even a bare `name=value`; a flag followed by another
  `--option` (or nothing) is 1. Whatever Net::Server does not know goes to Getopt::Long, which
  only knows `--reject-error` (and `--reject-fail` in dkimproxy.in) and `--help|-?`; anything
  else there is "Unknown option" and a usage error. Exactly zero or two positional arguments
  (listen, relay); they override `--listen`/`--relay`. A listen address needs a port; a relay
  port defaults to 25. `[v6addr]:port` is accepted.
* Conf file (`--conf_file`): one option per line, `name value` (also `name=value`,
  `name: value`, `--name value`); an unescaped `#` starts a comment anywhere on the line;
  `\\#` is a literal `#`. The value is the rest of the line (Net::Server 2.x; older releases
  kept only the first word, hence "comma-separated, no spaces" in DKIMproxy's sample).
  Options given on the command line win over the file; a list option
  (`signature`) given on the command line replaces the file's list. Within one source a
  repeated single-valued option keeps its last value; `signature` lines accumulate.
* dkimproxy.out options: listen, relay, relay_host, relay_port, domain (comma-separated),
  keyfile, selector, method, dkim_method, domainkeys_method, identity, signature (repeatable),
  sender_map, listid_map, reject_error / --reject-error, debugtrace, daemonize (= setsid),
  pidfile (= pid_file), plus Net::Server's (user, group, chroot, log_level, log_file, host,
  port, allow, deny, cidr_allow, cidr_deny, ...) and Net::Server::PreFork's (min_servers,
  max_servers, min_spare_servers, max_spare_servers, max_requests, ...).
  dkimproxy.in: listen, relay, relay_host, relay_port, hostname, reject_fail / --reject-fail,
  reject_error / --reject-error, debugtrace and the same daemon options.
* Without any `signature`, `sender_map` or `listid_map`, dkimproxy.out adds one default
  signature, `dkim`, built from keyfile/selector/domain. With a map but no `signature` there is
  no default signature at all: unmatched mail is not signed (and `domain` has no effect).
* `signature TYPE(opt=value,...)`: TYPE is dkim or domainkeys; options key (also keyfile),
  s/selector, d/domain, c/method, a/algorithm, h/headers, i/identity. Method defaults: dkim
  `relaxed` (Mail::DKIM reads a lone `relaxed` as relaxed/simple), domainkeys `nofws`;
  `--method` applies to both kinds, `--dkim_method`/`--domainkeys_method` to one.

Where DKIMproxy is silent or surprising, dkproxy is stricter and says where the problem is:
an unknown option in a conf file is an error naming FILE:LINE (Net::Server skips it silently,
so a typo such as `selecter` used to go unnoticed); a bare flag line (`reject_error`) means
"on" (Net::Server ignored such a line although dkimproxy.in's own manual shows one); unknown
signature options are errors (DKIMproxy ignored them); `nowsp` and DKIM `rsa-sha1` are
refused at start-up (no current verifier reads nowsp; RFC 8301 forbids rsa-sha1).
Net::Server's `%XX` unescaping of values is not reproduced (it decoded a single hex digit,
e.g. "%20" became "\\x02" + "0").

The native TOML format (`-c FILE.toml`) is documented in conf/dkproxy-out.toml.example and
conf/dkproxy-in.toml.example; it is validated with `extra='forbid'`, so a misspelt key is an
error naming the file and the key path.
"""

from __future__ import annotations

from dkproxy.config.command_line import (
    help_text,
    parse_proxy_command,
)
from dkproxy.config.errors import (
    COMMAND_LINE,
    ConfigError,
    HelpRequested,
    format_validation_error,
    read_text,
)
from dkproxy.config.loader import (
    build_config,
    load_config_file,
)
from dkproxy.config.models import (
    DEFAULT_METRICS_PORT,
    AnyConfig,
    ArcSealConfig,
    HostPort,
    InboundConfig,
    OutboundConfig,
    SignatureTemplate,
    SignRule,
    check_action_key,
    parse_metrics_address,
)
from dkproxy.config.signatures import (
    canonical_identity,
    check_canonicalization,
    check_identity_syntax,
    check_selector,
    make_signature_template,
    parse_header_list,
    parse_signature_list,
    parse_signature_specifier,
    split_by_commas,
)
from dkproxy.config.toml import (
    TomlLog,
    TomlOut,
    normalise_pattern,
    toml_values,
)
from dkproxy.config.values import (
    ACTION_RESULTS,
    ACTIONS,
    ALGORITHMS,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_RELAY_PORT,
    DK_CANONICALIZATIONS,
    DKIM_CANONICALIZATIONS,
    DOMAIN_MACROS,
    IDENTITY_MACROS,
    LOG_LEVELS,
    MIB,
    Action,
    Mode,
    check_macros,
    is_domain,
    is_safe_local_part,
    parse_bool,
    parse_domain_list,
    parse_float,
    parse_int,
    parse_log_level,
    parse_size,
    to_alabels,
)

__all__ = [
    "ACTIONS",
    "ACTION_RESULTS",
    "ALGORITHMS",
    "COMMAND_LINE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_METRICS_PORT",
    "DEFAULT_RELAY_PORT",
    "DKIM_CANONICALIZATIONS",
    "DK_CANONICALIZATIONS",
    "DOMAIN_MACROS",
    "IDENTITY_MACROS",
    "LOG_LEVELS",
    "MIB",
    "Action",
    "AnyConfig",
    "ArcSealConfig",
    "ConfigError",
    "HelpRequested",
    "HostPort",
    "InboundConfig",
    "Mode",
    "OutboundConfig",
    "SignRule",
    "SignatureTemplate",
    "TomlLog",
    "TomlOut",
    "build_config",
    "canonical_identity",
    "check_action_key",
    "check_canonicalization",
    "check_identity_syntax",
    "check_macros",
    "check_selector",
    "format_validation_error",
    "help_text",
    "is_domain",
    "is_safe_local_part",
    "load_config_file",
    "make_signature_template",
    "normalise_pattern",
    "parse_bool",
    "parse_domain_list",
    "parse_float",
    "parse_header_list",
    "parse_int",
    "parse_log_level",
    "parse_metrics_address",
    "parse_proxy_command",
    "parse_signature_list",
    "parse_signature_specifier",
    "parse_size",
    "read_text",
    "split_by_commas",
    "to_alabels",
    "toml_values",
]

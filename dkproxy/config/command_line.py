"""DKIMproxy command lines (`dkproxy out [options] LISTEN RELAY`) and `--help`."""

from __future__ import annotations

import re
import textwrap

from dkproxy.config.dkimproxy_conf import parse_dkimproxy_conf
from dkproxy.config.errors import COMMAND_LINE, ConfigError, HelpRequested
from dkproxy.config.loader import build_config, looks_like_toml
from dkproxy.config.models import AnyConfig
from dkproxy.config.options import (
    BY_NAME,
    Setting,
    Values,
    apply_settings,
    lookup_option,
    normalise_name,
    resolve_addresses,
    unknown_option_message,
)
from dkproxy.config.toml import toml_settings
from dkproxy.config.values import FALSE_WORDS, TRUE_WORDS, Mode

# ---------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------


def parse_proxy_command(mode: Mode, argv: list[str]) -> AnyConfig:
    """Parse the arguments after `dkproxy out` / `dkproxy in` (all dkimproxy.* forms).

    Accepts `--opt=value`, `--opt value`, `-opt`, hyphens or underscores, `--no-FLAG`,
    DKIMproxy's bare `opt=value`, `-c/--config FILE` or DKIMproxy's `--conf_file=FILE` (either
    format, told apart as load_config_file does) and the positional `LISTEN RELAY`. The
    command line wins over the file. Raises ConfigError, or HelpRequested for --help/-h/-?.
    """
    settings: list[Setting] = []
    positional: list[tuple[str, str]] = []
    conf_file: str | None = None
    index = 0
    only_positional = False
    while index < len(argv):
        arg = argv[index]
        index += 1
        if only_positional or not arg.startswith("-") or arg == "-":
            name, eq, value = arg.partition("=")
            option = lookup_option(normalise_name(name), mode) if eq and "." not in name else None
            if option is not None and not only_positional:
                # Net::Server also takes a bare "name=value" argument.
                settings.append(Setting(option, value, f"{COMMAND_LINE}: {name}", name))
            elif eq and not only_positional and re.fullmatch(r"[A-Za-z_][\w-]*", name):
                raise ConfigError(
                    COMMAND_LINE,
                    None,
                    f"{arg}: " + unknown_option_message(normalise_name(name), mode),
                )
            else:
                role = "listen" if not positional else "relay"
                positional.append((arg, f"{COMMAND_LINE}: {role} argument"))
            continue
        if arg == "--":
            only_positional = True
            continue
        body = arg[2:] if arg.startswith("--") else arg[1:]
        name, eq, value_text = body.partition("=")
        value: str | None = value_text if eq else None
        normal = normalise_name(name)
        spelled = "--" + name if arg.startswith("--") else "-" + name
        if normal in ("help", "h", "?"):
            raise HelpRequested(help_text(mode))
        if normal in ("c", "config", "conf_file", "conffile"):
            if value is None:
                if index >= len(argv):
                    raise ConfigError(COMMAND_LINE, None, f"{spelled}: needs a file name")
                value = argv[index]
                index += 1
            if conf_file is not None and conf_file != value:
                raise ConfigError(
                    COMMAND_LINE,
                    None,
                    f"{spelled}: only one configuration file can be given (already {conf_file})",
                )
            conf_file = value
            continue
        option = lookup_option(normal, mode)
        negated = False
        if option is None and normal.startswith("no_"):
            candidate = lookup_option(normal[3:], mode)
            if candidate is not None and candidate.kind == "bool":
                option, negated = candidate, True
        if option is None:
            raise ConfigError(
                COMMAND_LINE, None, f"{spelled}: " + unknown_option_message(normal, mode)
            )
        if option.kind == "ignore":
            if value is None and index < len(argv) and not argv[index].startswith("--"):
                value = argv[index]  # Net::Server: the next word is the value
                index += 1
        elif option.kind == "bool":
            if negated:
                if value is not None:
                    raise ConfigError(COMMAND_LINE, None, f"{spelled}: takes no value")
                value = "0"
            elif (
                value is None
                and index < len(argv)
                and argv[index].lower() in (TRUE_WORDS | FALSE_WORDS) - {""}
            ):
                # Net::Server takes the next word as the flag's value ("--daemonize 1").
                value = argv[index]
                index += 1
        elif value is None:
            if index >= len(argv):
                raise ConfigError(COMMAND_LINE, None, f"{spelled}: needs a value")
            value = argv[index]
            index += 1
        settings.append(Setting(option, value, f"{COMMAND_LINE}: {spelled}", spelled))

    if len(positional) not in (0, 2):
        shown = " ".join(text for text, _ in positional)
        raise ConfigError(
            COMMAND_LINE,
            None,
            f"wrong number of arguments ({shown}); expected LISTENADDR:PORT RELAYADDR:PORT or none",
        )

    files: list[str] = []
    acc = Values()
    if conf_file is not None:
        path = conf_file
        files.append(path)
        if looks_like_toml(path):
            _, acc = toml_settings(path, mode)
        else:
            file_settings = parse_dkimproxy_conf(path, mode)
            apply_settings(mode, file_settings, acc, replace=False)
            resolve_addresses(acc, [])
            acc.address_parts.clear()
    apply_settings(mode, settings, acc, replace=True)
    resolve_addresses(acc, positional)
    return build_config(mode, acc, files)


def help_text(mode: Mode) -> str:
    """Usage text for `dkproxy out|in --help`, generated from the option table."""
    program = f"dkproxy {mode}"
    legacy = "dkimproxy.out" if mode == "out" else "dkimproxy.in"
    lines = [
        f"usage: {program} [options] [LISTENADDR:PORT RELAYADDR:PORT]",
        f"       {program} -c FILE.toml [options]",
        f"       {program} --conf_file=FILE [options]   ({legacy} configuration file)",
        "",
        f"Accepts every {legacy} 1.4 option. Options may be written --opt=value, --opt value,",
        "with - or _; flags take --no-FLAG. Command-line options override the file.",
        "",
        "  -c, --config FILE        configuration file: native TOML or DKIMproxy format",
        "  --conf_file=FILE         the same (DKIMproxy's spelling)",
        "  -h, --help               show this text",
    ]
    sections = (
        (
            "SMTP",
            "listen relay reject_error hostname relay_timeout max_message_size workers metrics",
        ),
        (
            "limits",
            "max_recipients max_messages_per_session max_sessions max_command_line "
            "max_header_size max_header_fields command_timeout data_timeout max_dns_answers",
        ),
        (
            "signing",
            "domain keyfile selector method dkim_method domainkeys_method identity signature "
            "sender_map listid_map min_rsa_bits",
        ),
        (
            "verifying",
            "reject_fail dns_server dns_timeout max_signatures min_key_bits allow_sha1 "
            "allow_body_length spf dmarc",
        ),
        (
            "daemon",
            "daemonize user group pidfile chroot min_servers max_servers min_spare_servers "
            "max_spare_servers max_requests cidr_allow cidr_deny xforward_hosts",
        ),
        ("logging", "log_level syslog syslog_facility log_file debugtrace"),
    )
    for title, names in sections:
        options = [BY_NAME[n] for n in names.split() if mode in BY_NAME[n].modes]
        if not options:
            continue
        lines += ["", f"{title} options:"]
        for option in options:
            flag = f"--{option.name}" + (f"={option.metavar}" if option.metavar else "")
            lines.extend(
                textwrap.wrap(
                    option.help,
                    width=96,
                    initial_indent=f"  {flag:<30} ",
                    subsequent_indent=" " * 33,
                )
            )
    return "\n".join(lines) + "\n"

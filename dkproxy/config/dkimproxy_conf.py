"""DKIMproxy 1.4 conf files (`dkimproxy_out.conf`): Net::Server's `name value` lines, and
guessing a file's mode from its options or name."""

from __future__ import annotations

import os
import re

from dkproxy.config.errors import ConfigError, read_text
from dkproxy.config.options import (
    BOTH_MODES,
    BY_NAME,
    IN_ONLY,
    OUT_ONLY,
    Setting,
    lookup_option,
    normalise_name,
    unknown_option_message,
)
from dkproxy.config.values import Mode

# ---------------------------------------------------------------------------------------------
# DKIMproxy conf files
# ---------------------------------------------------------------------------------------------

#: Net::Server's `name value`, `name=value`, `name: value`; a colon only separates right after
#: the name, so "cidr_allow ::1" keeps its value.
_CONF_LINE_RE = re.compile(r"(?:--)?([A-Za-z_][\w-]*)(?:\s*=\s*|:\s*|\s+)(.*)")
_CONF_FLAG_RE = re.compile(r"(?:--)?([A-Za-z_][\w-]*)")


def _strip_comment(line: str) -> str:
    """Net::Server: an unescaped # starts a comment; \\# is a literal #."""
    match = re.match(r"(.*?)(?<!\\)#", line)
    if match:
        line = match.group(1)
    return line.replace("\\#", "#")


def parse_dkimproxy_conf(path: str, mode: str | None, text: str | None = None) -> list[Setting]:
    """Read a dkimproxy_out.conf / dkimproxy_in.conf into settings (mode None: guess later)."""
    if text is None:
        text = read_text(path)
    settings: list[Setting] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _strip_comment(raw).strip()
        if not line:
            continue
        match = _CONF_LINE_RE.fullmatch(line)
        if match:
            name, value = match.group(1), match.group(2).strip()
            if value == "":
                value = None  # "reject_error  " is a bare flag
        else:
            flag = _CONF_FLAG_RE.fullmatch(line)
            if not flag:
                raise ConfigError(path, number, f"cannot parse {line!r}; expected 'name value'")
            name, value = flag.group(1), None
        normal = normalise_name(name)
        where = f"{path}:{number}"
        if normal in ("conf_file", "config"):
            raise ConfigError(path, number, f"{name}: a configuration file cannot include another")
        if normal == "help":
            raise ConfigError(path, number, "help: not a configuration option")
        option = BY_NAME.get(normal) if mode is None else lookup_option(normal, mode)
        if option is None:
            message = unknown_option_message(normal, mode or "out")
            raise ConfigError(path, number, message)
        if value is None and option.kind not in ("bool", "ignore"):
            raise ConfigError(path, number, f"{name}: needs a value")
        settings.append(Setting(option, value, where, name))
    return settings


def guess_mode(path: str, settings: list[Setting]) -> Mode:
    kinds = {mode for s in settings for mode in s.option.modes if s.option.modes != BOTH_MODES}
    if kinds == {"out"}:
        return "out"
    if kinds == {"in"}:
        return "in"
    if kinds == {"out", "in"}:
        outs = sorted({s.option.name for s in settings if s.option.modes == OUT_ONLY})
        ins = sorted({s.option.name for s in settings if s.option.modes == IN_ONLY})
        raise ConfigError(
            path,
            None,
            f"mixes outbound options ({', '.join(outs)}) and inbound options ({', '.join(ins)})",
        )
    base = os.path.basename(path).lower()
    if re.search(r"[._-]out\b|out[._-]|\.out$", base):
        return "out"
    if re.search(r"[._-]in\b|in[._-]|\.in$", base):
        return "in"
    raise ConfigError(
        path,
        None,
        "cannot tell whether this is an outbound or inbound "
        "configuration; name the mode (dkproxy out|in, or --mode)",
    )

"""Building the models from collected values, and loading a configuration file of either
format (`load_config_file`)."""

from __future__ import annotations

import re
import tomllib
from typing import Any

from pydantic import ValidationError

from dkproxy.config.dkimproxy_conf import guess_mode, parse_dkimproxy_conf
from dkproxy.config.errors import COMMAND_LINE, ConfigError, read_text
from dkproxy.config.models import (
    AnyConfig,
    CommonConfig,
    InboundConfig,
    OutboundConfig,
    SignatureTemplate,
)
from dkproxy.config.options import Values, apply_settings, resolve_addresses
from dkproxy.config.toml import toml_settings
from dkproxy.config.values import Mode

# ---------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------


def _load_toml(path: str, mode: Mode | None) -> AnyConfig:
    file_mode, acc = toml_settings(path, mode)
    return build_config(file_mode, acc, [path])


def build_config(mode: Mode, acc: Values, files: list[str]) -> AnyConfig:
    values = dict(acc.values)
    values.pop("mode", None)
    if mode == "in":
        actions = dict(values.get("actions", {}))
        if values.get("reject_error"):
            for name in ("dkim.temperror", "domainkeys.temperror"):
                actions.setdefault(name, "tempfail")
        if values.get("reject_fail"):
            actions.setdefault("dmarc.reject", "reject")
        values["actions"] = actions
    else:
        _out_checks(acc, values, files)
    values["source_files"] = files
    values["warnings"] = list(acc.warnings)
    values["sources"] = dict(acc.sources)
    cls: type[CommonConfig] = OutboundConfig if mode == "out" else InboundConfig
    try:
        return cls.model_validate(values)  # type: ignore[return-value]
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        where = acc.sources.get(name)
        if where is None:
            where = files[-1] if files else COMMAND_LINE
            raise ConfigError(where, None, f"{name}: {message}") from None
        if re.fullmatch(r".+:\d+", where):
            raise ConfigError.at(where, f"{name}: {message}") from None
        raise ConfigError.at(where, message) from None


def _out_checks(acc: Values, values: dict[str, Any], files: list[str]) -> None:
    """DKIMproxy's default-signature rule, and warnings about options that do nothing."""
    has_maps = bool(values.get("sender_map") or values.get("listid_map") or values.get("rules"))
    if not values.get("signatures") and not has_maps:
        # dkimproxy.out: 'unless (@signature_arg || sender_map || listid_map) { ("dkim") }'
        where = files[-1] if files else COMMAND_LINE
        values["signatures"] = [SignatureTemplate(kind="dkim", source=where)]
    elif not values.get("signatures") and values.get("domains"):
        acc.warnings.append(
            f"{acc.sources.get('domains')}: domain is set but there is no 'signature' option: "
            "with a sender_map/listid_map DKIMproxy adds no default signature, so unmatched "
            "mail is not signed and 'domain' has no effect"
        )


def load_config_file(path: str, mode: Mode | None = None) -> AnyConfig:
    """Load a TOML or DKIMproxy-style file on its own (for `dkproxy check-config`).

    TOML is recognised by a .toml extension or by parsing as TOML; a DKIMproxy file's mode
    is guessed from its options (domain/keyfile/signature... = out; reject_fail = in) or
    its name (dkimproxy_out.conf), unless `mode` is given.
    """
    if looks_like_toml(path):
        return _load_toml(path, mode)
    text = read_text(path)
    settings = parse_dkimproxy_conf(path, mode, text)
    if mode is None:
        mode = guess_mode(path, settings)
        settings = parse_dkimproxy_conf(path, mode, text)
    acc = Values()
    apply_settings(mode, settings, acc, replace=False)
    resolve_addresses(acc, [])
    return build_config(mode, acc, [path])


def looks_like_toml(path: str) -> bool:
    """A .toml name, or content that parses as TOML with a table, list, string or `mode`.

    A DKIMproxy file can be valid TOML only if every line is `name = number|true|false`;
    such a file is still read as a DKIMproxy file.
    """
    if path.lower().endswith(".toml"):
        return True
    try:
        text = read_text(path)
    except ConfigError:
        return False
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return "mode" in doc or any(isinstance(v, dict | list | str) for v in doc.values())

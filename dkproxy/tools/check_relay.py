"""`dkproxy check-config relay.toml`: load a relay configuration as `dkproxy relay` would and
print what it does: listeners and TLS, who may relay, the smarthost hop, limits, signing."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from dkproxy.config import ConfigError
from dkproxy.config.relay import RelayConfig, load_relay_config, looks_like_relay_file
from dkproxy.relay.state import RelayService


def is_relay_file(path: str) -> bool:
    return looks_like_relay_file(path)


def check_relay_config(path: str, args: argparse.Namespace, out: TextIO) -> int:
    """Load `path` with its credentials, map, keys and certificate; print the summary.
    Exit status 0 usable, 1 not (the error first, as "FILE: key: message")."""
    from dkproxy.policy import SigningPolicy
    from dkproxy.tools import dnscheck
    from dkproxy.tools.keytools import describe_signing

    try:
        cfg = load_relay_config(path)
        service = RelayService(cfg)
        policy = SigningPolicy.from_config(cfg.signing)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        print(f"dkproxy check-config: {path}: configuration NOT usable", file=sys.stderr)
        return 1
    print(f"{path}: relay configuration", file=out)
    _describe(cfg, service, out)
    warnings = list(cfg.warnings)
    warnings.extend(describe_signing(policy, cfg.user, cfg.group, out))
    for warning in warnings:
        print(f"warning: {warning}", file=out)
    print("configuration ok", file=out)
    if args.dns:
        return dnscheck.check_signing_keys(policy.signing_keys(), args, out)
    return 0


def _describe(cfg: RelayConfig, service: RelayService, out: TextIO) -> None:
    state = service.state
    tls = "STARTTLS" if cfg.certificate else "no TLS"
    if cfg.certificate and cfg.require_tls:
        tls += " required before MAIL and AUTH"
    for address in cfg.listen:
        print(f"listen  {address} ({tls})", file=out)
    for address in cfg.tls_listen:
        print(f"listen  {address} (implicit TLS)", file=out)
    if cfg.certificate:
        print(f"certificate  {cfg.certificate}, key {cfg.key}", file=out)
    if state.credentials is not None:
        print(f"AUTH PLAIN LOGIN after TLS: {len(state.credentials)} logins in "
              f"{cfg.credentials}", file=out)  # fmt: skip
        if state.login_map is not None:
            print(f"sender-login map  {cfg.sender_login_map}: {len(state.login_map.owners)} "
                  "entries", file=out)  # fmt: skip
        else:
            print("sender-login map  none: every login may send as any address", file=out)
        print(f"AUTH failures  {cfg.max_auth_failures} per client in {cfg.failure_window:g}s "
              f"before 421; delay {cfg.failure_delay:g}s per failure", file=out)  # fmt: skip
    else:
        print("AUTH  not offered", file=out)
    if cfg.relay_without_auth:
        print(f"relay without AUTH  {', '.join(cfg.relay_without_auth)}", file=out)
    elif state.credentials is None:
        print("relay without AUTH  any client (loopback listeners only)", file=out)
    hop = cfg.smarthost
    trust = "not verified" if not hop.tls_verify else (hop.ca_file or "system trust store")
    tls_text = "no TLS" if hop.tls == "none" else f"{hop.tls} TLS, certificate: {trust}"
    print(f"smarthost  {hop.address} ({tls_text})", file=out)
    if hop.username:
        print(f"smarthost login  {hop.username} (password from file)", file=out)
    print(f"smarthost timeouts  connect {hop.connect_timeout:g}s, commands {hop.timeout:g}s",
          file=out)  # fmt: skip
    size = f"{cfg.max_message_size} bytes" if cfg.max_message_size else "no limit"
    print(f"limits  size {size}, {cfg.max_recipients} recipients, {cfg.max_sessions} "
          f"sessions, {cfg.max_connections_per_minute} connections/minute per client",
          file=out)  # fmt: skip

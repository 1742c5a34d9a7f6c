"""Set-up tools: `dkproxy keygen`, `dkproxy dnscheck`, `dkproxy check-config`.

They exist so that an administrator learns about a broken set-up before the first message
leaves, not from a receiver's report days later. `check-config` loads a configuration exactly
as the daemon does (same parser, same SigningPolicy, every key and map file), prints which
sender gets which signatures, and adds what the daemon cannot know at start-up: a key file
others can read, or one the daemon's user cannot read on a reload.

Exit statuses: 0 all good; 1 a problem found (bad configuration, DNS not right, file in the
way); 2 a usage error.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import stat
import sys
from typing import TYPE_CHECKING, TextIO

from dkproxy.config import ConfigError, InboundConfig, OutboundConfig, load_config_file
from dkproxy.mailauth.keys import SigningKey
from dkproxy.tools import dnscheck, keygen

if TYPE_CHECKING:
    from dkproxy.policy import SigningPolicy


def key_file_warnings(path: str, user: str | None, group: str | None) -> list[str]:
    """Permission problems of a key file that loaded fine for the current user."""
    warnings: list[str] = []
    try:
        st = os.stat(path)
    except OSError as exc:
        return [f"key file {path}: cannot stat ({exc.strerror or exc})"]
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IROTH:
        warnings.append(
            f"key file {path} is readable by every user (mode {mode:04o}); chmod 600 it "
            "(or 640 with the proxy's group)"
        )
    if user and not _readable_by(st, user, group):
        warnings.append(
            f"key file {path} is not readable by user {user}, which the proxy runs as after "
            f"start-up: a reload (SIGHUP) would fail; chown {user} {path}"
        )
    return warnings


def _readable_by(st: os.stat_result, user: str, group: str | None) -> bool:
    """Whether `user` (with `group` or its primary group, and its supplementary groups)
    may read a file with these owner/mode bits. Unknown users count as readable: the daemon
    itself reports those."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return True
    if entry.pw_uid == 0:
        return True
    mode = st.st_mode
    if st.st_uid == entry.pw_uid:
        return bool(mode & stat.S_IRUSR)
    gids = {entry.pw_gid}
    if group:
        try:
            gids.add(grp.getgrnam(group).gr_gid)
        except KeyError:
            return True
    gids.update(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)
    if st.st_gid in gids:
        return bool(mode & stat.S_IRGRP)
    return bool(mode & stat.S_IROTH)


def _describe_keys(targets: list[tuple[str, str, SigningKey, str]]) -> list[str]:
    """One line per key file: type, size, and the (s=, d=) pairs it signs for."""
    by_path: dict[str, tuple[SigningKey, list[str]]] = {}
    for domain, selector, key, _source in targets:
        entry = by_path.setdefault(key.path, (key, []))
        label = f"s={selector} d={domain}"
        if label not in entry[1]:
            entry[1].append(label)
    return [
        f"  {path}  {key.kind} {key.bits} bits  ({', '.join(uses)})"
        for path, (key, uses) in by_path.items()
    ]


def check_config(args: argparse.Namespace, out: TextIO) -> int:
    from dkproxy.policy import SigningPolicy

    path = args.file
    from dkproxy.tools import check_relay as check

    if check.is_relay_file(path):
        return check.check_relay_config(path, args, out)
    try:
        cfg = load_config_file(path, args.mode)
        policy = SigningPolicy.from_config(cfg) if isinstance(cfg, OutboundConfig) else None
        if cfg.arc_seal is not None:
            from dkproxy.mailauth.arc import load_seal_params

            load_seal_params(cfg.arc_seal)  # the daemon refuses to start on a bad key too
    except ConfigError as exc:
        # "FILE:LINE: message" first on the line, so editors and grep can jump to it.
        print(str(exc), file=sys.stderr)
        print(f"dkproxy check-config: {path}: configuration NOT usable", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{path}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    kind = "outbound (signing)" if isinstance(cfg, OutboundConfig) else "inbound (verifying)"
    print(f"{path}: {kind} configuration", file=out)
    print(f"listen  {cfg.listen}", file=out)
    print(f"relay   {cfg.relay}", file=out)
    # Where the daemon will serve Prometheus metrics (what the scraper must be pointed at).
    shown = f"http://{cfg.metrics}/metrics" if cfg.metrics is not None else "off"
    print(f"metrics: {shown}", file=out)
    warnings: list[str] = []
    status = 0
    if isinstance(cfg, InboundConfig):
        _describe_inbound(cfg, out)
        warnings.extend(cfg.warnings)
    else:
        assert policy is not None
        warnings.extend(describe_signing(policy, cfg.user, cfg.group, out))
        if cfg.arc_seal is not None:
            seal = cfg.arc_seal
            print(f"ARC seal on every message: d={seal.domain} s={seal.selector} "
                  f"key={seal.key}, results of {seal.authserv_id}", file=out)  # fmt: skip
    for warning in warnings:
        print(f"warning: {warning}", file=out)
    print("configuration ok", file=out)

    if args.dns:
        if isinstance(cfg, InboundConfig):
            print("dnscheck: an inbound configuration signs with no keys", file=out)
        else:
            assert policy is not None
            status = dnscheck.check_signing_keys(policy.signing_keys(), args, out)
    return status


def describe_signing(
    policy: SigningPolicy, user: str | None, group: str | None, out: TextIO
) -> list[str]:
    """Print the keys and signing rules of `policy`; return the warnings to print after."""
    warnings: list[str] = []
    keys = policy.signing_keys()
    print("keys:", file=out)
    for line in _describe_keys(keys) or ["  (none)"]:
        print(line, file=out)
    print("signing rules, in look-up order (List-Id, then sender, then default):", file=out)
    for line in policy.describe():
        if line.startswith("warning: "):
            warnings.append(line.removeprefix("warning: "))
        else:
            print(f"  {line}", file=out)
    for key_path in dict.fromkeys(key.path for _, _, key, _ in keys):
        warnings.extend(key_file_warnings(key_path, user, group))
    return warnings


def _describe_inbound(cfg: InboundConfig, out: TextIO) -> None:
    print(f"authserv-id (Authentication-Results)  {cfg.hostname}", file=out)
    dns_server = str(cfg.dns_server) if cfg.dns_server else "system resolver"
    print(f"DNS  {dns_server}, timeout {cfg.dns_timeout:g}s", file=out)
    print(f"SPF {'on' if cfg.spf else 'off'}, DMARC {'on' if cfg.dmarc else 'off'}", file=out)
    print(f"at most {cfg.max_signatures} signatures checked per message", file=out)
    trusted = ", ".join(cfg.arc_trusted_sealers) or "none"
    print(f"ARC {'on' if cfg.arc else 'off'}, trusted sealers: {trusted}", file=out)
    if cfg.arc_seal is not None:
        seal = cfg.arc_seal
        whose = seal.authserv_id or f"{cfg.hostname} (this pass)"
        print(f"ARC seal d={seal.domain} s={seal.selector} key={seal.key}, results of {whose}",
              file=out)  # fmt: skip
    print("actions (results not listed are accepted):", file=out)
    for result, action in sorted(cfg.actions.items()) or [("(none)", "")]:
        print(f"  {result}  {action}".rstrip(), file=out)


def make_check_config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkproxy check-config",
        description="Load a configuration (DKIMproxy style or TOML) with its keys and map "
        "files, print the effective signing rules, and report errors as FILE:LINE.",
    )
    parser.add_argument("file", metavar="FILE")
    parser.add_argument(
        "--mode", choices=("out", "in"), help="direction, when the file does not make it clear"
    )
    parser.add_argument(
        "--dns", action="store_true", help="also run dnscheck for every key the rules use"
    )
    parser.add_argument(
        "--domain",
        "-d",
        action="append",
        default=[],
        help="with --dns: domain(s) to check for a d=$senderdomain signature",
    )
    dnscheck.add_dns_options(parser)
    return parser


def main(command: str, argv: list[str], stdout: TextIO | None = None) -> int:
    """Dispatch `dkproxy keygen|dnscheck|check-config ARGS`; returns the exit status."""
    out = stdout or sys.stdout
    if command == "keygen":
        return keygen.main(argv, out)
    if command == "dnscheck":
        return dnscheck.main(argv, out)
    if command == "check-config":
        parser = make_check_config_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        if args.timeout <= 0:
            print("dkproxy check-config: --timeout must be positive", file=sys.stderr)
            return 2
        try:
            return check_config(args, out)
        except ValueError as exc:  # a malformed --dns-server
            print(f"dkproxy check-config: {exc}", file=sys.stderr)
            return 2
    print(f"dkproxy: unknown command {command!r}", file=sys.stderr)
    return 2

"""Process set-up around the proxy: logging, client access lists, pid file, privileges.

These are DKIMproxy's Net::Server options. A set-up may rely on `cidr_allow` to keep strangers
off the signing port, so every option that is accepted is enforced; none is silently ignored.
Order at start-up (see cli.py): bind the port and load keys as root, then chroot, drop
privileges, write the pid file, and only then serve.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import logging.handlers
import os
import pwd
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("dkproxy.daemon")

_FACILITIES = logging.handlers.SysLogHandler.facility_names


def setup_logging(
    level: str = "info",
    *,
    use_syslog: bool = False,
    facility: str = "mail",
    ident: str | None = None,
    log_file: str | None = None,
) -> None:
    """One line per event: to stderr by default (journald adds the time), syslog or a file."""
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    name = ident or "dkproxy"
    if log_file == "Sys::Syslog":  # Net::Server's way of saying "syslog"
        use_syslog, log_file = True, None
    if use_syslog:
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(
            address=address, facility=_FACILITIES.get(facility, _FACILITIES["mail"])
        )
        handler.setFormatter(logging.Formatter(f"{name}[%(process)d]: %(message)s"))
    else:
        handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


@dataclass(frozen=True)
class AccessList:
    """Net::Server's allow/deny (regexes on the peer address) and cidr_allow/cidr_deny.

    As in Net::Server: with no allow rule at all every client is allowed; a deny match always
    refuses; otherwise an allow match is needed.
    """

    allow: tuple[re.Pattern[str], ...] = ()
    deny: tuple[re.Pattern[str], ...] = ()
    cidr_allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    cidr_deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def build(
        cls,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        cidr_allow: Sequence[str] = (),
        cidr_deny: Sequence[str] = (),
    ) -> AccessList:
        return cls(
            tuple(re.compile(pattern) for pattern in allow),
            tuple(re.compile(pattern) for pattern in deny),
            tuple(ipaddress.ip_network(net, strict=False) for net in cidr_allow),
            tuple(ipaddress.ip_network(net, strict=False) for net in cidr_deny),
        )

    @property
    def active(self) -> bool:
        return bool(self.allow or self.deny or self.cidr_allow or self.cidr_deny)

    def permits(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return not (self.allow or self.cidr_allow)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        text = str(address)
        if any(p.fullmatch(text) for p in self.deny) or any(address in n for n in self.cidr_deny):
            return False
        if not (self.allow or self.cidr_allow):
            return True
        return any(p.fullmatch(text) for p in self.allow) or any(
            address in net for net in self.cidr_allow
        )


def user_ids(user: str | None, group: str | None) -> tuple[int, int] | None:
    """(uid, gid) the daemon will run as after `drop_privileges`, or None when it keeps its
    own; SystemExit naming an unknown user or group, as drop_privileges does."""
    if not user and not group:
        return None
    uid, gid = os.getuid(), os.getgid()
    if user:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise SystemExit(f"dkproxy: user {user!r} does not exist") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        except KeyError:
            raise SystemExit(f"dkproxy: group {group!r} does not exist") from None
    return uid, gid


def drop_privileges(user: str | None, group: str | None, chroot: str | None = None) -> None:
    """chroot, then setgid/setuid; errors name the user/group and stop the start."""
    ids = user_ids(user, group)  # looked up before the chroot hides /etc/passwd
    if chroot:
        os.chroot(chroot)
        os.chdir("/")
    if ids is None:
        return
    uid, gid = ids
    if os.getegid() != gid:
        os.setgroups([gid])
        os.setgid(gid)
    if os.geteuid() != uid:
        os.setuid(uid)
        log.info("running as uid %d gid %d", os.getuid(), os.getgid())


def daemonize() -> None:
    """Detach from the terminal (double fork, new session), stdio to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def write_pidfile(path: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(f"{os.getpid()}\n")


def remove_pidfile(path: str) -> None:
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


def sd_notify(state: str) -> bool:
    """Tell systemd our state ("READY=1", "STOPPING=1", "STATUS=...") under Type=notify.

    The sd_notify(3) protocol: one datagram with newline-separated KEY=VALUE lines to the
    AF_UNIX socket named by $NOTIFY_SOCKET ("@name" is in the abstract namespace). Without
    that variable (not started by systemd) nothing is sent. Returns whether it was sent;
    a failure is logged, never raised: readiness must not stop the mail.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", address.lstrip("\0"), exc)
        return False
    return True


def notify_reloading() -> bool:
    """Tell systemd a reload (SIGHUP) has begun: "RELOADING=1" with "MONOTONIC_USEC=".

    sd_notify(3): the unit is "reloading" until the next "READY=1". MONOTONIC_USEC
    (CLOCK_MONOTONIC in microseconds) is what Type=notify-reload (systemd >= 253) needs to
    match the message to the signal it sent; older systemd ignores the field.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return sd_notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def notify_reloaded(status: str) -> bool:
    """Tell systemd the reload is over ("READY=1"); `status` says how it went (STATUS=)."""
    return sd_notify(f"READY=1\nSTATUS={status}")


def notify_stopping() -> bool:
    """Tell systemd a stop has begun ("STOPPING=1"): sessions in flight are finishing."""
    return sd_notify("STOPPING=1\nSTATUS=stopping: finishing the sessions in flight")

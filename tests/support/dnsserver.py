"""A real authoritative DNS server (NSD) on loopback for tests.

Verifiers under test (dkproxy itself, Perl Mail::DKIM, opendkim, go-msgauth, dkimpy) must fetch
keys over the wire: TXT splitting into 255-byte character-strings, NXDOMAIN versus timeouts and
multi-record answers are exactly what a mock would get wrong. NSD serves one root zone ("."),
so every name under any test domain resolves authoritatively and every unpublished name gets a
real NXDOMAIN.

Changes are written to the zone file and NSD is sent SIGHUP; each change bumps the SOA serial
and the call returns only once NSD answers with the new serial, so a test never races a reload.

Tools that cannot talk to a non-53 port (go-msgauth's resolver, glibc) are run through
`run_in_netns`: a private network and mount namespace with `lo` up, a bind-mounted
/etc/resolv.conf pointing at 127.0.0.1, and a second NSD on 127.0.0.1:53 serving the same zone
file. The host's resolv.conf and port 53 are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from .tools import die_with_parent, free_udp_tcp_port, require_tool

#: One TXT record: a str (split into 255-byte strings by us) or an explicit list of strings.
TxtRecord = str | bytes | Sequence[str | bytes]

MAX_STRING = 255
_SOA_NAMES = "ns.dkproxy.test. hostmaster.dkproxy.test."


class ZoneTextError(ValueError):
    """Zone text that NSD refuses to parse; carries nsd-checkzone's complaint."""


def split_txt(value: str | bytes) -> list[bytes]:
    """Split one TXT value into <=255-byte character-strings, as zone tools must."""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not raw:
        return [b""]
    return [raw[i : i + MAX_STRING] for i in range(0, len(raw), MAX_STRING)]


def record_strings(record: TxtRecord) -> list[bytes]:
    """The character-strings of one record: a str is split, a sequence is taken as given."""
    if isinstance(record, str | bytes):
        return split_txt(record)
    parts = [p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in record]
    if not parts:
        raise ValueError("a TXT record needs at least one character-string")
    for part in parts:
        if len(part) > MAX_STRING:
            raise ValueError(f"TXT character-string longer than 255 bytes ({len(part)})")
    return parts


def quote_string(part: bytes) -> str:
    """Zone-file quoting of one character-string (backslash escapes, \\DDD for non-printables)."""
    out = []
    for byte in part:
        if byte in (0x22, 0x5C):
            out.append("\\" + chr(byte))
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def fqdn(name: str) -> str:
    """Lower-case absolute form of a name (trailing dot)."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


@dataclass
class NetnsResult:
    """Outcome of one command run by `DNSServer.run_in_netns`."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes


@dataclass
class NetnsJob:
    """One command for `DNSServer.run_in_netns`: argv, bytes for stdin, extra environment."""

    argv: Sequence[str]
    stdin: bytes = b""
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = 30.0


class _Blackhole:
    """A UDP+TCP port that accepts queries and never answers (a DNS timeout on demand)."""

    def __init__(self) -> None:
        port = free_udp_tcp_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", port))
        # Never accept(): the kernel completes handshakes into the backlog and data is never read.
        self.tcp.listen(64)
        self.port = port

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class _FixedRcode:
    """A UDP+TCP DNS server on loopback that answers every query with one rcode (SERVFAIL,
    REFUSED ...) and no records: a resolver that is up but fails, on demand."""

    def __init__(self, rcode: str) -> None:
        self.rcode = dns.rcode.from_text(rcode)
        port = free_udp_tcp_port()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", port))
        self.tcp.listen(16)
        self.port = port
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        response = dns.message.make_response(query)
        response.set_rcode(self.rcode)
        return response.to_wire()

    def _serve_udp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                wire, peer = self.udp.recvfrom(65535)
                answer = self._answer(wire)
                if answer is not None:
                    self.udp.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.tcp.accept()
                with conn, contextlib.suppress(OSError, struct.error):
                    conn.settimeout(5)
                    size = struct.unpack("!H", conn.recv(2))[0]
                    wire = b""
                    while len(wire) < size:
                        more = conn.recv(size - len(wire))
                        if not more:
                            break
                        wire += more
                    answer = self._answer(wire)
                    if answer is not None:
                        conn.sendall(struct.pack("!H", len(answer)) + answer)

    def close(self) -> None:
        for sock in (self.udp, self.tcp):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class DNSServer:
    """NSD serving TXT records for tests on 127.0.0.1:<free port> (UDP and TCP)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port = 0
        self._dir = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._records: dict[str, tuple[int, list[list[bytes]]]] = {}
        self._texts: dict[str, tuple[int, str]] = {}
        self._serial = 1
        self._mtime_ns = 0
        self._lock = threading.RLock()
        self._blackhole: _Blackhole | None = None
        self._failing: dict[str, _FixedRcode] = {}
        self._nsd = ""

    # -- life cycle -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def zone_path(self) -> str:
        return os.path.join(self._dir, "root.zone")

    @property
    def workdir(self) -> str:
        return self._dir

    def start(self, port: int | None = None) -> DNSServer:
        """Start NSD and wait until it answers; retries on a lost race for the port.

        `port` fixes the port (53 inside a private network namespace, for programs that
        only read /etc/resolv.conf); by default a free one is picked."""
        self._nsd = require_tool("nsd")
        require_tool("nsd-checkzone")
        self._dir = tempfile.mkdtemp(prefix="dkproxy-nsd-")
        self._write_zone()
        last_error = ""
        for _ in range(3):
            self.port = port or free_udp_tcp_port()
            conf = self._write_conf("nsd.conf", self.port, "main")
            log = open(os.path.join(self._dir, "nsd-main.out"), "wb")  # noqa: SIM115
            self._proc = subprocess.Popen(
                [self._nsd, "-d", "-c", conf],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            log.close()
            try:
                self._wait_serial(self._serial, timeout=10)
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = str(exc)
                self._kill()
        raise RuntimeError(f"NSD did not start: {last_error}\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop NSD, close the blackhole, remove the working directory."""
        self._kill()
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None
        for responder in self._failing.values():
            responder.close()
        self._failing = {}
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self._dir, "nsd-main.out"), "rb") as fh:
                return fh.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    # -- configuration ----------------------------------------------------------------------

    def _write_conf(self, name: str, port: int, tag: str) -> str:
        d = self._dir
        text = f"""server:
  ip-address: 127.0.0.1
  port: {port}
  username: ""
  chroot: ""
  database: ""
  zonesdir: "{d}"
  zonelistfile: "{d}/zone-{tag}.list"
  pidfile: "{d}/nsd-{tag}.pid"
  xfrdfile: "{d}/xfrd-{tag}.state"
  xfrdir: "{d}"
  do-ip6: no
  server-count: 1
  hide-version: yes
  verbosity: 1
  # Debian's NSD rate-limits answers per client (RRL, 200/s by default); the tests ask in
  # bursts from one address, so turn it off.
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: "."
  zonefile: "{self.zone_path}"
"""
        path = os.path.join(d, name)
        with open(path, "w", encoding="ascii") as fh:
            fh.write(text)
        return path

    def _zone_text(self) -> str:
        lines = [
            "$TTL 60",
            f". 60 IN SOA {_SOA_NAMES} {self._serial} 3600 600 86400 60",
            ". 60 IN NS ns.dkproxy.test.",
            "ns.dkproxy.test. 60 IN A 127.0.0.1",
        ]
        for name, (ttl, records) in sorted(self._records.items()):
            for parts in records:
                lines.append(f"{name} {ttl} IN TXT " + " ".join(quote_string(p) for p in parts))
        for origin, (ttl, text) in self._texts.items():
            lines.append(f"$ORIGIN {origin}")
            lines.append(f"$TTL {ttl}")
            lines.append(text.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def _write_zone(self) -> None:
        tmp = self.zone_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self._zone_text())
        # NSD reloads only files whose mtime changed; force a strictly increasing one so two
        # changes within one timestamp tick are not mistaken for "unchanged".
        self._mtime_ns = max(time.time_ns(), self._mtime_ns + 1_000_000_000)
        os.utime(tmp, ns=(self._mtime_ns, self._mtime_ns))
        os.replace(tmp, self.zone_path)

    def _apply(self) -> None:
        """Rewrite the zone with a new serial, reload NSD and wait for the serial to show."""
        self._serial += 1
        self._write_zone()
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"NSD is not running\n{self._log_tail()}")
        self._proc.send_signal(signal.SIGHUP)
        self._wait_serial(self._serial, timeout=10)

    def _wait_serial(self, serial: int, timeout: float, in_a_row: int = 5) -> None:
        """Wait until NSD answers with `serial`, `in_a_row` times running: on SIGHUP NSD
        forks new server processes, and until the old one exits it may still answer from the
        old zone on the shared socket (a test would then see a record it just replaced)."""
        deadline = time.monotonic() + timeout
        query = dns.message.make_query(".", "SOA")
        seen = 0
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"NSD exited with {self._proc.returncode}")
            try:
                resp = dns.query.udp(query, self.host, port=self.port, timeout=0.3)
                current = any(
                    rrset.rdtype == dns.rdatatype.SOA and rrset[0].serial == serial
                    for rrset in resp.answer
                )
                seen = seen + 1 if current else 0
                if seen >= in_a_row:
                    return
                if current:
                    continue
            except (dns.exception.Timeout, OSError):
                seen = 0
            time.sleep(0.02)
        raise TimeoutError(f"NSD did not serve serial {serial} within {timeout}s")

    # -- records ----------------------------------------------------------------------------

    def publish(
        self, records: Mapping[str, Sequence[TxtRecord]], ttl: int = 60, *, append: bool = False
    ) -> None:
        """Serve TXT records: name -> list of records (each a str, split at 255 bytes, or an
        explicit sequence of character-strings).

        Names given replace whatever that name served before (append=True adds to it instead);
        other names are kept.
        """
        with self._lock:
            for name, recs in records.items():
                if isinstance(recs, str | bytes):
                    raise TypeError(f"{name}: give a list of records, not a bare string")
                key = fqdn(name)
                new = [record_strings(r) for r in recs]
                if append and key in self._records:
                    new = self._records[key][1] + new
                self._records[key] = (ttl, new)
            self._apply()

    def unpublish(self, *names: str) -> None:
        """Stop serving the given names (they answer NXDOMAIN again)."""
        with self._lock:
            for name in names:
                self._records.pop(fqdn(name), None)
            self._apply()

    def clear(self) -> None:
        """Drop every published record and zone text."""
        with self._lock:
            self._records.clear()
            self._texts.clear()
            self._apply()

    def snapshot(
        self,
    ) -> tuple[dict[str, tuple[int, list[list[bytes]]]], dict[str, tuple[int, str]]]:
        """The current records and zone texts, for `restore` (test isolation)."""
        with self._lock:
            return (
                {k: (ttl, [list(r) for r in recs]) for k, (ttl, recs) in self._records.items()},
                dict(self._texts),
            )

    def restore(
        self, state: tuple[dict[str, tuple[int, list[list[bytes]]]], dict[str, tuple[int, str]]]
    ) -> None:
        """Go back to a `snapshot` (reloads only if something changed)."""
        with self._lock:
            if self.snapshot() == state:
                return
            self._records = {
                k: (ttl, [list(r) for r in recs]) for k, (ttl, recs) in state[0].items()
            }
            self._texts = dict(state[1])
            self._apply()

    def load_zone_text(self, origin: str, text: str, ttl: int = 60) -> None:
        """Serve BIND zone-file text as written, relative names under `origin`.

        The text is first checked with nsd-checkzone (as a zone of its own, with a generated
        SOA/NS), so a syntax error raises ZoneTextError instead of breaking the server. The
        text must hold records only (no SOA). Loading the same origin again replaces it.
        """
        origin = fqdn(origin)
        with self._lock:
            check = os.path.join(self._dir, "check.zone")
            with open(check, "w", encoding="utf-8") as fh:
                fh.write(
                    f"$ORIGIN {origin}\n$TTL {ttl}\n"
                    f"@ IN SOA ns.dkproxy.test. hostmaster.dkproxy.test. 1 3600 600 86400 60\n"
                    f"@ IN NS ns.dkproxy.test.\n{text.rstrip(chr(10))}\n"
                )
            proc = subprocess.run(
                [require_tool("nsd-checkzone"), origin, check],
                capture_output=True,
                check=False,
            )
            if proc.returncode != 0:
                raise ZoneTextError((proc.stdout + proc.stderr).decode("utf-8", "replace"))
            self._texts[origin] = (ttl, text)
            self._apply()

    def unload_zone_text(self, origin: str) -> None:
        with self._lock:
            self._texts.pop(fqdn(origin), None)
            self._apply()

    # -- client side helpers ----------------------------------------------------------------

    def resolver(self, timeout: float = 3.0) -> dns.resolver.Resolver:
        """A dnspython resolver that asks only this server."""
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [self.host]
        res.port = self.port
        res.lifetime = timeout
        res.timeout = timeout
        return res

    def lookup_txt(self, name: str) -> list[bytes]:
        """TXT records at `name`, each with its character-strings joined ([] if none)."""
        try:
            answer = self.resolver().resolve(fqdn(name), "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        if answer.rrset is None:
            return []
        return [b"".join(rdata.strings) for rdata in answer.rrset]

    def query(self, name: str, rdtype: str = "TXT", tcp: bool = False) -> dns.message.Message:
        """A raw response from this server (to check rcodes and string splits)."""
        q = dns.message.make_query(fqdn(name), rdtype, use_edns=0, payload=4096)
        if tcp:
            return dns.query.tcp(q, self.host, port=self.port, timeout=3)
        return dns.query.udp(q, self.host, port=self.port, timeout=3)

    def dkimpy_dnsfunc(self, name: bytes | str, timeout: float = 5) -> bytes:
        """A dkimpy `dnsfunc`: the first TXT record at `name`, strings joined, b'' if none."""
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        records = self.lookup_txt(qname)
        return records[0] if records else b""

    def blackhole_address(self) -> str:
        """ "127.0.0.1:PORT" of a DNS server that swallows every query (UDP and TCP)."""
        with self._lock:
            if self._blackhole is None:
                self._blackhole = _Blackhole()
            return f"127.0.0.1:{self._blackhole.port}"

    def failing_address(self, rcode: str) -> str:
        """ "127.0.0.1:PORT" of a DNS server answering every query with `rcode` (SERVFAIL,
        REFUSED, ...); closed with the server."""
        with self._lock:
            if rcode not in self._failing:
                self._failing[rcode] = _FixedRcode(rcode)
            return f"127.0.0.1:{self._failing[rcode].port}"

    # -- namespace for port-53-only resolvers -----------------------------------------------

    def run_in_netns(self, jobs: Sequence[NetnsJob], timeout: float = 120.0) -> list[NetnsResult]:
        """Run commands where 127.0.0.1:53 is this server's data and resolv.conf points there.

        One private net+mount namespace per call (so batch many jobs into one call): `lo` is
        brought up, a temp resolv.conf is bind-mounted over /etc/resolv.conf, and a second NSD
        serving the same zone file listens on 127.0.0.1:53. Jobs run one after another.
        """
        unshare = require_tool("unshare")
        ip = require_tool("ip")
        mount = require_tool("mount")
        with self._lock:
            work = tempfile.mkdtemp(prefix="netns-", dir=self._dir)
            conf = self._write_conf(os.path.relpath(work, self._dir) + "/nsd53.conf", 53, "ns53")
            resolv = os.path.join(work, "resolv.conf")
            with open(resolv, "w", encoding="ascii") as fh:
                fh.write("nameserver 127.0.0.1\noptions timeout:2 attempts:2\n")
            specs = []
            for i, job in enumerate(jobs):
                stdin_path = os.path.join(work, f"stdin-{i}")
                with open(stdin_path, "wb") as fh:
                    fh.write(job.stdin)
                specs.append(
                    {
                        "argv": list(job.argv),
                        "stdin": stdin_path,
                        "env": dict(job.env),
                        "timeout": job.timeout,
                    }
                )
            spec = {
                "ip": ip,
                "mount": mount,
                "nsd": self._nsd,
                "conf": conf,
                "resolv": resolv,
                "serial": self._serial,
                "jobs": specs,
                "out": os.path.join(work, "results.json"),
            }
            spec_path = os.path.join(work, "spec.json")
            with open(spec_path, "w", encoding="utf-8") as fh:
                json.dump(spec, fh)
            runner = os.path.join(work, "runner.py")
            with open(runner, "w", encoding="utf-8") as fh:
                fh.write(_NETNS_RUNNER)
            proc = subprocess.run(
                [unshare, "--net", "--mount", sys.executable, runner, spec_path],
                capture_output=True,
                timeout=timeout,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    "netns runner failed: "
                    + (proc.stdout + proc.stderr).decode("utf-8", "replace")[-3000:]
                )
            with open(spec["out"], encoding="utf-8") as fh:
                raw = json.load(fh)
            shutil.rmtree(work, ignore_errors=True)
        return [
            NetnsResult(
                argv=r["argv"],
                returncode=r["returncode"],
                stdout=bytes.fromhex(r["stdout"]),
                stderr=bytes.fromhex(r["stderr"]),
            )
            for r in raw
        ]


#: Runs inside the namespace (stdlib + dnspython only; it is executed as a file there).
_NETNS_RUNNER = r"""
import json, os, subprocess, sys, time
import dns.message, dns.query

spec = json.load(open(sys.argv[1]))
subprocess.run([spec["ip"], "link", "set", "lo", "up"], check=True)
subprocess.run([spec["mount"], "--bind", spec["resolv"], "/etc/resolv.conf"], check=True)
nsd = subprocess.Popen([spec["nsd"], "-d", "-c", spec["conf"]],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    deadline = time.monotonic() + 10
    q = dns.message.make_query(".", "SOA")
    while True:
        try:
            r = dns.query.udp(q, "127.0.0.1", port=53, timeout=0.3)
            if any(rr.rdtype == 6 and rr[0].serial == spec["serial"] for rr in r.answer):
                break
        except Exception:
            pass
        if nsd.poll() is not None or time.monotonic() > deadline:
            sys.exit("NSD on port 53 inside the namespace did not come up")
        time.sleep(0.02)
    results = []
    for job in spec["jobs"]:
        env = dict(os.environ)
        env.update(job["env"])
        with open(job["stdin"], "rb") as stdin:
            try:
                p = subprocess.run(job["argv"], stdin=stdin, capture_output=True, env=env,
                                   timeout=job["timeout"])
                rc, out, err = p.returncode, p.stdout, p.stderr
            except subprocess.TimeoutExpired as exc:
                rc, out, err = -9, exc.stdout or b"", (exc.stderr or b"") + b"\n[timeout]"
        results.append({"argv": job["argv"], "returncode": rc,
                        "stdout": out.hex(), "stderr": err.hex()})
    with open(spec["out"], "w") as fh:
        json.dump(results, fh)
finally:
    nsd.terminate()
    nsd.wait(timeout=5)
"""

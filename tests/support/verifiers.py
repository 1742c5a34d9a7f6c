"""Independent DKIM / DomainKeys verifiers, all fetching keys from the tests' DNSServer.

dkproxy's output must verify with what receivers really run, not only with dkproxy's own
code: Perl Mail::DKIM (SpamAssassin, DKIMproxy; the only one that checks DomainKeys), OpenDKIM,
go-msgauth and dkimpy. Each function returns one VerifierResult per signature, in header order.

Results are normalised to: pass, fail (signature or body hash does not verify), permerror
(no key, bad key or malformed signature), temperror (DNS timeout or server failure), and
Mail::DKIM's own words where it has them (invalid, none). `detail` keeps the verifier's text.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.resolver

from .dnsserver import DNSServer, NetnsJob
from .tools import missing, require_tool

HERE = os.path.dirname(os.path.abspath(__file__))
PERL_HELPER = os.path.join(HERE, "mail_dkim.pl")
PERL_ARC_HELPER = os.path.join(HERE, "mail_dkim_arc.pl")

#: DNS target: a running DNSServer, or "host:port" (e.g. DNSServer.blackhole_address()).
DnsTarget = DNSServer | str


@dataclass(frozen=True)
class VerifierResult:
    """One signature's verdict from one verifier."""

    kind: str  # 'dkim' | 'domainkeys'
    domain: str
    selector: str | None
    result: str  # 'pass' | 'fail' | 'invalid' | 'permerror' | 'temperror' | 'none' | ...
    detail: str

    @property
    def passed(self) -> bool:
        return self.result == "pass"


def to_crlf(message: bytes) -> bytes:
    """Turn lone LFs into CRLF (verifiers expect wire-form CRLF messages)."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def _host_port(dns_target: DnsTarget) -> tuple[str, int]:
    if isinstance(dns_target, DNSServer):
        return dns_target.host, dns_target.port
    host, _, port = dns_target.rpartition(":")
    return host, int(port)


_SIG_HEADER = re.compile(rb"^(dkim-signature|domainkey-signature)[ \t]*:", re.IGNORECASE)


def signature_tags(message: bytes) -> list[tuple[str, dict[str, str]]]:
    """(header name lower-case, tag dict) for every DKIM-/DomainKey-Signature, in order."""
    header = to_crlf(message).split(b"\r\n\r\n", 1)[0]
    fields: list[bytes] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b" " + line.strip()
        else:
            fields.append(line)
    out = []
    for f in fields:
        m = _SIG_HEADER.match(f)
        if not m:
            continue
        tags = {}
        for part in f[m.end() :].decode("utf-8", "replace").split(";"):
            name, eq, value = part.partition("=")
            if eq:
                tags[name.strip()] = re.sub(r"\s+", "", value)
        out.append((m.group(1).decode().lower(), tags))
    return out


# ---------------------------------------------------------------------------------------------
# Perl Mail::DKIM

_checked_perl: set[str] = set()


def _perl() -> str:
    perl = require_tool("perl")
    for module in ("Mail::DKIM::Verifier", "Net::DNS::Resolver", "JSON::PP"):
        if module in _checked_perl:
            continue
        proc = subprocess.run([perl, f"-M{module}", "-e", "1"], capture_output=True, check=False)
        if proc.returncode != 0:
            missing(f"perl module not loadable: {module}")
        _checked_perl.add(module)
    return perl


def _run_perl(
    mode: str, messages: Sequence[bytes], args: Sequence[str], helper: str = PERL_HELPER
) -> list[dict]:
    frames = b"".join(b"%d\n" % len(m) + m for m in messages)
    proc = subprocess.run(
        [_perl(), helper, mode, *args],
        input=frames,
        capture_output=True,
        timeout=60 + 20 * len(messages),
        check=False,
    )
    lines = proc.stdout.decode("utf-8").splitlines()
    if proc.returncode != 0 or len(lines) != len(messages):
        raise RuntimeError(
            f"mail_dkim.pl {mode} failed (rc={proc.returncode}): "
            + proc.stderr.decode("utf-8", "replace")[-2000:]
        )
    return [json.loads(line) for line in lines]


def mail_dkim_raw_many(
    messages: Sequence[bytes], dns: DnsTarget, timeout: int = 5, strict: bool = False
) -> list[dict]:
    """Mail::DKIM's full verdicts (overall result/detail plus per-signature dicts)."""
    host, port = _host_port(dns)
    args = ["--host", host, "--port", str(port), "--timeout", str(timeout)]
    if strict:
        args.append("--strict")
    return _run_perl("verify", [to_crlf(m) for m in messages], args)


def _mail_dkim_results(raw: dict) -> list[VerifierResult]:
    if "error" in raw:
        return [VerifierResult("dkim", "", None, "error", raw["error"])]
    results = [
        VerifierResult(
            kind=s["kind"],
            domain=s["domain"],
            selector=s["selector"],
            result=s["result"],
            detail=s["detail"],
        )
        for s in raw["signatures"]
    ]
    if not results and raw["result"] not in ("none", ""):
        # A signature header Mail::DKIM could not even parse is not in its list; report it
        # rather than pretending the message was unsigned.
        results.append(VerifierResult("dkim", "", None, raw["result"], raw["detail"]))
    return results


def verify_mail_dkim_many(
    messages: Sequence[bytes], dns: DnsTarget, timeout: int = 5, strict: bool = False
) -> list[list[VerifierResult]]:
    """Perl Mail::DKIM::Verifier over many messages in one perl process."""
    return [_mail_dkim_results(r) for r in mail_dkim_raw_many(messages, dns, timeout, strict)]


def verify_mail_dkim(
    message: bytes, dns: DnsTarget, timeout: int = 5, strict: bool = False
) -> list[VerifierResult]:
    """Perl Mail::DKIM::Verifier: DKIM and DomainKeys signatures, one result each."""
    return verify_mail_dkim_many([message], dns, timeout, strict)[0]


def sign_mail_dkim(
    message: bytes,
    key_path: str,
    domain: str,
    selector: str,
    *,
    kind: str = "dkim",
    method: str | None = None,
    algorithm: str = "rsa-sha256",
    headers: str | None = None,
) -> bytes:
    """Sign with Perl Mail::DKIM::Signer (kind 'dkim' or 'domainkeys'); return the message with
    the signature header prepended. DomainKeys default method: nofws; DKIM: relaxed/simple."""
    if method is None:
        method = "nofws" if kind == "domainkeys" else "relaxed/simple"
    args = ["--key", key_path, "--domain", domain, "--selector", selector]
    args += ["--type", kind, "--method", method, "--algorithm", algorithm]
    if headers is not None:
        args += ["--headers", headers]
    message = to_crlf(message)
    out = _run_perl("sign", [message], args)[0]
    if "error" in out:
        raise RuntimeError(f"Mail::DKIM::Signer: {out['error']}")
    fields = b"".join(
        h.encode("latin-1").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
        for h in out["headers"]
    )
    return fields + message


def verify_mail_dkim_arc_many(messages: Sequence[bytes], dns: DnsTarget) -> list[dict]:
    """Mail::DKIM::ARC::Verifier: {"result": pass|fail|none, "detail": ...} per message."""
    host, port = _host_port(dns)
    args = ["--host", host, "--port", str(port)]
    return _run_perl("verify", [to_crlf(m) for m in messages], args, PERL_ARC_HELPER)


def seal_mail_dkim_arc(
    message: bytes,
    key_path: str,
    domain: str,
    selector: str,
    srvid: str,
    *,
    chain: str = "ar",
) -> bytes:
    """Seal with Mail::DKIM::ARC::Signer (cv from the `srvid` Authentication-Results' arc=
    when chain is "ar"); return the message with the ARC set prepended."""
    args = ["--key", key_path, "--domain", domain, "--selector", selector, "--srvid", srvid]
    message = to_crlf(message)
    out = _run_perl("seal", [message], [*args, "--chain", chain], PERL_ARC_HELPER)[0]
    if "error" in out or out["result"] != "sealed":
        raise RuntimeError(f"Mail::DKIM::ARC::Signer: {out}")
    fields = b"".join(
        h.encode("latin-1").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
        for h in out["headers"]
    )
    return fields + message


# ---------------------------------------------------------------------------------------------
# go-msgauth

_GO_LINE = re.compile(
    r"^(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(Valid|Invalid) signature for (\S+?)"
    r"(?: \(selector=(\S*)\))?(?: \(algo=\S*\))?(?:: (.*))?$"
)


def _go_result(valid: bool, err: str) -> str:
    if valid:
        return "pass"
    if "did not verify" in err:
        return "fail"
    if "key unavailable" in err or "timeout" in err or "temporary" in err:
        return "temperror"
    return "permerror"


def parse_go_output(message: bytes, stderr: str, returncode: int) -> list[VerifierResult]:
    """Parse dkim-verify's log lines into results (it prints no selector, so selectors come
    from the message's own DKIM-Signature headers, matched in order)."""
    sigs = [tags for name, tags in signature_tags(message) if name == "dkim-signature"]
    results: list[VerifierResult] = []
    for line in stderr.splitlines():
        m = _GO_LINE.match(line.strip())
        if not m:
            continue
        valid, domain, selector, err = m.group(1) == "Valid", m.group(2), m.group(3), m.group(4)
        if selector is None and len(results) < len(sigs):
            tags = sigs[len(results)]
            if tags.get("d", "").lower() == domain.lower():
                selector = tags.get("s")
        results.append(
            VerifierResult("dkim", domain, selector, _go_result(valid, err or ""), err or "valid")
        )
    if returncode != 0:
        results.append(VerifierResult("dkim", "", None, "error", stderr.strip()[-500:]))
    return results


def verify_go_msgauth(messages: Sequence[bytes], dns: DNSServer) -> list[list[VerifierResult]]:
    """go-msgauth's dkim-verify, one namespace for the whole batch (see DNSServer.run_in_netns:
    Go's resolver only reads /etc/resolv.conf and only uses port 53)."""
    tool = require_tool("dkim-verify")
    crlf = [to_crlf(m) for m in messages]
    jobs = [NetnsJob([tool], stdin=m, env={"GODEBUG": "netdns=go"}) for m in crlf]
    outs = dns.run_in_netns(jobs)
    return [
        parse_go_output(m, o.stderr.decode("utf-8", "replace"), o.returncode)
        for m, o in zip(crlf, outs, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# dkimpy


def dkimpy_dnsfunc(dns_target: DnsTarget, timeout: float = 5.0) -> Callable[..., bytes | None]:
    """A dkimpy `dnsfunc` asking only the test server; DNS timeouts become DnsTimeoutError."""
    import dkim

    host, port = _host_port(dns_target)
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = [host]
    res.port = port

    def dnsfunc(name: bytes | str, timeout: float = timeout) -> bytes | None:
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = res.resolve(qname, "TXT", lifetime=timeout, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.exception.Timeout as exc:
            raise dkim.DnsTimeoutError(str(exc)) from exc
        except dns.resolver.NoNameservers as exc:  # SERVFAIL and friends
            raise dkim.DnsTimeoutError(str(exc)) from exc
        if answer.rrset is None:
            return None
        return b"".join(answer.rrset[0].strings)

    return dnsfunc


def verify_dkimpy_arc(message: bytes, dns: DnsTarget) -> tuple[str, str]:
    """dkimpy's arc_verify as (cv, reason); its None ("ARC-Seal[N] reported failure, the chain
    is terminated") is reported as "terminated" so tests can tell it from fail."""
    import dkim

    cv, _results, reason = dkim.arc_verify(to_crlf(message), dnsfunc=dkimpy_dnsfunc(dns))
    return ("terminated" if cv is None else cv.decode()), reason


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.INFO:
            self.lines.append(record.getMessage())


def verify_dkimpy(message: bytes, dns: DnsTarget, timeout: float = 5.0) -> list[VerifierResult]:
    """dkimpy's DKIM.verify for each DKIM-Signature (idx in header order)."""
    import dkim

    message = to_crlf(message)
    dnsfunc = dkimpy_dnsfunc(dns, timeout)
    results = []
    sigs = [tags for name, tags in signature_tags(message) if name == "dkim-signature"]
    for idx, tags in enumerate(sigs):
        logger = logging.getLogger(f"dkproxy.tests.dkimpy.{id(message)}.{idx}")
        logger.propagate = False
        handler = _ListHandler()
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        try:
            d = dkim.DKIM(message, logger=logger, timeout=int(timeout))
            ok = d.verify(idx=idx, dnsfunc=dnsfunc)
            detail = "; ".join(handler.lines)
            if ok:
                result = "pass"
            elif "DnsTimeoutError" in detail:
                result = "temperror"
            elif detail:  # dkimpy logs (at error level) only key and DNS problems
                result = "permerror"
            else:
                result = "fail"
        except dkim.DKIMException as exc:
            detail = str(exc)
            result = "fail" if "body hash mismatch" in detail else "permerror"
        finally:
            logger.removeHandler(handler)
        results.append(VerifierResult("dkim", tags.get("d", ""), tags.get("s"), result, detail))
    return results


# ---------------------------------------------------------------------------------------------
# OpenDKIM

_INSHEADER = re.compile(
    r"^### INSHEADER: idx=\d+ hname='Authentication-Results' hvalue='(.*?)'$",
    re.DOTALL | re.MULTILINE,
)


def parse_opendkim_output(stdout: str) -> list[VerifierResult]:
    """Per-signature results from the Authentication-Results header `opendkim -t -vvv` prints.

    OpenDKIM's libunbound resolver can use a non-53 port, so no namespace is needed; its
    result line on stdout names only one signature, the A-R header names them all.
    """
    import authres

    results: list[VerifierResult] = []
    for m in _INSHEADER.finditer(stdout):
        value = re.sub(r"\r?\n[ \t]*", " ", m.group(1))
        header = authres.AuthenticationResultsHeader.parse_value(value)
        for res in header.results:
            if res.method != "dkim" or res.result == "none":
                continue
            props = {f"{p.type}.{p.name}": p.value for p in res.properties}
            results.append(
                VerifierResult(
                    kind="dkim",
                    domain=props.get("header.d", ""),
                    selector=props.get("header.s"),
                    result=res.result,
                    detail=res.reason or "",
                )
            )
    if not results:
        # A DNS failure makes OpenDKIM tempfail the message (451) without any A-R header;
        # only its one-line verdict names the signature then.
        tempfail = re.search(r"^### SETREPLY: rcode='4", stdout, re.MULTILINE) is not None
        for v in _VERDICT.finditer(stdout):
            failed = "temperror" if tempfail else "fail"
            result = "pass" if v.group(3) == "succeeded" else failed
            results.append(VerifierResult("dkim", v.group(2), v.group(1), result, v.group(0)))
    return results


_VERDICT = re.compile(
    r"verification \(s=([^ ,]+),? d=([^ ,]+),[^)]*\) (succeeded|failed)(?:: (.*))?"
)


def verify_opendkim_many(
    messages: Sequence[bytes], dns: DnsTarget, timeout: int = 5
) -> list[list[VerifierResult]]:
    """OpenDKIM (`opendkim -t FILE`, verify mode) against the test DNS server."""
    tool = require_tool("opendkim")
    host, port = _host_port(dns)
    with tempfile.TemporaryDirectory(prefix="opendkim-") as work:
        unbound = os.path.join(work, "unbound.conf")
        with open(unbound, "w", encoding="ascii") as fh:
            fh.write(
                'server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
                f'forward-zone:\n  name: "."\n  forward-addr: {host}@{port}\n'
            )
        conf = os.path.join(work, "opendkim.conf")
        with open(conf, "w", encoding="ascii") as fh:
            fh.write(
                "Mode v\nSyslog no\nAuthservID dkproxy-test\nAlwaysAddARHeader yes\n"
                f"ResolverConfiguration {unbound}\nDNSTimeout {timeout}\n"
                "MaximumSignaturesToVerify 50\n"
            )
        out: list[list[VerifierResult]] = []
        for i, message in enumerate(messages):
            path = os.path.join(work, f"msg{i}.eml")
            with open(path, "wb") as fh:
                fh.write(to_crlf(message))
            proc = subprocess.run(
                [tool, "-x", conf, "-vvv", "-t", path],
                capture_output=True,
                timeout=30 + 4 * timeout,
                check=False,
            )
            stdout = proc.stdout.decode("utf-8", "replace")
            results = parse_opendkim_output(stdout)
            if proc.returncode != 0:
                detail = (stdout + proc.stderr.decode("utf-8", "replace")).strip()[-1000:]
                results.append(VerifierResult("dkim", "", None, "error", detail))
            out.append(results)
    return out


def verify_opendkim(message: bytes, dns: DnsTarget, timeout: int = 5) -> list[VerifierResult]:
    """OpenDKIM's verdict for each DKIM signature of one message."""
    return verify_opendkim_many([message], dns, timeout)[0]

"""Signing and verifying for the qmail wrapper: qmail-dk / qmail-dkim conventions on dkproxy.

`QmailProcessor.process` takes what `dkproxy-qmail-queue` read (the environment that
matters, the envelope sender, the message as qmail stores it, with LF line ends) and returns
the exit status to use (0: hand the message to qmail-queue), the header fields to put on top
(LF line ends) and the byte ranges of the original to drop (forged Authentication-Results).
The same object serves the in-process path (one message) and `dkproxy qmail-service` (many,
with keys, configurations and DNS answers cached).

What it does, in the order qmail-dk and qmail-dkim decide:
1. `DKPROXY_CONFIG=FILE`: a dkproxy configuration (DKIMproxy or TOML format). An outbound
   one signs with the full rules of `dkproxy out` (domains, sender_map, listid_map, several
   signatures, DomainKeys); an inbound one verifies like `dkproxy in` (its hostname,
   actions, reject_fail, reject_error).
2. `DKSIGN` (DomainKeys) and/or `DKIMSIGN` (DKIM): sign with that private key; `%` is the
   sender's domain (Sender header, else From), the selector is the key file's name. With `%`
   and no such file the message passes unsigned; a fixed path that is missing or unreadable
   is a temporary failure (55).
3. `DKVERIFY` (DomainKeys letters) and/or `DKIMVERIFY` (DKIM letters): verify; see
   dkproxy.qmail_letters.
4. Neither: sign when `RELAYCLIENT` or `AUTHINFO` is set (the default keys
   /var/qmail/control/domainkeys/%/private for DomainKeys and %/default for DKIM, as
   qmail-dk and qmail-dkim use), else verify and refuse nothing.

Signatures are computed over the message's wire form (RFC 5322 CRLF: each LF not already
after a CR becomes CRLF), which is what qmail-remote sends; the fields we add use LF.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

from dkproxy import config as config_mod
from dkproxy.inbound import InboundVerifier
from dkproxy.mailauth.authresults import (
    authentication_results,
    forged_authentication_results,
    header_byte_ranges,
)
from dkproxy.mailauth.dnsresolver import Resolver
from dkproxy.mailauth.keys import KeyLoadError, SigningKey, load_signing_key
from dkproxy.mailauth.message import Address, Message, MessageFormatError
from dkproxy.mailauth.verifier import VerificationReport, VerifySettings, decide, verify_message
from dkproxy.outbound import OutboundSigner
from dkproxy.policy import Selection, SignatureSpec, SigningPolicy
from dkproxy.qmail_client import (
    EXIT_CONFIG_ERROR,
    EXIT_INTERNAL_BUG,
    EXIT_NO_MEMORY,
    EXIT_OK,
    EXIT_POLICY_REJECT,
    EXIT_POLICY_TEMPFAIL,
)
from dkproxy.qmail_letters import dk_letters, dkim_letters, letters_verdict, status_fields

QMAIL_CONTROL = "/var/qmail/control"
DEFAULT_DK_KEY = f"{QMAIL_CONTROL}/domainkeys/%/private"
DEFAULT_DKIM_KEY = f"{QMAIL_CONTROL}/domainkeys/%/default"
#: Cached configurations are re-read after this many seconds (their keys and maps may change
#: without the configuration file itself changing).
CONFIG_TTL = 60.0


@dataclass(frozen=True)
class Answer:
    """The verdict for one message: exit status, fields to add (LF), ranges to drop, log."""

    code: int
    fields: bytes = b""
    remove: tuple[tuple[int, int], ...] = ()
    log: str = ""


class Refused(Exception):
    """A file named by the request is outside the service's allowed directories."""


class _Failure(Exception):
    """A failure with its qmail-queue exit code (e.g. 55: cannot read a key)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def wire_form(data: bytes | bytearray) -> bytes | bytearray:
    """The message as it goes over SMTP: every LF not after a CR becomes CRLF (RFC 5322
    2.1, RFC 5321 2.3.8: lines end in CRLF). `data` is qmail's stored form; returns bytes.

    Replacing CRLF by LF first and then every LF by CRLF gives exactly that, at memcpy
    speed (a regular expression costs ~20x more on a 20 MB message).
    """
    if b"\r" in data:  # qmail-smtpd leaves none; skip a copy of the whole message
        data = data.replace(b"\r\n", b"\n")
    return data.replace(b"\n", b"\r\n")


def lf_form(fields: bytes) -> bytes:
    """Our generated header fields with qmail's LF line ends (folds become LF TAB)."""
    return fields.replace(b"\r\n", b"\n")


def _bare_lfs(original: bytes | bytearray, limit: int) -> list[int]:
    """Offsets (below `limit`) of the LFs in `original` that wire_form prefixed with a CR."""
    positions = []
    position = original.find(b"\n", 0, limit)
    while position >= 0:
        if position == 0 or original[position - 1] != 0x0D:
            positions.append(position)
        position = original.find(b"\n", position + 1, limit)
    return positions


def _original_offset(bare_lfs: list[int], wire_offset: int) -> int:
    """Map an offset in the wire form back to the original (at a line start or end)."""
    inserted = 0
    for position in bare_lfs:
        if position + inserted >= wire_offset:
            break
        inserted += 1
    return wire_offset - inserted


def _enabled(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in ("", "0", "no", "false", "off")


def _authserv_id(env: Mapping[str, str]) -> str:
    """DKPROXY_HOSTNAME, else qmail's control/me, else this host's name."""
    name = env.get("DKPROXY_HOSTNAME", "").strip()
    if not name:
        try:
            with open(os.path.join(QMAIL_CONTROL, "me"), encoding="ascii") as handle:
                name = handle.readline().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
    return name or socket.getfqdn() or "localhost"


class _ConventionPolicy(SigningPolicy):
    """The signatures DKSIGN / DKIMSIGN ask for, as a policy OutboundSigner can use."""

    def __init__(self, processor: QmailProcessor, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self._processor = processor
        self._keys = keys  # (variable, path pattern)

    def select(
        self, sender: Address | None, list_id: str | None, *, no_sender: str = ""
    ) -> Selection:
        specs: list[SignatureSpec] = []
        notes: list[str] = []
        for variable, pattern in self._keys:
            kind = "domainkeys" if variable == "DKSIGN" else "dkim"
            if sender is None or not config_mod.is_domain(sender.domain):
                why = no_sender or "no sender domain (Sender/From)"
                notes.append(f"{variable}: {why}: unsigned")
                continue
            path = pattern.replace("%", sender.domain)
            self._processor.check_allowed(path)  # before looking: say nothing about others
            if "%" in pattern and not os.path.exists(path):
                notes.append(f"{variable}: no key {path} for {sender.domain}: unsigned")
                continue
            key = self._processor.key(path, variable)
            selector = os.path.basename(path)
            try:
                config_mod.check_selector(selector)
            except ValueError as exc:
                raise _Failure(EXIT_CONFIG_ERROR, f"{variable}={path}: {exc}") from None
            if kind == "domainkeys" and key.kind != "rsa":
                raise _Failure(EXIT_CONFIG_ERROR, f"DKSIGN={path}: DomainKeys needs an RSA key")
            algorithm = "rsa-sha1" if kind == "domainkeys" else f"{key.kind}-sha256"
            canonicalization = "nofws" if kind == "domainkeys" else "relaxed/simple"
            specs.append(
                SignatureSpec(kind, sender.domain, selector, key, algorithm, canonicalization)
            )
        rule = "qmail " + "+".join(variable for variable, _ in self._keys)
        return Selection(tuple(specs), rule, "; ".join(notes) or None)


@dataclass
class _Cached:
    stamp: tuple[int, int, int]
    loaded: float
    value: object


class QmailProcessor:
    """Decides, signs and verifies one message at a time; keeps keys, configurations and a
    DNS cache between messages (the service) or for one message (in-process).

    `allowed_dirs`: when given, key and configuration files must lie below one of these
    (after resolving links), else the request is refused (the client then works on its
    own, with its own permissions). `dns_server` ("HOST:PORT") is used unless the request
    names one (DKPROXY_DNS_SERVER).
    """

    def __init__(
        self,
        allowed_dirs: tuple[str, ...] | None = None,
        dns_server: str | None = None,
        dns_timeout: float = 5.0,
    ) -> None:
        self.allowed_dirs = (
            tuple(os.path.realpath(d) for d in allowed_dirs) if allowed_dirs is not None else None
        )
        self.dns_server = dns_server
        self.dns_timeout = dns_timeout
        self._keys: dict[str, _Cached] = {}
        self._configs: dict[str, _Cached] = {}
        self._resolvers: dict[tuple[str | None, float], Resolver] = {}

    # -- files ---------------------------------------------------------------------------------

    def check_allowed(self, path: str) -> str:
        """The resolved path; Refused when it is outside the allowed directories."""
        real = os.path.realpath(path)
        if self.allowed_dirs is not None and not any(
            real == d or real.startswith(d.rstrip("/") + "/") for d in self.allowed_dirs
        ):
            raise Refused(f"{path} is outside the allowed directories")
        return real

    @staticmethod
    def _stamp(path: str) -> tuple[int, int, int]:
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def key(self, path: str, variable: str) -> SigningKey:
        """The private key at `path` (reloaded when the file changes); _Failure(55) if not
        usable."""
        real = self.check_allowed(path)
        try:
            stamp = self._stamp(real)
        except OSError as exc:
            raise _Failure(
                EXIT_CONFIG_ERROR, f"{variable}={path}: cannot read key ({exc.strerror})"
            ) from None
        cached = self._keys.get(real)
        if cached is not None and cached.stamp == stamp:
            return cached.value  # type: ignore[return-value]
        try:
            key = load_signing_key(path)
        except KeyLoadError as exc:
            raise _Failure(EXIT_CONFIG_ERROR, f"{variable}: {exc}") from None
        if len(self._keys) > 1000:
            self._keys.clear()
        self._keys[real] = _Cached(stamp, time.monotonic(), key)
        return key

    def _config(self, path: str) -> OutboundSigner | InboundVerifier:
        real = self.check_allowed(path)
        try:
            stamp = self._stamp(real)
        except OSError as exc:
            raise _Failure(
                EXIT_CONFIG_ERROR, f"DKPROXY_CONFIG={path}: cannot read ({exc.strerror})"
            ) from None
        cached = self._configs.get(real)
        now = time.monotonic()
        if cached is not None and cached.stamp == stamp and now - cached.loaded < CONFIG_TTL:
            return cached.value  # type: ignore[return-value]
        try:
            cfg = config_mod.load_config_file(path)
            if isinstance(cfg, config_mod.OutboundConfig):
                value: OutboundSigner | InboundVerifier = OutboundSigner.from_config(cfg)
            else:
                value = InboundVerifier(cfg)
        except config_mod.ConfigError as exc:
            raise _Failure(EXIT_CONFIG_ERROR, f"DKPROXY_CONFIG: {exc}") from None
        self._configs[real] = _Cached(stamp, now, value)
        return value

    def resolver(self, env: Mapping[str, str]) -> Resolver:
        """The cached resolver for DKPROXY_DNS_SERVER / DKPROXY_DNS_TIMEOUT, else ours."""
        server = env.get("DKPROXY_DNS_SERVER") or self.dns_server
        try:
            timeout = float(env.get("DKPROXY_DNS_TIMEOUT") or self.dns_timeout)
            resolver = self._resolvers.get((server, timeout))
            if resolver is None:
                resolver = Resolver(server=server, timeout=timeout)
        except ValueError as exc:
            raise _Failure(EXIT_CONFIG_ERROR, f"DNS settings: {exc}") from None
        if len(self._resolvers) > 16:
            self._resolvers.clear()
        self._resolvers[(server, timeout)] = resolver
        return resolver

    # -- one message ---------------------------------------------------------------------------

    async def process(
        self, env: Mapping[str, str], sender: str, message: bytes | bytearray
    ) -> Answer:
        """The verdict for one message; never raises (errors become exit codes), except
        Refused, which the service answers so that the client works on its own."""
        try:
            return await self._process(env, sender, message)
        except Refused:
            raise
        except _Failure as exc:
            return Answer(exc.code, log=str(exc))
        except MemoryError:
            return Answer(EXIT_NO_MEMORY, log="out of memory")
        except Exception as exc:  # a bug defers the message; it is never lost or accepted
            return Answer(EXIT_INTERNAL_BUG, log=f"internal error: {exc!r}")

    async def _process(
        self, env: Mapping[str, str], sender: str, message: bytes | bytearray
    ) -> Answer:
        config_path = env.get("DKPROXY_CONFIG")
        if config_path:
            processor = self._config(config_path)
            if isinstance(processor, OutboundSigner):
                return self._sign(processor, message)
            settings = processor.settings
            return await self._verify(
                env, sender, message, settings, processor.resolver, processor.authserv_id
            )
        sign_keys = [(v, env[v]) for v in ("DKSIGN", "DKIMSIGN") if env.get(v)]
        verifying = "DKVERIFY" in env or "DKIMVERIFY" in env
        if not sign_keys and not verifying and ("RELAYCLIENT" in env or "AUTHINFO" in env):
            sign_keys = [("DKSIGN", DEFAULT_DK_KEY), ("DKIMSIGN", DEFAULT_DKIM_KEY)]
        if sign_keys:
            return self._sign(OutboundSigner(_ConventionPolicy(self, sign_keys)), message)
        authserv_id = _authserv_id(env)
        settings = VerifySettings(authserv_id=authserv_id, allow_sha1=True)
        resolver = self.resolver(env)
        return await self._verify(env, sender, message, settings, resolver, authserv_id)

    def _sign(self, signer: OutboundSigner, message: bytes | bytearray) -> Answer:
        outcome = signer.sign(wire_form(message))
        if outcome.reject is not None:
            code = EXIT_POLICY_REJECT if outcome.reject.code >= 500 else EXIT_POLICY_TEMPFAIL
            return Answer(code, log=outcome.summary)
        return Answer(EXIT_OK, lf_form(b"".join(outcome.prepend)), (), outcome.summary)

    async def _verify(
        self,
        env: Mapping[str, str],
        sender: str,
        message: bytes | bytearray,
        settings: VerifySettings,
        resolver: Resolver,
        authserv_id: str,
    ) -> Answer:
        wire = wire_form(message)
        try:
            parsed = Message(wire)
        except MessageFormatError as exc:
            # Nothing can be verified: say so (dkim=none), and let the rules judge "none".
            report = VerificationReport()
            field = authentication_results(report, authserv_id)
            code, why = self._verdict(env, report, settings)
            summary = f"not verified: {exc}" + (f" -> exit {code}: {why}" if why else "")
            return Answer(code, lf_form(field), (), summary)
        report = await verify_message(
            parsed,
            client_ip=env.get("TCPREMOTEIP") or None,
            helo=None,
            mail_from=sender or None,
            resolver=resolver,
            settings=settings,
        )
        fields = [authentication_results(report, authserv_id)]
        if _enabled(env.get("DKPROXY_STATUS")):
            fields += [line.encode("ascii") + b"\r\n" for line in status_fields(report)]
        forged = forged_authentication_results(parsed, authserv_id)
        remove: tuple[tuple[int, int], ...] = ()
        if forged:
            bare = _bare_lfs(message, min(len(message), parsed.header_end))
            remove = tuple(
                (_original_offset(bare, start), _original_offset(bare, end))
                for start, end in header_byte_ranges(parsed, forged)
            )
        summary = f"sender=<{report.sender or ''}> msgid={parsed.message_id() or '<>'} "
        summary += report.summary()
        code, why = self._verdict(env, report, settings)
        if why:
            summary += f" -> exit {code}: {why}"
        return Answer(code, lf_form(b"".join(fields)), remove, summary)

    @staticmethod
    def _verdict(
        env: Mapping[str, str], report: VerificationReport, settings: VerifySettings
    ) -> tuple[int, str]:
        """The most severe of: the configuration's actions, DKVERIFY, DKIMVERIFY."""
        verdicts: list[tuple[int, str]] = []
        decision = decide(report, settings)
        if decision.action == "reject":
            verdicts.append((EXIT_POLICY_REJECT, decision.reply))
        elif decision.action == "tempfail":
            verdicts.append((EXIT_POLICY_TEMPFAIL, decision.reply))
        for variable, letters in (("DKVERIFY", dk_letters), ("DKIMVERIFY", dkim_letters)):
            configured = env.get(variable)
            if configured:
                found = letters(report)
                code = letters_verdict(found, configured)
                if code:
                    verdicts.append((code, f"{variable} has {''.join(found)}"))
        if not verdicts:
            return EXIT_OK, ""
        return max(verdicts, key=lambda item: item[0] == EXIT_POLICY_REJECT)


def process_in_process(
    env: dict[str, str], sender: str, message: bytes | bytearray
) -> tuple[int, bytes, list[tuple[int, int]], str]:
    """The client's fallback when no service answers: the same work, in this process."""
    answer = asyncio.run(QmailProcessor().process(env, sender, message))
    return answer.code, answer.fields, list(answer.remove), answer.log


__all__ = ["Answer", "QmailProcessor", "Refused", "lf_form", "process_in_process", "wire_form"]

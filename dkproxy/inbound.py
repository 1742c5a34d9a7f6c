"""Inbound processing: verify a message and record the verdicts in Authentication-Results.

The session hands over the message; the verifier checks DKIM, DomainKeys, SPF and DMARC (DNS
through one cached resolver per process); this module turns the report into the header to
add, the forged Authentication-Results to drop, and the SMTP verdict: DKIMproxy's reject_fail
and reject_error, then the per-result actions of the native configuration.
"""

from __future__ import annotations

from dkproxy import metrics
from dkproxy.config import InboundConfig
from dkproxy.mailauth import arc
from dkproxy.mailauth.authresults import (
    authentication_results,
    forged_authentication_results,
    forged_ranges_in_raw,
    header_byte_ranges,
)
from dkproxy.mailauth.dmarc import DmarcResult
from dkproxy.mailauth.dnsresolver import Resolver, ResolverConfig
from dkproxy.mailauth.message import Buffer, Message, MessageFormatError
from dkproxy.mailauth.verifier import VerificationReport, VerifySettings, decide, verify_message
from dkproxy.smtp.downstream import Part, Reply
from dkproxy.smtp.proxy import Envelope, Outcome
from dkproxy.smtp.spool import Spool


class InboundVerifier:
    """Callable processor for the session: (data, envelope) -> Outcome."""

    def __init__(self, cfg: InboundConfig, resolver: Resolver | None = None) -> None:
        self.authserv_id = cfg.hostname
        self.resolver = resolver or Resolver(
            server=str(cfg.dns_server) if cfg.dns_server else None,
            timeout=cfg.dns_timeout,
            config=ResolverConfig(max_answers=cfg.max_dns_answers),
        )
        self.settings = VerifySettings(
            authserv_id=cfg.hostname,
            max_signatures=cfg.max_signatures,
            min_key_bits=cfg.min_key_bits,
            allow_sha1=cfg.allow_sha1,
            allow_body_length=cfg.allow_body_length,
            spf=cfg.spf,
            dmarc=cfg.dmarc,
            reject_fail=cfg.reject_fail,
            reject_error=cfg.reject_error,
            actions=dict(cfg.actions),
            # Sealing needs the chain's verdict, so it implies verifying.
            arc=cfg.arc or cfg.arc_seal is not None,
            arc_trusted_sealers=frozenset(cfg.arc_trusted_sealers),
        )
        self.seal = arc.load_seal_params(cfg.arc_seal) if cfg.arc_seal else None

    async def __call__(self, data: Buffer, envelope: Envelope) -> Outcome:
        try:
            message = Message(bytes(data))  # dkimpy and pyspf want bytes
        except MessageFormatError as exc:
            # Nothing can be verified; say so rather than pass the mail without a verdict.
            # The From a reader sees may sit above the bad line, so DMARC is not "none":
            # it cannot be applied, which reject_fail (and a dmarc.permerror action) refuses
            # like any other From without a usable author domain, never accepts silently.
            report = VerificationReport()
            if self.settings.dmarc:
                problem = f"header block cannot be parsed: {exc}"
                report.author_problem = problem
                report.dmarc = DmarcResult("permerror", None, reason=problem)
                report.dmarc_authors = [report.dmarc]
            header = authentication_results(report, self.authserv_id)
            metrics.verified(report.method_results())
            reject = self._verdict(report)
            summary = f"not verified: {exc}" + (f" -> {reject}" if reject else "")
            forged = forged_ranges_in_raw(bytes(data), self.authserv_id)
            if forged:
                summary += f" removed {len(forged)} forged Authentication-Results"
            return Outcome(prepend=[header], reject=reject, summary=summary, remove_ranges=forged)
        report = await verify_message(
            message,
            client_ip=envelope.client_address,
            helo=envelope.client_helo,
            mail_from=envelope.mail_from,
            resolver=self.resolver,
            settings=self.settings,
        )
        metrics.verified(report.method_results(), self.resolver.stats)
        header = authentication_results(report, self.authserv_id)
        forged = forged_authentication_results(message, self.authserv_id)
        summary = f"sender=<{report.sender or ''}> msgid={message.message_id() or '<>'} "
        summary += report.summary()
        if forged:
            summary += f" removed {len(forged)} forged Authentication-Results"
        reject = self._verdict(report)
        if reject is not None:
            summary += f" -> {reject}"
        prepend = [header]
        if self.seal is not None and reject is None:
            own = header.split(b":", 1)[1].decode("ascii")
            verdict = report.arc.result if report.arc is not None else "none"
            try:
                # Fields claiming our own authserv-id are forgeries, cut out below: seal ours.
                named = self.seal.authserv_id not in (None, self.authserv_id.lower())
                own_results = None if named else (own, verdict)
                prepend[:0] = arc.seal_message(message, self.seal, own_results)
                summary += " sealed"
            except arc.ArcSealError as exc:
                summary += f" not sealed: {exc}"
        return Outcome(
            prepend=prepend,
            reject=reject,
            summary=summary,
            remove_ranges=header_byte_ranges(message, forged),
        )

    def _verdict(self, report: VerificationReport) -> Reply | None:
        decision = decide(report, self.settings)
        if decision.action == "accept":
            return None
        code, _, text = decision.reply.partition(" ")
        return Reply(int(code), (text,))


def assemble_inbound(spool: Spool, outcome: Outcome) -> list[Part]:
    """Our Authentication-Results on top, forged ones cut out, everything else unchanged."""
    if not outcome.remove_ranges:
        return [*outcome.prepend, spool]
    parts: list[Part] = list(outcome.prepend)
    position = 0
    for start, end in sorted(outcome.remove_ranges):
        parts.append(spool.segment(position, start))
        position = end
    parts.append(spool.segment(position))
    return parts

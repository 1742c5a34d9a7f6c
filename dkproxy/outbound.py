"""Outbound processing: choose the signatures for a message and compute them.

The session hands over the message bytes; the policy says which signatures the sender gets;
the DKIM and DomainKeys modules compute them. The result is a list of header fields to put on
top, DomainKey-Signature first: DomainKeys hashes only the fields below its own signature, and
with an explicit h= a DKIM-Signature below it is not among them, so both verify.
"""

from __future__ import annotations

from typing import NamedTuple

from dkproxy import metrics
from dkproxy.config import OutboundConfig
from dkproxy.mailauth import arc, dkim_signer, domainkeys
from dkproxy.mailauth.addresses import Address
from dkproxy.mailauth.message import Buffer, Message, MessageFormatError
from dkproxy.policy import Selection, SignatureSpec, SigningPolicy
from dkproxy.smtp.downstream import Part, local_reply
from dkproxy.smtp.proxy import Envelope, Outcome
from dkproxy.smtp.spool import Spool

SIGNING_ERROR_REPLY = "4.3.0 Error: message could not be signed, try again later"

#: Selections remembered per (sender, List-Id): a flood repeats a few senders; past this many
#: the memory starts afresh.
SELECTION_CACHE_SIZE = 4096


class _Choice(NamedTuple):
    """A policy selection with what signing takes from each spec: its log label and, for
    DKIM, its parameters (all of which depend on the configuration and the sender only)."""

    selection: Selection
    signatures: tuple[tuple[SignatureSpec, str, dkim_signer.DKIMParams | None], ...]


class OutboundSigner:
    """Callable processor for the session: (data, envelope) -> Outcome."""

    @classmethod
    def from_config(cls, cfg: OutboundConfig) -> OutboundSigner:
        """Load every key and map the configuration names (ConfigError on any problem)."""
        seal = arc.load_seal_params(cfg.arc_seal, cfg.min_rsa_bits) if cfg.arc_seal else None
        return cls(SigningPolicy.from_config(cfg), cfg.reject_error, seal)

    def __init__(
        self,
        policy: SigningPolicy,
        reject_error: bool = False,
        arc_seal: arc.SealParams | None = None,
    ) -> None:
        self.policy = policy
        self.reject_error = reject_error
        #: `[arc_seal]`: sealed on every message, unless its rule has an arc(...) of its own.
        self.arc_seal = arc_seal
        self._dkim_params: dict[SignatureSpec, dkim_signer.DKIMParams] = {}
        #: SigningPolicy.select is a pure function of its arguments and the configuration
        #: this signer was built with (a reload builds a new signer), so its answers can be
        #: kept; a subclass (qmail's per-message conventions) may look at files: not kept.
        self._memoise = type(policy) is SigningPolicy
        self._choices: dict[tuple[Address | None, str | None, str], _Choice] = {}

    async def __call__(self, data: Buffer, envelope: Envelope) -> Outcome:
        return self.sign(data)

    def _params(self, spec: SignatureSpec) -> dkim_signer.DKIMParams:
        params = self._dkim_params.get(spec)
        if params is None:
            params = dkim_signer.DKIMParams(
                domain=spec.domain,
                selector=spec.selector,
                key=spec.key,
                algorithm=spec.algorithm,
                canonicalization=spec.canonicalization,
                identity=spec.identity,
                headers=spec.headers,
            )
            if len(self._dkim_params) < 4096:  # macro-expanded specs must not grow unbounded
                self._dkim_params[spec] = params
        return params

    def _choose(self, sender: Address | None, list_id: str | None, no_sender: str) -> _Choice:
        key = (sender, list_id, no_sender)
        choice = self._choices.get(key)
        if choice is None:
            selection = self.policy.select(sender, list_id, no_sender=no_sender)
            choice = _Choice(
                selection,
                tuple(
                    (
                        spec,
                        f"{spec.kind}(d={spec.domain},s={spec.selector},a={spec.algorithm})",
                        self._params(spec) if spec.kind == "dkim" else None,
                    )
                    for spec in selection.specs
                ),
            )
            if self._memoise:
                if len(self._choices) >= SELECTION_CACHE_SIZE:
                    self._choices.clear()
                self._choices[key] = choice
        return choice

    def sign(self, data: Buffer) -> Outcome:
        try:
            message = Message(data)
        except MessageFormatError as exc:
            return self._failed(f"sender=<> msgid=<> unsigned: {exc}", "format_error")
        sender, no_sender = message.sender_and_reason()
        context = f"sender=<{sender or ''}> msgid={message.message_id() or '<>'}"
        if b"from" not in message.index.positions:
            # DKIM requires a signed From: such a message passes unsigned, and is logged.
            metrics.unsigned("no_from")
            return Outcome(summary=f"{context} unsigned: no From header")
        choice = self._choose(sender, message.list_id(), no_sender)
        selection = choice.selection
        if not selection.specs and self.arc_seal is None:
            metrics.unsigned("excluded" if selection.rule else "not_configured")
            return Outcome(summary=f"{context} unsigned: {selection.reason or 'no rule'}")
        seal = self.arc_seal
        dk_fields: list[bytes] = []
        dkim_fields: list[bytes] = []
        added: list[str] = []
        skipped: list[str] = []
        signed: list[SignatureSpec] = []
        body_hashes = dkim_signer.BodyHashCache(message)
        for spec, label, params in choice.signatures:
            if spec.kind == "arc":
                seal = arc.SealParams(
                    spec.domain, spec.selector, spec.key, spec.authserv_id, spec.headers
                )
                continue
            try:
                if params is not None:
                    dkim_fields.append(dkim_signer.sign(message, params, body_hashes))
                else:
                    dk_fields.append(
                        domainkeys.sign(
                            message,
                            domain=spec.domain,
                            selector=spec.selector,
                            key=spec.key.private,  # type: ignore[arg-type]
                            canonicalization=spec.canonicalization,
                            headers=spec.headers,
                        )
                    )
            except domainkeys.DomainKeysError as exc:
                # A DomainKeys signature that could not verify is worse than none.
                skipped.append(f"{label} skipped: {exc}")
                continue
            except (dkim_signer.DKIMSignError, ValueError) as exc:
                return self._failed(f"{context} signing failed: {label}: {exc}", "signing_error")
            added.append(label)
            signed.append(spec)
        arc_fields: list[bytes] = []
        if seal is not None:
            label = f"arc(d={seal.domain},s={seal.selector})"
            try:
                arc_fields = arc.seal_message(message, seal)
                instance = arc_fields[0].split(b"i=", 1)[1].split(b";", 1)[0].decode()
                added.append(f"{label[:-1]},i={instance})")
            except arc.ArcSealError as exc:
                skipped.append(f"{label} skipped: {exc}")  # the mail still goes on
        for spec in signed:
            metrics.signature(spec.domain, spec.algorithm)
        if not signed and not arc_fields:
            metrics.unsigned("skipped")
        summary = f"{context} rule={selection.rule or '-'}"
        summary += f" signed={','.join(added)}" if added else " unsigned"
        if skipped:
            summary += " " + "; ".join(skipped)
        return Outcome(prepend=arc_fields + dk_fields + dkim_fields, summary=summary)

    def _failed(self, summary: str, reason: str) -> Outcome:
        """Signing is impossible: 451 with reject_error, else pass unsigned (`reason` is the
        metrics label, see dkproxy.metrics.UNSIGNED_REASONS)."""
        if self.reject_error:
            return Outcome(reject=local_reply(451, SIGNING_ERROR_REPLY), summary=summary)
        metrics.unsigned(reason)
        return Outcome(summary=summary)


def assemble(spool: Spool, outcome: Outcome) -> list[Part]:
    """The outbound message: our header fields on top of the original bytes."""
    return [*outcome.prepend, spool]

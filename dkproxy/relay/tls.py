"""TLS contexts for the relay: the listener's (reloadable) and the smarthost client's.

Both use TLS 1.2 or later (RFC 8996 retires 1.0 and 1.1; RFC 8314 asks for 1.2+) and
OpenSSL's default ciphers; compression is off (CRIME), as in Python's default contexts.
"""

from __future__ import annotations

import ssl

from dkproxy.config import ConfigError


def server_context(certificate: str, key: str, where: str) -> ssl.SSLContext:
    """A server context with the certificate chain and key loaded.

    Raises ConfigError at `where` ("FILE: key") when the files cannot be read or do not
    belong together.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    load_certificate(context, certificate, key, where)
    return context


def load_certificate(context: ssl.SSLContext, certificate: str, key: str, where: str) -> None:
    """Load (or replace, for a reload) the certificate chain and key of `context`.

    New connections get the new certificate; open ones keep theirs. The files are first
    loaded into a scratch context, so a broken pair leaves `context` untouched.
    """
    for target in (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), context):
        try:
            target.load_cert_chain(certificate, key)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            raise ConfigError.at(
                where, f"cannot load certificate {certificate} with key {key}: {reason}"
            ) from None


def client_context(ca_file: str | None, verify: bool) -> ssl.SSLContext:
    """The context for the smarthost: the system trust store (or `ca_file` alone), host name
    checked (RFC 6125); with `verify` False neither is checked (logged loudly at start)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe_failure(exc: BaseException) -> str | None:
    """What went wrong with TLS in `exc` or what caused it ("TLS certificate verification
    failed: ..." or "TLS error: ..."), or None when it is not a TLS failure."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {seen.verify_message}"
        if isinstance(seen, ssl.CertificateError | ssl.SSLError):
            return f"TLS error: {getattr(seen, 'reason', None) or seen}"
        seen = seen.__cause__ or seen.__context__
    return None

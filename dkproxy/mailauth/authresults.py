"""RFC 8601 Authentication-Results: writing ours, finding forged ones.

Every value we write comes from the message or the envelope, i.e. from the sender: domains,
selectors, i= and reasons are reduced to printable ASCII and quoted when they are not plain
tokens, so a hostile signature cannot break the header syntax or smuggle in a line of its own.
Each result goes on its own folded line, which keeps lines short and the header readable.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from .arc import ArcResult
from .message import Message
from .spf import SpfResult
from .verifier import SignatureResult, VerificationReport

FIELD_NAME = b"Authentication-Results"

#: RFC 2045 token: printable ASCII except SPACE and tspecials.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
#: RFC 5322 dot-atom (for local@domain pvalues).
_ATEXT = r"[!#$%&'*+\-/=?^_`{|}~0-9A-Za-z]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_UNSAFE = re.compile(r"[^\x20-\x7e]")
#: Longest reason text kept; the rest is cut (the log has the details).
MAX_REASON = 120
FOLD_WIDTH = 78


_QUOTED_SPECIALS = re.compile(r'(["\\])')
_COMMENT_SPECIALS = re.compile(r"([()\\])")


def _clean(text: str, limit: int = 255) -> str:
    # Printable ASCII (the usual case) is exactly what _UNSAFE leaves alone.
    if text.isascii() and text.isprintable():
        return text[:limit]
    return _UNSAFE.sub("?", text)[:limit]


def _quoted(text: str) -> str:
    if '"' not in text and "\\" not in text:
        return '"' + text + '"'
    return '"' + _QUOTED_SPECIALS.sub(r"\\\1", text) + '"'


def value(text: str) -> str:
    """An RFC 8601 `value`: the text as a token when it is one, else a quoted-string."""
    text = _clean(text)
    return text if _TOKEN.fullmatch(text) else _quoted(text)


@functools.lru_cache(maxsize=4096)
def _plain(text: str, *, address: bool = False) -> str | None:
    """A property value that needs no quoting, or None to leave the property out.

    Only the last property of a clause may be a quoted-string for the `authres` parser
    (its look-ahead wants ";" after one), and a value that is not a token or an address is
    sender-made junk anyway: the reason= text carries what went wrong. Pure, and the same
    domains, selectors and identities come back message after message: kept per value.
    """
    cleaned = _clean(text)
    if cleaned != text or not text:
        return None
    if _TOKEN.fullmatch(text):
        return text
    if address:
        local, at, domain = text.rpartition("@")
        if at and _DOT_ATOM.fullmatch(domain):
            return text if (not local or _DOT_ATOM.fullmatch(local)) else "@" + domain
    return None


@functools.lru_cache(maxsize=1024)  # pure; key sizes, client addresses and policies repeat
def _comment(text: str) -> str:
    """A comment with parentheses and backslashes escaped (ctext is printable ASCII)."""
    return "(" + _COMMENT_SPECIALS.sub(r"\\\1", _clean(text, MAX_REASON)) + ")"


@functools.lru_cache(maxsize=1024)  # pure; the same few reasons come back message after message
def _reason(text: str) -> str:
    """reason= with its quoted-string value (RFC 8601 2.2), cut to MAX_REASON."""
    return "reason=" + _quoted(_clean(text, MAX_REASON))


Prop = tuple[str, str | None]


def _resinfo(
    method: str,
    result: str,
    props: Iterable[Prop],
    reason: str = "",
    comment: str = "",
    last: Prop | None = None,
) -> list[str]:
    """One result as a list of words (joined with spaces or folded by the caller).

    `props` must be plain (see `_plain`); `last` may need quoting and is written last.
    """
    words = [f"{method}={result}"]
    if comment:
        words.append(_comment(comment))
    if reason:
        words.append(_reason(reason))
    for name, val in props:
        if val:
            words.append(f"{name}={val}")
    if last is not None and last[1]:
        words.append(f"{last[0]}={value(last[1])}")
    return words


def _signature_words(sig: SignatureResult) -> list[str]:
    words = list(
        _signature_head(
            sig.method,
            sig.result,
            "" if sig.result == "pass" else sig.reason,
            _key_comment(sig.result, sig.key_bits, sig.testing, sig.body_length),
            sig.domain,
            sig.identity,
            sig.identity_header,
            sig.selector,
            sig.algorithm,
        )
    )
    if sig.method == "dkim" and sig.b_prefix:
        # header.b differs in every message: the only word not kept with the rest.
        words.append(f"header.b={value(sig.b_prefix)}")
    return words


@functools.lru_cache(maxsize=1024)  # pure; a domain's signatures look alike message after message
def _signature_head(
    method: str,
    result: str,
    reason: str,
    comment: str,
    domain: str | None,
    identity: str | None,
    identity_header: str | None,
    selector: str | None,
    algorithm: str | None,
) -> tuple[str, ...]:
    """A signature's resinfo words without header.b (see _signature_words)."""
    d = _plain(domain or "")
    if method == "dkim":
        props: list[Prop] = [
            ("header.d", d),
            ("header.i", _plain(identity or "", address=True)),
            ("header.s", _plain(selector or "")),
            ("header.a", _plain(algorithm or "")),
        ]
        return tuple(_resinfo("dkim", result, props, reason, comment))
    # RFC 8601 registers header.d, header.from and header.sender for domainkeys (no header.b).
    ident = "header.sender" if identity_header == "sender" else "header.from"
    props = [("header.d", d), (ident, _plain(identity or "", address=True))]
    return tuple(_resinfo("domainkeys", result, props, reason, comment))


def _key_comment(
    result: str, key_bits: int | None, testing: bool, body_length: tuple[int, int] | None
) -> str:
    if not (key_bits or testing or body_length):
        return ""
    parts = []
    if key_bits and result in ("pass", "policy"):
        parts.append(f"{key_bits}-bit key")
    if testing:
        parts.append("key in testing mode")
    if body_length is not None:
        # RFC 6376 8.2: say why a good signature is not a pass.
        parts.append(f"body beyond l={body_length[0]} is not signed")
    return "; ".join(parts)


def result_words(report: VerificationReport) -> list[list[str]]:
    """All resinfo clauses of the report, in header order, each as a list of words."""
    clauses: list[list[str]] = [_signature_words(sig) for sig in report.signatures]
    # RFC 8601 wants a result for each method tried: unsigned mail is dkim=none and
    # domainkeys=none (DKIMproxy wrote an empty "host;" header instead).
    if not report.dkim:
        clauses.insert(0, ["dkim=none"])
    if not report.domainkeys:
        clauses.append(["domainkeys=none"])
    if report.arc is not None:
        clauses.append(list(_arc_words(report.arc, report.client_ip)))
    if report.spf is not None:
        clauses.append(list(_spf_words(report.spf)))
    dm = report.dmarc
    if dm is not None:
        record = dm.record
        clauses.append(
            list(
                _dmarc_words(
                    dm.result,
                    dm.from_domain,
                    dm.reason if dm.result != "pass" else "",
                    None if record is None else (record.p, record.sp, record.pct),
                    dm.disposition,
                    report.dmarc_override,
                )
            )
        )
    return clauses


@functools.lru_cache(maxsize=1024)  # pure; a sender's DMARC clause repeats message after message
def _dmarc_words(
    result: str,
    from_domain: str | None,
    reason: str,
    record: tuple[str, str | None, int] | None,
    disposition: str,
    override: str,
) -> tuple[str, ...]:
    """dmarc=RESULT with the record's p=, sp=, pct= and the disposition in a comment."""
    comment = ""
    if record is not None:
        p, sp, pct = record
        comment = f"p={p}"
        if sp:
            comment += f" sp={sp}"
        dis = "none" if override else disposition
        comment += f" pct={pct} dis={dis}"
    props = [("header.from", _plain(from_domain or ""))]
    if override:
        # RFC 7489 6.7 PolicyOverrideType; RFC 8617 7.2.2's evidence goes in a comment.
        props.insert(0, ("policy.override", "trusted_forwarder"))
    words = _resinfo("dmarc", result, props, reason, comment)
    if override:
        words.insert(2 if comment else 1, _comment("override " + override))
    return tuple(words)


@functools.lru_cache(maxsize=1024)  # pure; results are kept per client and sender (spf.py)
def _spf_words(spf: SpfResult) -> tuple[str, ...]:
    if spf.scope == "mailfrom":
        prop: Prop = ("smtp.mailfrom", _plain(spf.identity, address=True) or _plain(spf.domain))
    else:
        prop = ("smtp.helo", _plain(spf.identity))
    reason = spf.explanation if spf.result in ("temperror", "permerror") else ""
    return tuple(_resinfo("spf", spf.result, [prop], reason, f"client {spf.client_ip}"))


@functools.lru_cache(maxsize=1024)  # pure (ArcResult is frozen); "none" in most mail
def _arc_words(arc: ArcResult, client_ip: str | None) -> tuple[str, ...]:
    """RFC 8617 4.2.2 / 7.2: arc=RESULT [header.oldest-pass=N] smtp.remote-ip=ADDR."""
    comment = ""
    if arc.instances:
        comment = f"i={arc.instances}; sealed by {', '.join(arc.sealers) or '?'}"
    reason = arc.reason if arc.result == "fail" else ""
    oldest = str(arc.oldest_pass) if arc.oldest_pass is not None else None
    remote = ("smtp.remote-ip", client_ip) if client_ip else None
    return tuple(
        _resinfo("arc", arc.result, [("header.oldest-pass", oldest)], reason, comment, remote)
    )


def _fold(head: str, clauses: list[list[str]]) -> str:
    """Put each clause on its own line; break long clauses between words."""
    final = len(clauses) - 1
    lines = [head]
    lines.extend(
        _fold_clause(tuple(words), ";" if n < final else "") for n, words in enumerate(clauses)
    )
    return "\r\n".join(lines) + "\r\n"


@functools.lru_cache(maxsize=1024)  # pure; most clauses (SPF, DMARC, ARC, none) repeat
def _fold_clause(words: tuple[str, ...], suffix: str) -> str:
    """One clause as folded lines (without the final line end), `suffix` after its last word."""
    # Every word is printable ASCII without tabs (see _clean), so a line's width is its
    # leading tab (8 columns) plus its length after it: counted as we go, not re-measured.
    lines = []
    last = len(words) - 1
    line = "\t"
    width = 8
    for i, word in enumerate(words):
        piece = word + suffix if i == last else word
        if width == 8:  # nothing on this line yet
            line += piece
            width += len(piece)
        elif width + 1 + len(piece) > FOLD_WIDTH:
            lines.append(line)
            line = "\t  " + piece
            width = 10 + len(piece)
        else:
            line += " " + piece
            width += 1 + len(piece)
    lines.append(line)
    return "\r\n".join(lines)


def authentication_results(report: VerificationReport, authserv_id: str) -> bytes:
    """The complete folded header field (name, value, final CRLF) for `report`."""
    head = f"{FIELD_NAME.decode()}: {authserv_id_value(authserv_id)};"
    return _fold(head, result_words(report)).encode("ascii")


@functools.lru_cache(maxsize=64)
def authserv_id_value(authserv_id: str) -> str:
    cleaned = _clean(authserv_id.strip())
    if not cleaned:
        raise ValueError("authserv-id must not be empty")
    return value(cleaned)


# --------------------------------------------------------------------------------------------
# Forged headers


_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


def _skip_cfws(text: str, pos: int) -> int:
    """Skip whitespace and (nested) comments starting at pos."""
    depth = 0
    while pos < len(text):
        ch = text[pos]
        if depth:
            if ch == "\\":
                pos += 2
                continue
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == "(":
            depth = 1
        elif ch not in " \t\r\n":
            break
        pos += 1
    return pos


def claimed_authserv_id(field_value: bytes) -> str | None:
    """The authserv-id an Authentication-Results value claims, lower-cased, or None."""
    text = _UNFOLD.sub("", field_value.decode("utf-8", "replace"))
    pos = _skip_cfws(text, 0)
    if pos >= len(text):
        return None
    if text[pos] == '"':
        out = []
        pos += 1
        while pos < len(text) and text[pos] != '"':
            if text[pos] == "\\" and pos + 1 < len(text):
                pos += 1
            out.append(text[pos])
            pos += 1
        found = "".join(out)
    else:
        match = re.match(r"[^\s;()\"]+", text[pos:])
        found = match.group(0) if match else ""
    found = found.strip().rstrip(".").lower()
    return found or None


def forged_authentication_results(message: Message, authserv_id: str) -> list[int]:
    """Indexes into `message.headers` of Authentication-Results fields claiming our id.

    RFC 8601 section 5: such fields cannot have come from us (we add ours after this) so they
    are forgeries or leftovers and must be removed; fields of other authserv-ids stay.
    """
    ours = authserv_id.strip().rstrip(".").lower()
    wanted = FIELD_NAME.lower()
    return [
        i
        for i, (name, val) in enumerate(message.headers)
        if name.lower() == wanted and claimed_authserv_id(val) == ours
    ]


def header_byte_ranges(message: Message, indexes: Iterable[int]) -> list[tuple[int, int]]:
    """(start, end) byte offsets in `message.data` of the given header fields."""
    wanted = sorted(set(indexes))
    if not wanted:
        return []  # the usual case: nothing forged to cut out
    sizes = [len(name) + 1 + len(val) for name, val in message.headers]
    offset = message.header_end - sum(sizes)  # skips an mbox "From " line, if any
    starts = []
    for size in sizes:
        starts.append(offset)
        offset += size
    return [(starts[i], starts[i] + sizes[i]) for i in wanted]


_FIELD_START = re.compile(rb"(?im)^" + FIELD_NAME + rb"[ \t]*:")


def forged_ranges_in_raw(data: bytes, authserv_id: str) -> list[tuple[int, int]]:
    """(start, end) byte offsets of Authentication-Results fields claiming our id in a header
    block that `Message` could not parse (a malformed line somewhere in it).

    Readers differ on where such a header block ends, so every field of that name before the
    first empty line counts, with its continuation lines (RFC 8601 5: a field claiming our
    authserv-id that we did not add must not reach the reader).
    """
    ours = authserv_id.strip().rstrip(".").lower()
    end = data.find(b"\r\n\r\n")
    block = data if end < 0 else data[: end + 2]
    ranges = []
    for match in _FIELD_START.finditer(block):
        start = match.start()
        if start and block[start - 2 : start] != b"\r\n":
            continue  # not at the start of a line that a CRLF began
        stop = block.find(b"\r\n", start)
        while stop >= 0 and block[stop + 2 : stop + 3] in (b" ", b"\t"):
            stop = block.find(b"\r\n", stop + 2)
        stop = len(block) if stop < 0 else stop + 2
        if claimed_authserv_id(block[match.end() : stop]) == ours:
            ranges.append((start, stop))
    return ranges

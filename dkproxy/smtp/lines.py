"""DATA lines as the next hop stores them: line ends and the line-length limit.

The SMTP listener applies both to the message while it is received, before anything is
signed, so that what is signed is exactly what Postfix (or qmail) stores on the next hop.
"""

from __future__ import annotations


def wire_line_ends(piece: bytes) -> bytes:
    """Rewrite the line ends of a piece of DATA the way Postfix's smtpd stores them.

    RFC 5321 2.3.8: CR and LF only occur together, as the line end. Postfix 3.7 (the next hop
    the shipped master.cf names) reads every LF as a line end, drops every CR right before it
    and turns every other CR into a space; its smtp client then sends each line with CRLF.
    Measured with the real Postfix (tests/test_line_ends.py), e.g. `a<CR><CR><LF>` -> `a<CRLF>`,
    `a<CR>b<CRLF>` -> `a b<CRLF>`, `a<LF><CR>b` -> `a<CRLF> b`. qmail-smtpd passes the
    resulting clean CRLF lines on unchanged. Doing the same before signing means that what is
    signed is what the next hop stores, so the signature survives.

    `piece` is wire data (still dot-stuffed), in any size, cut after an LF or, within a very
    long line, anywhere but inside a run of CRs (a run of CRs at the very end of a piece is
    kept as it is, since the next piece may start with the LF that ends it). Returns bytes in
    which every line end is CRLF and no other CR is left.
    """
    crs = piece.count(b"\r")
    if crs == piece.count(b"\n") and crs == piece.count(b"\r\n"):
        return piece  # the usual case: clean CRLF lines
    lines = piece.split(b"\n")
    tail = lines.pop()  # after the last LF: the start of a line that goes on in the next piece
    out = [line.rstrip(b"\r").replace(b"\r", b" ") + b"\r\n" for line in lines]
    if tail:
        body = tail.rstrip(b"\r")
        out.append(body.replace(b"\r", b" ") + tail[len(body) :])
    return b"".join(out)


#: Postfix's smtp_line_length_limit (RFC 5321 4.5.3.1.6: 998 characters before CRLF).
LINE_LENGTH_LIMIT = 998


def break_long_lines(content: bytes, column: int) -> tuple[bytes, int]:
    """Break lines longer than 998 characters the way Postfix's smtp client sends them on.

    Postfix (smtp_line_length_limit = 998, the default since 2.9) inserts CRLF SPACE after
    the 998th character of a longer line and after every further 997 characters, header and
    body alike; measured with the real Postfix in tests/test_line_ends.py. Doing it before
    signing keeps the signature valid on the next hop (RFC 5322 2.1.1 allows no longer line).

    `content` is unstuffed message data with CRLF line ends, in pieces cut anywhere; `column`
    is how many characters the current line already holds from earlier pieces. Returns the
    content to store and the column after it. The break goes in only when the line really
    goes on, so a line of exactly 998 characters is left alone.
    """
    lines = content.split(b"\r\n")
    limit = LINE_LENGTH_LIMIT
    if column + len(lines[0]) <= limit and max(map(len, lines)) <= limit:
        return content, (column + len(lines[0]) if len(lines) == 1 else len(lines[-1]))
    out = []
    for index, line in enumerate(lines):
        if index:
            column = 0
        if column + len(line) <= limit:
            column += len(line)
            out.append(line)
            continue
        room = limit - column
        segments, rest = [line[:room]], line[room:]
        while rest:
            segments.append(b" " + rest[: limit - 1])
            rest = rest[limit - 1 :]
        column = len(segments[-1])
        out.append(b"\r\n".join(segments))
    return b"\r\n".join(out), column

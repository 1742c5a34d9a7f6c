"""The spool (memory or file) and the relay's dot-stuffing over spooled parts."""

from __future__ import annotations

import os
import random

import pytest

from dkproxy.mailauth.dkim_signer import body_hash
from dkproxy.mailauth.message import Message
from dkproxy.smtp.downstream import dot_stuffed
from dkproxy.smtp.spool import Spool


def reference_stuffing(data: bytes) -> bytes:
    """RFC 5321 4.5.2 the slow, obvious way, for comparison."""
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    lines = data.split(b"\r\n")[:-1] if data else []
    return (
        b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        + b".\r\n"
    )


def random_message(rng: random.Random, size: int) -> bytes:
    pieces = [b".", b"\r\n", b"\r\n.", b"..", b"x", b"\r", b"\n", b"abc ", b"\r\n\r\n"]
    out = bytearray(b"From: a@example.org\r\nSubject: s\r\n\r\n")
    while len(out) < size:
        out += rng.choice(pieces)
    return bytes(out)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("threshold", [0, 10, 1 << 20])
def test_spool_keeps_bytes_in_memory_or_file(threshold: int) -> None:
    data = random_message(random.Random(threshold), 5000)
    before = open_fds()
    with Spool(threshold=threshold) as spool:
        for start in range(0, len(data), 333):
            spool.write(data[start : start + 333])
        assert len(spool) == len(data)
        assert spool.on_disk == (threshold < len(data))
        assert bytes(spool.buffer()) == data
        assert b"".join(bytes(c) for c in spool.chunks(100)) == data
        assert b"".join(bytes(c) for c in spool.segment(17, 4000).chunks(64)) == data[17:4000]
        message = Message(spool.buffer())
        assert message.get_last("subject") == "s"
        assert body_hash(message, relaxed=True) == body_hash(Message(data), relaxed=True)
        spool.release()
        assert b"".join(bytes(c) for c in spool.chunks()) == data  # still readable
    assert open_fds() == before  # the file and the map are gone


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 4096])
def test_dot_stuffing_of_spooled_parts_matches_the_rfc(chunk: int) -> None:
    rng = random.Random(chunk)
    for _ in range(20):
        data = random_message(rng, rng.randint(0, 3000))
        header = b"DKIM-Signature: x\r\n"
        with Spool(threshold=rng.choice([0, 100, 1 << 20])) as spool:
            spool.write(data)
            stuffed = b"".join(dot_stuffed([header, spool], chunk=chunk))
        assert stuffed == reference_stuffing(header + data)


def test_empty_message_is_just_the_dot() -> None:
    with Spool() as spool:
        assert b"".join(dot_stuffed([spool])) == b".\r\n"
    assert b"".join(dot_stuffed([b"no final newline"])) == b"no final newline\r\n.\r\n"

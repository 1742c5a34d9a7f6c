"""The downstream client and its pool, against a recording SMTP server."""

from __future__ import annotations

import asyncio

from dkproxy.smtp.downstream import DownstreamError, RelayClient, RelayPool, Reply
from tests.support.sink import CaptureServer
from tests.support.tools import free_port


def test_client_relays_commands_and_multiline_replies_verbatim() -> None:
    async def scenario(address: tuple[str, int]) -> list[Reply]:
        client = RelayClient(*address, timeout=5)
        replies = [await client.connect(), await client.ehlo("proxy.test")]
        replies += await client.pipeline([b"MAIL FROM:<a@example.org> ENVID=Ab1",
                                          b"RCPT TO:<b@example.net> NOTIFY=NEVER"])  # fmt: skip
        replies.append(await client.send_message([b"Subject: x\r\n\r\n.dot\r\n"]))
        await client.quit()
        return replies

    with CaptureServer() as down:
        greeting, ehlo, mail, rcpt, data = asyncio.run(scenario((down.host, down.port)))
        (tx,) = down.messages
    assert greeting.code == 220 and ehlo.code == 250 and len(ehlo.lines) > 3
    assert ehlo.render().count(b"\r\n") == len(ehlo.lines)
    assert ehlo.render().startswith(b"250-") and b"\r\n250 " in ehlo.render()
    assert (mail.code, rcpt.code, data.code) == (250, 250, 250)
    assert tx.mail_line == "MAIL FROM:<a@example.org> ENVID=Ab1"
    assert tx.raw_data == b"Subject: x\r\n\r\n..dot\r\n"


def test_unreachable_or_silent_downstream_raises() -> None:
    async def scenario() -> None:
        client = RelayClient("127.0.0.1", free_port(), timeout=1)
        try:
            await client.connect()
        except DownstreamError as exc:
            assert "cannot connect" in str(exc)
        else:
            raise AssertionError("connect should fail")

    asyncio.run(scenario())
    with CaptureServer(delays={"MAIL": 3}) as down:

        async def slow() -> str:
            client = RelayClient(down.host, down.port, timeout=0.5)
            await client.connect()
            try:
                await client.command(b"MAIL FROM:<a@example.org>")
            except DownstreamError as exc:
                return str(exc)
            return "no error"

        assert "did not answer" in asyncio.run(slow())


def test_pool_reuses_live_sessions_and_quits_idle_ones() -> None:
    async def scenario(host: str, port: int) -> tuple[bool, bool, bool]:
        pool = RelayPool(host, port, timeout=5, max_idle=0.2)
        first = pool.new_client()
        await first.connect()
        await first.ehlo("proxy.test")
        assert pool.give_back(first)
        reused = pool.take() is first
        assert pool.give_back(first)
        await asyncio.sleep(0.3)
        await pool.expire()
        emptied = pool.take() is None
        refused = not pool.give_back(pool.new_client())  # never connected: not pooled
        return reused, emptied, refused

    with CaptureServer() as down:
        reused, emptied, refused = asyncio.run(scenario(down.host, down.port))
        commands = list(down.commands)
    assert reused and emptied and refused
    assert commands[-1] == "QUIT"  # the expired session was closed politely

"""`dkproxy demo`: the outbound proxy with a built-in configuration, shown working.

It generates keys for example.com, starts a throw-away downstream SMTP server and the real
outbound proxy (the same session, policy and signer code as `dkproxy out`) on free loopback
ports, sends one message through, prints what arrived downstream and verifies every signature
against the generated public keys. Nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
from email.utils import formatdate, make_msgid
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from dkproxy import config
from dkproxy.mailauth import domainkeys
from dkproxy.mailauth.keys import load_signing_key
from dkproxy.mailauth.message import Message
from dkproxy.outbound import OutboundSigner, assemble
from dkproxy.policy import SigningPolicy
from dkproxy.smtp.downstream import Downstream, DownstreamSettings
from dkproxy.smtp.server import ProxyServer
from dkproxy.smtp.settings import SessionSettings

DOMAIN = "example.com"


def _write_keys(directory: Path) -> tuple[Path, Path]:
    rsa_path, ed_path = directory / "rsa.key", directory / "ed25519.key"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    for path, key in ((rsa_path, rsa_key), (ed_path, ed_key)):
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return rsa_path, ed_path


class _Downstream:
    """The smallest SMTP server that keeps what it is given (a stand-in for the MTA)."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 downstream ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-downstream\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                body = await reader.readuntil(b"\r\n.\r\n")
                self.messages.append(body[:-3].replace(b"\r\n..", b"\r\n."))
                writer.write(b"250 2.0.0 Ok: queued as DEMO1\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _sample_message() -> bytes:
    return (
        "From: Alice Example <alice@example.com>\r\n"
        "To: Bob <bob@example.net>\r\n"
        "Subject: dkproxy demo\r\n"
        f"Date: {formatdate(localtime=True)}\r\n"
        f"Message-ID: {make_msgid(domain=DOMAIN)}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Hello Bob,\r\n"
        ".a line that starts with a dot survives dot-stuffing.\r\n"
        "\r\n"
        "-- \r\nAlice\r\n"
    ).encode()


async def _run(workdir: Path) -> int:
    rsa_path, ed_path = _write_keys(workdir)
    downstream = _Downstream()
    sink = await asyncio.start_server(downstream.handle, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    proxy_port = _free_port()
    argv = [
        f"--keyfile={rsa_path}", "--selector=demo", f"--domain={DOMAIN}",
        "--signature=dkim(c=relaxed,a=rsa-sha256)",
        f"--signature=dkim(c=relaxed,a=ed25519-sha256,key={ed_path},s=demo-ed)",
        "--signature=domainkeys(c=nofws)",
        f"127.0.0.1:{proxy_port}", f"127.0.0.1:{sink_port}",
    ]  # fmt: skip
    print("$ dkproxy out " + " ".join(argv) + "\n")
    cfg = config.parse_proxy_command("out", argv)
    policy = SigningPolicy.from_config(cfg)  # type: ignore[arg-type]
    signer = OutboundSigner(policy)
    settings = SessionSettings(hostname="dkproxy.demo", relay_host="127.0.0.1",
                               relay_port=sink_port)  # fmt: skip
    listener = socket.create_server(("127.0.0.1", proxy_port))
    proxy = ProxyServer(listener, settings, signer, lambda: signer, assemble)
    proxy_task = asyncio.create_task(proxy.serve())
    await asyncio.sleep(0.05)

    client = Downstream(DownstreamSettings("127.0.0.1", proxy_port, timeout=10))
    await client.connect()
    await client.ehlo(b"demo.client")
    await client.command(b"MAIL FROM:<alice@example.com>")
    await client.command(b"RCPT TO:<bob@example.net>")
    reply = await client.send_message([_sample_message()])
    await client.quit()
    print(f"proxy answered: {reply}\n")
    assert proxy._stopping is not None
    proxy._stopping.set()
    await proxy_task
    sink.close()
    if not downstream.messages:
        print("nothing arrived downstream")
        return 1
    delivered = downstream.messages[0]
    print("---- message as delivered downstream " + "-" * 30)
    print(delivered.decode("utf-8", "replace").replace("\r\n", "\n"))
    print("-" * 67)
    return _verify(delivered, {
        f"demo._domainkey.{DOMAIN}.": load_signing_key(str(rsa_path)).dns_record,
        f"demo-ed._domainkey.{DOMAIN}.": load_signing_key(str(ed_path)).dns_record,
    })  # fmt: skip


def _verify(delivered: bytes, records: dict[str, str]) -> int:
    """Check each signature against the generated keys, as a receiver would with DNS."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name.decode())
        return record.encode() if record else None

    verdicts: list[bool] = []
    message = Message(delivered)
    dkim_index = 0
    for position, (name, value) in enumerate(message.headers):
        if name.lower() == b"dkim-signature":
            try:
                ok = dkim.DKIM(delivered).verify(idx=dkim_index, dnsfunc=lookup)
            except dkim.DKIMException as exc:  # e.g. a body hash mismatch is raised
                print(f"  ({exc})")
                ok = False
            tags = dict(part.strip().split("=", 1) for part in
                        value.decode().replace("\r\n", "").split(";") if "=" in part)  # fmt: skip
            print(f"dkim={'pass' if ok else 'fail'} header.d={tags['d']} header.s={tags['s']} "
                  f"header.a={tags['a']}")  # fmt: skip
            verdicts.append(bool(ok))
            dkim_index += 1
        elif name.lower() == b"domainkey-signature":
            sig = domainkeys.parse_signature(value)
            result = domainkeys.verify_with_key(
                message, position, sig, records.get(sig.key_name + ".")
            )
            print(f"domainkeys={result.result} header.d={sig.d} header.s={sig.s}")
            verdicts.append(result.result == "pass")
    if verdicts and all(verdicts):
        print(f"\nall {len(verdicts)} signatures verify: signing works.")
        return 0
    print("\nsignature verification FAILED")
    return 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dkproxy demo", description=__doc__)
    parser.parse_args(argv)
    from dkproxy.daemon import setup_logging

    setup_logging("info")
    with tempfile.TemporaryDirectory(prefix="dkproxy-demo-") as workdir:
        return asyncio.run(_run(Path(workdir)))

"""Running `dkproxy relay` in tests: its TOML file, credentials, and swaks as the client."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from .proxy import ProxyProcess, run_dkproxy
from .smarthost import CertFiles
from .tools import free_port, require_tool

PASSWORDS = {"webapp": "correct horse battery staple", "printer": "tr0ub4dor&3-printer"}
SMARTHOST_LOGIN = ("dkproxy-hop", "hop-secret-Zq8#v2")


def add_login(path: str, login: str, password: str, *extra: str) -> None:
    """`dkproxy passwd --stdin FILE LOGIN`, as an administrator would run it."""
    done = run_dkproxy("passwd", "--stdin", *extra, path, login, input=password.encode() + b"\n")
    assert done.returncode == 0, done.stderr


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class RelaySetup:
    """Files for one relay: the TOML text is made from `sections` (table -> key -> value)."""

    directory: str
    relay_cert: CertFiles
    smarthost_ca: str
    key_path: str
    selector: str
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "relay.toml")

    def write(self) -> str:
        lines = ['mode = "relay"', 'hostname = "relay.example.test"']
        signing = (
            "[signing.defaults]\n"
            f'key = "{self.key_path}"\nselector = "{self.selector}"\n'
            '[[signing.sign]]\nmatch = ["example.org"]\n'
            '  [[signing.sign.signature]]\n  type = "dkim"\n'
            '  [[signing.sign.signature]]\n  type = "domainkeys"\n'
        )
        for table, values in self.sections.items():
            if values is None:
                continue
            lines.append(f"[{table}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        text = "\n".join(lines) + "\n" + signing
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return self.config_path

    def process(self, env: dict[str, str] | None = None) -> ProxyProcess:
        self.write()
        return ProxyProcess(
            "relay", ["-c", self.config_path], positional=False, port=self.port, env=env
        )


def swaks(
    port: int,
    *,
    sender: str = "alice@example.org",
    to: str = "bob@example.net",
    data: bytes | None = None,
    tls: str | None = "starttls",
    auth: tuple[str, str] | None = None,
    mechanism: str = "PLAIN",
    extra: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Run Debian's swaks against 127.0.0.1:port; (exit status, transcript)."""
    command = [
        require_tool("swaks"),
        "--server", f"127.0.0.1:{port}",
        "--from", sender,
        "--to", to,
        "--ehlo", "app.example.test",
        "--timeout", "60",
    ]  # fmt: skip
    if tls == "starttls":
        command.append("--tls")
    elif tls == "implicit":
        command.append("--tlsc")
    if auth is not None:
        command += ["--auth", mechanism, "--auth-user", auth[0], "--auth-password", auth[1]]
    if data is not None:
        command += ["--data", "-"]
    command += list(extra)
    done = subprocess.run(command, input=data, capture_output=True, timeout=120, check=False)
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


def message(
    sender: str = "alice@example.org", subject: str = "relay test", extra: str = ""
) -> bytes:
    """A small message with the given From (CRLF line ends)."""
    text = (
        f"From: Alice <{sender}>\r\nTo: Bob <bob@example.net>\r\nSubject: {subject}\r\n"
        f"Date: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject.replace(' ', '.')}"
        f"@example.org>\r\n{extra}\r\nHello from the application.\r\n.leading dot line\r\n"
    )
    return text.encode()

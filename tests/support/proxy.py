"""Run the real `dkproxy` daemon as a subprocess, the way an init system would."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType

from .tools import die_with_parent, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ProxyProcess:
    """`python -m dkproxy MODE ARGS... 127.0.0.1:PORT RELAY` on a free port.

    `args` are the options; `listen` defaults to a free port and `relay` must be given unless
    the arguments or a config file already name it (then pass positional=False).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        mode: str,
        args: Sequence[str],
        relay: str | None = None,
        *,
        positional: bool = True,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.mode = mode
        self.port = port or free_port()
        command = [sys.executable, "-m", "dkproxy", mode, *args]
        if positional:
            if relay is None:
                raise ValueError("relay address needed")
            command += [f"{self.host}:{self.port}", relay]
        self.command = command
        self.env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the daemon
            prefix="dkproxy-log-", suffix=".txt", delete=False
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self._final_log: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            preexec_fn=die_with_parent,  # a killed pytest leaves no daemon behind
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dkproxy exited with {self.proc.returncode}:\n{self.log}")
            if "listening on" in self.log:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"dkproxy did not start listening:\n{self.log}")

    @property
    def log(self) -> str:
        """Everything the daemon logged (still readable after the context has closed)."""
        if self._final_log is not None:
            return self._final_log
        with open(self._log.name, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(35)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._final_log = self.log
        os.unlink(self._log.name)

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        return smtplib.SMTP(self.host, self.port, timeout=timeout)


def run_dkproxy(
    *args: str, timeout: float = 60.0, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived dkproxy command (check-config, keygen, ...) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "dkproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=ROOT,
        input=input.decode() if input is not None else None,
        check=False,
    )

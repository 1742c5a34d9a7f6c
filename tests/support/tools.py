"""Finding external tools and ports for tests.

Tests drive real programs (NSD, Postfix's smtp-sink, Perl Mail::DKIM, opendkim, go-msgauth).
A developer laptop may lack some of them, so locally a missing tool skips the test; under CI the
environment is supposed to be complete, so there a missing tool FAILS the test instead of
silently shrinking the suite.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

#: Directories searched besides PATH: daemons such as nsd and smtp-sink live in sbin, which
#: is often missing from a non-root PATH.
EXTRA_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")

_TRUE = {"1", "true", "yes", "on"}


def in_ci() -> bool:
    """True when the CI environment variable says so (CI=true/1/yes/on)."""
    return os.environ.get("CI", "").strip().lower() in _TRUE


def missing(reason: str) -> None:
    """Fail under CI, skip elsewhere: the one policy for absent prerequisites."""
    if in_ci():
        pytest.fail(f"required test prerequisite missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def find_tool(name_or_path: str) -> str | None:
    """Absolute path of an executable, or None; never skips or fails."""
    if os.sep in name_or_path:
        path = os.path.abspath(name_or_path)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    search = os.pathsep.join([os.environ.get("PATH", ""), *EXTRA_DIRS])
    found = shutil.which(name_or_path, path=search)
    return os.path.abspath(found) if found else None


def require_tool(name_or_path: str) -> str:
    """Absolute path of an executable the test needs; skip (locally) or fail (CI) if absent."""
    path = find_tool(name_or_path)
    if path is None:
        missing(f"tool not found: {name_or_path}")
        raise AssertionError("unreachable")  # pragma: no cover - skip/fail raise
    return path


def require_perl_module(module: str) -> str:
    """Path of perl after checking that `module` loads; skip/fail like require_tool."""
    perl = require_tool("perl")
    proc = subprocess.run([perl, f"-M{module}", "-e", "1"], capture_output=True, check=False)
    if proc.returncode != 0:
        missing(f"perl module not loadable: {module}")
    return perl


def die_with_parent() -> None:
    """Popen preexec_fn: have the kernel SIGTERM the child when the test process dies.

    Keeps a killed or crashed pytest from leaving NSD / smtp-sink daemons behind. (The signal
    follows the *thread* that started the child, so start daemons from the main thread.)
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS servers listen on both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until a TCP connect to host:port succeeds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s ({last})")

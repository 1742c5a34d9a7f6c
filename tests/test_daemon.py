"""The daemon as an administrator meets it: start-up errors, signals, workers, access lists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.client import RawClient
from tests.support.proxy import ROOT, ProxyProcess, run_dkproxy
from tests.support.sink import CaptureServer
from tests.support.testkeys import make_rsa_key
from tests.support.tools import free_port
from tests.support.verifiers import signature_tags

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: daemon\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_rsa_key(str(tmp_path_factory.mktemp("keys") / "k.pem"), 1024)


def test_refuses_to_start_with_unusable_keys_naming_the_file(tmp_path: Path) -> None:
    relay = f"127.0.0.1:{free_port()}"
    listen = f"127.0.0.1:{free_port()}"
    missing = tmp_path / "missing.key"
    weak = make_rsa_key(str(tmp_path / "weak.key"), 512)
    garbage = tmp_path / "garbage.key"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    for key, reason in ((missing, "cannot read"), (weak, "512 bits"), (garbage, "not a valid")):
        result = run_dkproxy("out", f"--keyfile={key}", "--selector=s", "--domain=example.org",
                             listen, relay, timeout=30)  # fmt: skip
        assert result.returncode != 0
        assert str(key) in result.stderr and reason in result.stderr, result.stderr


def test_config_errors_name_file_and_line(tmp_path: Path, keyfile: str) -> None:
    conf = tmp_path / "dkimproxy_out.conf"
    conf.write_text(f"listen 127.0.0.1:{free_port()}\nrelay 127.0.0.1:25\n"
                    f"keyfile {keyfile}\nselecter s1\n")  # fmt: skip
    result = run_dkproxy("out", f"--conf_file={conf}", timeout=30)
    assert result.returncode == 2
    assert f"{conf}:4:" in result.stderr and "selecter" in result.stderr


def test_pidfile_sighup_reload_and_sigterm(tmp_path: Path, keyfile: str) -> None:
    second_key = make_rsa_key(str(tmp_path / "second.pem"), 1024)
    pidfile = tmp_path / "dkproxy.pid"
    conf = tmp_path / "out.conf"
    with CaptureServer() as down:
        proxy = ProxyProcess("out", [f"--conf_file={conf}", "--workers=2"], positional=False)
        conf.write_text(f"listen {proxy.address}\nrelay {down.address}\ndomain example.org\n"
                        f"keyfile {keyfile}\nselector first\npidfile {pidfile}\n")  # fmt: skip
        with proxy:
            assert proxy.proc is not None
            assert int(pidfile.read_text()) == proxy.proc.pid
            workers = _children(proxy.proc.pid)
            assert len(workers) == 2
            with proxy.smtp() as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            conf.write_text(conf.read_text().replace("selector first", "selector second")
                            .replace(keyfile, second_key))  # fmt: skip
            proxy.signal(signal.SIGHUP)
            _wait_for(lambda: proxy.log.count("configuration reloaded") == 2)
            with proxy.smtp() as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            # A broken configuration on reload is logged; the running one stays.
            conf.write_text(conf.read_text().replace("domain example.org", "domian x"))
            proxy.signal(signal.SIGHUP)
            _wait_for(lambda: proxy.log.count("reload failed") == 2)
            with proxy.smtp() as client:
                client.sendmail("a@example.org", ["b@example.net"], MESSAGE)
        assert proxy.proc.returncode == 0
        assert not pidfile.exists()
        assert all(not _alive(pid) for pid in workers)
    selectors = [signature_tags(tx.data)[0][1]["s"] for tx in down.messages if tx.data]
    assert selectors == ["first", "second", "second"]


def test_access_lists_refuse_clients(keyfile: str) -> None:
    with CaptureServer() as down:
        args = [f"--keyfile={keyfile}", "--selector=s", "--domain=example.org",
                "--cidr_deny=127.0.0.0/8"]  # fmt: skip
        with ProxyProcess("out", args, down.address) as proxy, \
                RawClient(proxy.host, proxy.port) as client:  # fmt: skip
            code, _ = client.reply()
            assert code == 554
            assert client.closed_by_peer()
        args[-1] = "--cidr_allow=127.0.0.1/32"
        with ProxyProcess("out", args, down.address) as proxy, \
                RawClient(proxy.host, proxy.port) as client:  # fmt: skip
            assert client.reply()[0] == 220


def test_dkimproxy_program_names_work(tmp_path: Path, keyfile: str) -> None:
    """An init script that runs `dkimproxy.out ...` works once that name points at dkproxy."""
    link = tmp_path / "dkimproxy.out"
    link.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {ROOT!r})\n"
                    "from dkproxy.cli import main\nsys.exit(main())\n")  # fmt: skip
    link.chmod(0o755)
    result = subprocess.run([str(link), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "usage: dkproxy out" in result.stdout


def _children(pid: int) -> list[int]:
    """Child processes of pid, from /proc (no procps needed)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry))
    return children


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")

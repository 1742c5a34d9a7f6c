"""A private, throw-away Postfix instance for end-to-end tests.

Administrators put dkproxy behind Postfix with the master.cf lines shipped in conf/; the only
honest test of those lines is a real Postfix running them. `PostfixInstance` runs one entirely
under a temporary directory (config, queue, data directory, log file) on 127.0.0.1 ports the
test picked, and never reads or writes /etc/postfix or binds port 25.

Findings that shaped it (Postfix 3.7, run as root):

* `-c DIR` needs no `alternate_config_directories` entry when root runs the commands
  (`postfix`, `postqueue`, `master`): that check only guards unprivileged users.
* `postfix -c DIR check` creates the queue directories with the right owners (postfix,
  postdrop for maildrop/ and public/); the data directory must be owned by postfix or the
  master cannot create its lock file.
* Daemons run as the postfix user, so every directory above the instance must be searchable
  (mkdtemp makes 0700 directories; pytest's tmp_path is below a 0700 directory).
* Debian's master.cf chroots most services; the chroot would need copies of /etc files, so the
  instance's own master.cf runs every service unchrooted.
* `maillog_file` (postlogd, Postfix >= 3.4) writes the log to a file of ours, but only below
  `maillog_file_prefixes`, which defaults to /var and /dev/stdout.
* Every Postfix program re-reads main.cf, pausing 300 ms, until the file is over a second old
  (a guard against half-written files); backdating the freshly written files saves seconds.
* The master is run in the foreground (`master -c DIR`; it becomes its own session leader).
  PR_SET_PDEATHSIG does not survive it (the kernel clears it when the master switches
  effective ids to create its lock file), so a small watchdog process carries the
  parent-death signal and passes SIGTERM on: a killed pytest leaves no Postfix behind.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType

from .tools import die_with_parent, missing, require_tool, wait_for_port

#: Stays in the foreground with the master as its child; SIGTERM (our parent-death signal, or
#: teardown) is passed on to the master, which passes it on to its own process group. As a
#: child subreaper it also reaps the daemons that outlive the master by a moment (in a
#: container whose init does not reap, they would stay zombies), so its exit means "all gone".
_WATCHDOG = r"""
import ctypes, os, signal, subprocess, sys, time
try:
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (OSError, AttributeError):
    pass
master = subprocess.Popen(sys.argv[1:])
def stop(signum, frame):
    try:
        master.terminate()
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
code = master.wait()
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
            time.sleep(0.05)
    except ChildProcessError:
        break
sys.exit(code)
"""

#: The services every Postfix needs (Postfix's stock master.cf, minus local delivery and
#: the pipe examples), without chroot.
BASE_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def base_services_except(services: str) -> str:
    """BASE_MASTER_CF without the services `services` defines again (e.g. a snippet that
    replaces the pickup line): master.cf must name each service once."""
    redefined = {
        tuple(line.split()[:2])
        for line in services.splitlines()
        if line.strip() and not line[0].isspace() and not line.startswith("#")
    }
    return "".join(
        line + "\n"
        for line in BASE_MASTER_CF.splitlines()
        if line.startswith("#") or tuple(line.split()[:2]) not in redefined
    )


_PORT = re.compile(r"(\[?127\.0\.0\.1\]?:)(\d+)")


class PostfixError(RuntimeError):
    """The instance did not start or a Postfix command failed; carries the log tail."""


def adapt_master_cf(
    text: str,
    *,
    ports: Mapping[int, int],
    services: Mapping[str, str] | None = None,
    options: Mapping[str, Mapping[str, str | None]] | None = None,
) -> str:
    """Rewrite a master.cf snippet (e.g. conf/postfix-master-out.cf) for a private instance.

    ports: documented port -> test port, wherever "127.0.0.1:N" or "[127.0.0.1]:N" appears.
    services: documented inet service name -> new name (e.g. "submission" -> "127.0.0.1:2525").
    options: documented service name -> {parameter: new value, or None to drop the -o line}.
    Everything else (columns, the other -o lines, comments) is kept as written, so the test
    runs the snippet administrators are told to paste.
    """
    services = services or {}
    options = options or {}

    def port(match: re.Match[str]) -> str:
        number = int(match.group(2))
        return match.group(1) + str(ports.get(number, number))

    out: list[str] = []
    current = ""
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            out.append(line)
            continue
        if not line[0].isspace():
            fields = line.split()
            current = fields[0]
            if len(fields) > 1 and fields[1] == "inet" and current in services:
                line = line.replace(current, services[current], 1)
            out.append(_PORT.sub(port, line))
            continue
        m = re.match(r"(\s+-o\s+)([A-Za-z0-9_]+)=(.*)$", line)
        overrides = options.get(current, {})
        if m and m.group(2) in overrides:
            value = overrides[m.group(2)]
            if value is None:
                continue
            line = f"{m.group(1)}{m.group(2)}={value}"
        out.append(_PORT.sub(port, line))
    return "\n".join(out) + "\n"


def _inet_services(master_cf: str) -> list[str]:
    names = []
    for line in master_cf.splitlines():
        fields = line.split()
        if len(fields) > 1 and not line[0].isspace() and fields[1] == "inet" and line[0] != "#":
            names.append(fields[0])
    return names


@dataclass
class QueuedMessage:
    """One entry of `postqueue -j`."""

    queue_name: str  # incoming | active | deferred | hold | maildrop
    queue_id: str
    sender: str
    recipients: list[tuple[str, str]]  # (address, delay reason or "")


class PostfixInstance:
    """Postfix with its own config and queue directories on test-chosen loopback ports.

    `services` is master.cf text appended to BASE_MASTER_CF (use `adapt_master_cf` on the
    shipped snippets); every inet service in it must listen on 127.0.0.1:PORT explicitly.
    `main` entries override or extend the generated main.cf.
    """

    def __init__(
        self,
        *,
        services: str,
        relayhost: str,
        myhostname: str = "mta.postfix.test",
        main: Mapping[str, str] | None = None,
    ) -> None:
        for name in _inet_services(services):
            if not re.fullmatch(r"127\.0\.0\.1:\d+", name):
                raise ValueError(f"inet service {name!r} must be 127.0.0.1:PORT (no port 25)")
        self.services = services
        self.relayhost = relayhost
        self.myhostname = myhostname
        self.main_overrides = dict(main or {})
        self.dir = ""
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._postfix = ""
        self._postqueue = ""
        #: what `postfix check` said (warnings about the configuration end up here)
        self.check_output = ""

    # -- paths --------------------------------------------------------------------------------

    @property
    def config_dir(self) -> str:
        return os.path.join(self.dir, "etc")

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.dir, "spool")

    @property
    def maillog_path(self) -> str:
        return os.path.join(self.dir, "maillog")

    @property
    def inet_ports(self) -> list[int]:
        return [int(name.rsplit(":", 1)[1]) for name in _inet_services(self.services)]

    # -- configuration ------------------------------------------------------------------------

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters: a private, loopback-only, DNS-free relay to `relayhost`."""
        params = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": os.path.join(self.dir, "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.myhostname,
            "mydomain": "postfix.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": self.relayhost,
            "smtp_dns_support_level": "disabled",
            "maillog_file": self.maillog_path,
            "maillog_file_prefixes": self.dir,
            "biff": "no",
            # Retry deferred mail quickly unless a test says otherwise.
            "queue_run_delay": "2s",
            "minimal_backoff_time": "2s",
            "maximal_backoff_time": "4s",
        }
        params.update(self.main_overrides)
        return params

    def _write_config(self) -> None:
        os.makedirs(self.config_dir)
        with open(os.path.join(self.config_dir, "main.cf"), "w", encoding="utf-8") as fh:
            fh.writelines(f"{name} = {value}\n" for name, value in self.main_cf().items())
        with open(os.path.join(self.config_dir, "master.cf"), "w", encoding="utf-8") as fh:
            fh.write(base_services_except(self.services) + "\n" + self.services)
        # Postfix re-reads a configuration file until its mtime is over a second old (a guard
        # against half-written files), pausing 300 ms each time: backdate ours.
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(os.path.join(self.config_dir, name), (past, past))

    # -- life cycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> PostfixInstance:
        """Write the configuration, create the queue, start the master, wait for the ports."""
        self._postfix = require_tool("postfix")
        self._postqueue = require_tool("postqueue")
        postconf = require_tool("postconf")
        daemon_dir = subprocess.run(
            [postconf, "-d", "-h", "daemon_directory"], capture_output=True, text=True, check=False
        ).stdout.strip()
        master = require_tool(os.path.join(daemon_dir or "/usr/lib/postfix/sbin", "master"))
        if os.geteuid() != 0:
            missing("a private Postfix instance must be started as root")
        try:
            owner = pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError:
            missing("the postfix user or the postdrop group does not exist")
            raise AssertionError("unreachable") from None  # pragma: no cover

        self.dir = tempfile.mkdtemp(prefix="dkproxy-postfix-")
        try:
            os.chmod(self.dir, 0o755)  # the daemons run as postfix
            self._write_config()
            data_dir = os.path.join(self.dir, "data")
            os.makedirs(data_dir)
            os.chown(data_dir, owner.pw_uid, owner.pw_gid)
            os.makedirs(self.queue_dir)
            check = self._run([self._postfix, "-c", self.config_dir, "check"])
            self.check_output = check.stdout
            if check.returncode != 0:
                raise PostfixError(f"postfix check failed:\n{self.diagnostics()}")

            out = open(os.path.join(self.dir, "master.out"), "wb")  # noqa: SIM115
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, master, "-c", self.config_dir],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
            out.close()
            deadline = time.monotonic() + timeout
            for port in self.inet_ports:
                while True:
                    if self._watchdog.poll() is not None:
                        raise PostfixError(f"the Postfix master exited:\n{self.diagnostics()}")
                    try:
                        wait_for_port("127.0.0.1", port, timeout=0.5)
                        break
                    except TimeoutError:
                        if time.monotonic() > deadline:
                            raise PostfixError(
                                f"Postfix not listening on {port}:\n{self.diagnostics()}"
                            ) from None
        except BaseException:
            self.cleanup()  # the error carries the log; leave nothing behind
            raise
        return self

    def stop(self) -> None:
        """`postfix stop`, as an administrator would; then make sure nothing is left running."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is None:
            return
        if watchdog.poll() is None:
            self._run([self._postfix, "-c", self.config_dir, "stop"], timeout=30)
            try:
                watchdog.wait(15)
            except subprocess.TimeoutExpired:
                watchdog.terminate()
                try:
                    watchdog.wait(10)
                except subprocess.TimeoutExpired:
                    watchdog.kill()
                    watchdog.wait(5)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """SIGKILL the master's process group if our master is somehow still alive (its pid
        file names it, and its command line names our config directory)."""
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.queue_dir, "pid", "master.pid"), encoding="ascii") as fh:
                pid = int(fh.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                ours = self.config_dir.encode() in fh.read().split(b"\0")
            if pid > 1 and ours:
                os.killpg(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        """Stop (if needed) and delete the instance's directory."""
        self.stop()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # -- commands -----------------------------------------------------------------------------

    def _run(self, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )

    def postqueue(self, *args: str) -> str:
        """Run `postqueue -c DIR ARGS`; its output (PostfixError if it fails)."""
        proc = self._run([self._postqueue, "-c", self.config_dir, *args])
        if proc.returncode != 0:
            raise PostfixError(f"postqueue {' '.join(args)} failed: {proc.stdout}")
        return proc.stdout

    def queue(self) -> list[QueuedMessage]:
        """The queue as `postqueue -j` reports it (JSON, one object per line)."""
        entries = []
        for line in self.postqueue("-j").splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            entries.append(
                QueuedMessage(
                    queue_name=obj["queue_name"],
                    queue_id=obj["queue_id"],
                    sender=obj.get("sender", ""),
                    recipients=[
                        (r["address"], r.get("delay_reason", "")) for r in obj.get("recipients", [])
                    ],
                )
            )
        return entries

    def sendmail(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Submit locally, as cron or a script does: Postfix's sendmail(1) -> postdrop ->
        maildrop queue -> pickup. `message` as a local program writes it (LF line ends)."""
        sendmail = require_tool("sendmail")
        proc = subprocess.run(
            [sendmail, "-C", self.config_dir, "-f", sender, "--", *recipients],
            input=message,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise PostfixError(f"sendmail failed: {proc.stdout!r} {proc.stderr!r}")

    def flush(self) -> None:
        """`postqueue -f`: deliver deferred mail now."""
        self.postqueue("-f")

    def wait_queue(
        self, predicate: Callable[[list[QueuedMessage]], bool], timeout: float = 15.0
    ) -> list[QueuedMessage]:
        """Poll `queue()` until predicate(queue) is true; TimeoutError with the log if not."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.queue()
            if predicate(entries):
                return entries
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue condition not met: {entries}\n{self.maillog()}")
            time.sleep(0.1)

    def maillog(self) -> str:
        """Everything Postfix logged so far (its postlogd writes our maillog file)."""
        if not self.dir:
            return ""
        try:
            with open(self.maillog_path, "rb") as fh:
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def diagnostics(self) -> str:
        """The maillog plus whatever the master wrote to stdout/stderr, for failure messages."""
        if not self.dir:
            return "(instance directory already removed)"
        master_out = ""
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "master.out"), "rb") as fh:
            master_out = fh.read().decode("utf-8", "replace")
        return (
            f"--- postfix check ---\n{self.check_output}--- maillog ---\n{self.maillog()}"
            f"--- master output ---\n{master_out}"
        )

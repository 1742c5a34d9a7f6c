"""`dkproxy-qmail-queue`: a QMAILQUEUE wrapper that signs or verifies, then runs qmail-queue.

qmail runs `$QMAILQUEUE` once per message (qmail-smtpd, qmail-inject, forwards, bounces), so
this module is the per-message cost and imports only the standard library's cheapest parts
(os, sys, socket). The DKIM/DomainKeys work is done by a running `dkproxy qmail-service` over
a Unix socket when one answers; otherwise this process does it itself (`dkproxy.qmail`, which
needs dkimpy, cryptography and pydantic: ~0.2 s more, same result).

The qmail-queue protocol (qmail-queue(8)): the message on fd 0 (LF line ends) is read to EOF
first, then the envelope on fd 1 (`F<sender>\\0`, `T<recipient>\\0`..., `\\0`). The exit
status is the verdict; 0 only after the real qmail-queue exited 0. The real one is
`$DKQUEUE`, `$DKIMQUEUE`, else /var/qmail/bin/qmail-queue.orig; never `$QMAILQUEUE`, which
names this program.
"""

from __future__ import annotations

# The C modules behind `socket` and `signal`: the Python wrappers import enum, functools and
# collections, which would cost more than everything else this program does.
import _signal
import _socket
import os
import sys

#: qmail-queue exit codes (qmail-queue(8), notqmail qmail.c). 11-40 are permanent; we only
#: use 13 deliberately (a verification rule says reject), as qmail-dk does.
EXIT_OK = 0
EXIT_POLICY_REJECT = 13
EXIT_NO_MEMORY = 51
EXIT_WRITE_ERROR = 53
EXIT_READ_ERROR = 54
EXIT_CONFIG_ERROR = 55
EXIT_INTERNAL_BUG = 81
EXIT_POLICY_TEMPFAIL = 82
EXIT_BAD_ENVELOPE = 91
EXIT_CANNOT_EXEC = 120

DEFAULT_QUEUE = "/var/qmail/bin/qmail-queue.orig"
DEFAULT_SOCKET = "/run/dkproxy/qmail.sock"
#: Environment variables the decision depends on; the service gets exactly these.
ENV_KEYS = (
    "DKSIGN", "DKIMSIGN", "DKVERIFY", "DKIMVERIFY", "RELAYCLIENT", "AUTHINFO",
    "DKPROXY_CONFIG", "DKPROXY_STATUS", "DKPROXY_HOSTNAME", "DKPROXY_DNS_SERVER",
    "DKPROXY_DNS_TIMEOUT", "TCPREMOTEIP",
)  # fmt: skip
#: Wire protocol with the service: request and reply start with this word.
MAGIC = b"DKPQ1"
#: Reply code meaning "not for me (file outside the service's allowed directories)".
REFUSED = -1
_CHUNK = 1 << 20


class QueueError(Exception):
    """A failure with the qmail-queue exit code that reports it."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def read_fd(fd: int) -> bytearray:
    """Everything on `fd` up to EOF; QueueError(54) when it cannot be read.

    A growing bytearray rather than a list of chunks joined at the end: a 20 MB message
    then costs 20 MB, not 40.
    """
    data = bytearray()
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                return data
            data += chunk
    except OSError as exc:
        raise QueueError(EXIT_READ_ERROR, f"cannot read fd {fd}: {exc.strerror}") from None


def envelope_sender(envelope: bytes | bytearray) -> str:
    """Check the envelope's format as qmail-queue reads it; return the sender (may be "").

    Raises QueueError: 54 when it ends early (qmail-queue: read error), 91 when a record
    does not start with F/T (envelope format error).
    """
    if not envelope:
        raise QueueError(EXIT_READ_ERROR, "empty envelope")
    if envelope[:1] != b"F":
        raise QueueError(EXIT_BAD_ENVELOPE, "envelope does not start with F")
    end = envelope.find(b"\0")
    if end < 0:
        raise QueueError(EXIT_READ_ERROR, "envelope sender not terminated")
    sender = envelope[1:end]
    position = end + 1
    while True:
        if position >= len(envelope):
            raise QueueError(EXIT_READ_ERROR, "envelope not terminated")
        kind = envelope[position : position + 1]
        if kind == b"\0":
            break
        if kind != b"T":
            raise QueueError(EXIT_BAD_ENVELOPE, f"envelope record starts with {kind!r}")
        end = envelope.find(b"\0", position)
        if end < 0:
            raise QueueError(EXIT_READ_ERROR, "envelope recipient not terminated")
        position = end + 1
    return sender.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# The service protocol (shared with dkproxy.qmail_service)


def encode_request(env: dict[str, str], sender: str, size: int) -> bytes:
    """The request up to the message: `DKPQ1 <meta length> <message length>\\n` and the
    NUL-separated KEY=VALUE meta; the `size` bytes of the message follow it."""
    items = [f"{key}={value}" for key, value in env.items()]
    items.append(f"DKPROXY_ENVELOPE_SENDER={sender}")
    meta = "\0".join(items).encode("utf-8", "surrogateescape")
    return b"%s %d %d\n" % (MAGIC, len(meta), size) + meta


def decode_meta(meta: bytes) -> tuple[dict[str, str], str]:
    """(env, envelope sender) from the meta block of a request."""
    env: dict[str, str] = {}
    for item in meta.decode("utf-8", "surrogateescape").split("\0"):
        key, _, value = item.partition("=")
        if key:
            env[key] = value
    sender = env.pop("DKPROXY_ENVELOPE_SENDER", "")
    return env, sender


def encode_reply(code: int, fields: bytes, remove: list[tuple[int, int]], log: str) -> bytes:
    """`DKPQ1 <code> <fields length> <log length> <ranges>\\n` + fields + log."""
    ranges = ",".join(f"{start}-{end}" for start, end in remove) or "-"
    log_bytes = log.encode("utf-8", "replace")
    head = b"%s %d %d %d %s\n" % (MAGIC, code, len(fields), len(log_bytes), ranges.encode())
    return head + fields + log_bytes


def _recv_exact(sock: _socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size > 0:
        chunk = sock.recv(min(size, _CHUNK))
        if not chunk:
            raise ConnectionError("service closed the connection early")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def ask_service(
    path: str, env: dict[str, str], sender: str, message: bytes | bytearray, timeout: float
) -> tuple[int, bytes, list[tuple[int, int]], str] | None:
    """The service's verdict, or None when no service answers (then work in-process)."""
    try:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode_request(env, sender, len(message)))
        sock.sendall(message)
        sock.shutdown(_socket.SHUT_WR)
        head = b""
        while not head.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte or len(head) > 4096:
                return None
            head += byte
        parts = head.split()
        if len(parts) != 5 or parts[0] != MAGIC:
            return None
        code, fields_len, log_len = int(parts[1]), int(parts[2]), int(parts[3])
        fields = _recv_exact(sock, fields_len)
        log = _recv_exact(sock, log_len).decode("utf-8", "replace")
        remove: list[tuple[int, int]] = []
        if parts[4] != b"-":
            for item in parts[4].split(b","):
                start, _, end = item.partition(b"-")
                remove.append((int(start), int(end)))
    except (OSError, ValueError):
        return None  # no service, or it failed mid-way: the in-process path decides
    finally:
        sock.close()
    if code == REFUSED:
        return None
    return code, fields, remove, log


# ---------------------------------------------------------------------------------------------
# The real qmail-queue


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


def run_queue(
    program: str, parts: list[bytes | memoryview], envelope: bytes, env: dict[str, str]
) -> int:
    """Run the real qmail-queue with `parts` on its fd 0 and `envelope` on its fd 1.

    Writes the message, closes it, then writes the envelope, as qmail's own callers do
    (qmail-queue reads fd 0 to EOF before fd 1). Returns its exit status; a crash (81), or
    a write that failed while it exited 0 (53), is temporary. Raises QueueError(120) when
    the program cannot be started.
    """
    message_r, message_w = os.pipe()
    envelope_r, envelope_w = os.pipe()
    try:
        pid = os.posix_spawn(
            program,
            [program],
            env,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, message_r, 0),
                (os.POSIX_SPAWN_DUP2, envelope_r, 1),
                (os.POSIX_SPAWN_CLOSE, message_w),
                (os.POSIX_SPAWN_CLOSE, envelope_w),
            ],
            setsigdef=(_signal.SIGPIPE,),  # Python ignores SIGPIPE; qmail-queue must not
        )
    except OSError as exc:
        for fd in (message_r, message_w, envelope_r, envelope_w):
            os.close(fd)
        raise QueueError(EXIT_CANNOT_EXEC, f"cannot run {program}: {exc.strerror}") from None
    os.close(message_r)
    os.close(envelope_r)
    write_failed = False
    try:
        for part in parts:
            _write_all(message_w, part)
        os.close(message_w)
        message_w = -1
        _write_all(envelope_w, envelope)
    except OSError:
        write_failed = True  # it stopped reading; its exit status says why
    finally:
        if message_w >= 0:
            os.close(message_w)
        os.close(envelope_w)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return EXIT_INTERNAL_BUG
    code = os.WEXITSTATUS(status)
    if code == 0 and write_failed:
        return EXIT_WRITE_ERROR
    return code


def original_parts(
    message: bytes | bytearray, fields: bytes, remove: list[tuple[int, int]]
) -> list[bytes | memoryview]:
    """Our fields, then the original bytes without the `remove` ranges (never copied)."""
    view = memoryview(message)
    parts: list[bytes | memoryview] = [fields] if fields else []
    position = 0
    for start, end in sorted(remove):
        if start < position or end > len(message):
            raise QueueError(EXIT_INTERNAL_BUG, f"bad range {start}-{end}")
        parts.append(view[position:start])
        position = end
    parts.append(view[position:])
    return parts


def _log(text: str) -> None:
    try:  # noqa: SIM105 - contextlib would be one more import per message
        os.write(2, f"dkproxy-qmail-queue: {text}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def process(environ: dict[str, str]) -> int:
    """Read, decide, chain; return the exit status (see the module docstring)."""
    message = read_fd(0)
    envelope = read_fd(1)
    sender = envelope_sender(envelope)
    env = {key: environ[key] for key in ENV_KEYS if key in environ}
    socket_path = environ.get("DKPROXY_SOCKET", DEFAULT_SOCKET)
    answer = None
    if socket_path:
        timeout = float(environ.get("DKPROXY_SOCKET_TIMEOUT", "60"))
        answer = ask_service(socket_path, env, sender, message, timeout)
    if answer is None:
        if sys.flags.no_site:
            import site

            site.main()  # the -S launcher skipped it; dkimpy and friends are in site-packages
        from dkproxy.qmail import process_in_process

        answer = process_in_process(env, sender, message)
    code, fields, remove, log = answer
    if log and (code != EXIT_OK or environ.get("DKPROXY_LOG")):
        _log(log)
    if code != EXIT_OK:
        return code
    program = environ.get("DKQUEUE") or environ.get("DKIMQUEUE") or DEFAULT_QUEUE
    child_env = {key: value for key, value in environ.items() if key != "QMAILQUEUE"}
    return run_queue(program, original_parts(message, fields, remove), envelope, child_env)


def main() -> int:
    """Console entry point; never returns 0 unless the real qmail-queue did."""
    try:
        return process(dict(os.environ))
    except QueueError as exc:
        _log(str(exc))
        return exc.code
    except MemoryError:
        return EXIT_NO_MEMORY
    except Exception as exc:  # a bug must defer the message, never lose or accept it
        _log(f"internal error: {exc!r}")
        return EXIT_INTERNAL_BUG


if __name__ == "__main__":
    sys.exit(main())

"""`dkproxy passwd FILE LOGIN`: add or change a login in a relay credentials file.

The password is asked twice on the terminal (not echoed), or read as one line from standard
input with `--stdin` (for provisioning scripts); only its argon2id (default) or bcrypt hash
is written. `--delete` removes the login. A running relay reads the file again on SIGHUP.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import TextIO

from dkproxy.relay.credentials import hash_password, is_valid_login, set_password

MIN_PASSWORD_LENGTH = 12


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dkproxy passwd",
        description="Add, change or delete a login in a dkproxy relay credentials file "
        "(LOGIN:HASH lines; argon2id or bcrypt).",
    )
    parser.add_argument("file", metavar="FILE", help="credentials file (created 0600)")
    parser.add_argument("login", metavar="LOGIN")
    parser.add_argument("--bcrypt", action="store_true", help="bcrypt instead of argon2id")
    parser.add_argument(
        "--stdin", action="store_true", help="read the password as one line from stdin"
    )
    parser.add_argument("--delete", action="store_true", help="remove the login")
    return parser


def _read_password(use_stdin: bool, stdin: TextIO) -> str:
    if use_stdin:
        return stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the passwords differ")
    return first


def main(argv: list[str], stdin: TextIO | None = None, out: TextIO | None = None) -> int:
    """Run the command; exit status 0 done, 1 refused (short password, bad login), 2 usage."""
    out = out or sys.stdout
    try:
        args = make_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if not is_valid_login(args.login):
        print(f"dkproxy passwd: {args.login!r}: a login is 1-64 characters without ':', "
              "spaces or control characters", file=sys.stderr)  # fmt: skip
        return 1
    try:
        if args.delete:
            existed = set_password(args.file, args.login, None)
            print(f"{args.file}: {args.login} {'deleted' if existed else 'was not there'}",
                  file=out)  # fmt: skip
            return 0 if existed else 1
        password = _read_password(args.stdin, stdin or sys.stdin)
        if len(password) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
        hashed = hash_password(password, "bcrypt" if args.bcrypt else "argon2id")
        existed = set_password(args.file, args.login, hashed)
    except ValueError as exc:
        print(f"dkproxy passwd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dkproxy passwd: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: {args.login} {'changed' if existed else 'added'}", file=out)
    return 0

"""``smtp-oauth-relay hash-password [--stdin]``: a hash for ``users.<name>.password_hash``.

:func:`command` reads the password (twice from a terminal, once from standard input)
and prints its salted scrypt hash (:func:`relay.core.passhash.hash_password`); the
password itself is never printed. Passwords shorter than 8 characters are refused.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from relay.cli.common import EX_FAIL, EX_OK, err

MIN_LENGTH = 8


def command(args: argparse.Namespace) -> int:
    from relay.core.passhash import hash_password

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            err("error: the passwords do not match")
            return EX_FAIL
    if len(password) < MIN_LENGTH:
        err(f"error: use a password of at least {MIN_LENGTH} characters")
        return EX_FAIL
    print(hash_password(password))
    return EX_OK

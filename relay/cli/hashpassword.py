"""``smtp-oauth-relay hash-password [--stdin]``: a hash for ``users.<name>.password_hash``.

:func:`command` reads the password (twice from a terminal, once from standard input)
and prints its salted scrypt hash (:func:`relay.core.passhash.hash_password`); the
password itself is never printed. Passwords shorter than 8 characters are refused.

Standard input that is not a terminal is read as with ``--stdin`` (``printf ... |``), so
nothing there is not "a short password" but no password at all, and is said so; Ctrl-D at
the prompt ends the command like Ctrl-C, without a traceback.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from relay.cli.common import EX_FAIL, EX_OK, err

MIN_LENGTH = 8
_PIPE_HINT = ("pipe it in (printf '%s\\n' \"$PASSWORD\" | smtp-oauth-relay hash-password "
              "--stdin), or run the command in a terminal to be asked for it")


def command(args: argparse.Namespace) -> int:
    from relay.core.passhash import hash_password

    if args.stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            where = "" if args.stdin else " (it is not a terminal)"
            err(f"error: no password on standard input{where}: {_PIPE_HINT}")
            return EX_FAIL
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except EOFError:                    # Ctrl-D: the prompt's line is still open
            err("\nerror: no password entered")
            return EX_FAIL
        if again != password:
            err("error: the passwords do not match")
            return EX_FAIL
    if len(password) < MIN_LENGTH:
        err(f"error: use a password of at least {MIN_LENGTH} characters")
        return EX_FAIL
    print(hash_password(password))
    return EX_OK

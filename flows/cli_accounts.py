"""The commands for people: `lookalike users ...` and `lookalike judgements export`."""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from lookalike.tasks.settings import Settings

AddOptions = Callable[[argparse.ArgumentParser], None]


def add_account_commands(add: Any, add_db_options: AddOptions) -> None:
    """`users` (add, token, password, remove, list) and `judgements export`; add makes a
    command with a description and an example (flows.cli.command_factory)."""
    users = add(
        "users",
        "manage who may write judgements, and their tokens",
        "Users who may judge pairs on the page or through the API; see the README's "
        "'Judgements and accounts'.",
        "lookalike users add ann && lookalike users token ann",
    )
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    add_user = actions.add_parser("add", help="add a user (no credentials yet)")
    add_user.add_argument("name", metavar="NAME")
    add_user.add_argument(
        "--role",
        choices=("curator", "admin"),
        default="curator",
        help="curator (default): judge pairs; admin: also read the audit trail",
    )
    token = actions.add_parser("token", help="print a new API token (once), replacing the old")
    token.add_argument("name", metavar="NAME")
    password = actions.add_parser(
        "password", help="set the password for the page's sign-in (read from stdin or a prompt)"
    )
    password.add_argument("name", metavar="NAME")
    remove = actions.add_parser("remove", help="revoke every credential (judgements stay)")
    remove.add_argument("name", metavar="NAME")
    listing = actions.add_parser("list", help="list users, roles and which credentials they have")
    for parser in (add_user, token, password, remove, listing):
        add_db_options(parser)
    users.set_defaults(func=command_users)

    judgements = add(
        "judgements",
        "export curators' judgements",
        "Every current judgement with both images' files, for analysis or training.",
        "lookalike judgements export --format jsonl --output judgements.jsonl",
    )
    export_actions = judgements.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = export_actions.add_parser("export", help="every current judgement, with both files")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="output format")
    export.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    add_db_options(export)
    judgements.set_defaults(func=command_judgements)


def command_users(args: argparse.Namespace) -> int:
    """lookalike users ACTION: change the users table through the pipeline's account."""
    from lookalike.tasks import accounts
    from lookalike.tasks.database import connect_checked

    engine = connect_checked(
        Settings.from_env(database_url=args.database_url).resolved_database_url
    )
    try:
        if args.action == "add":
            accounts.add_user(engine, args.name, args.role)
            print(f"added {args.role} {args.name}; a token: lookalike users token {args.name}")
        elif args.action == "token":
            print(accounts.issue_token(engine, args.name))
            print("shown once: store it now (it replaces any earlier token)", file=sys.stderr)
        elif args.action == "password":
            accounts.set_password(engine, args.name, read_password())
            print(f"password set for {args.name}")
        elif args.action == "remove":
            accounts.remove_user(engine, args.name)
            print(f"removed {args.name}: token, password and sessions revoked")
        else:
            print_users(accounts.list_users(engine))
    finally:
        engine.dispose()
    return 0


def read_password() -> str:
    """The new password: typed twice at a terminal, else the first line of stdin."""
    from lookalike.tasks.accounts import AccountError

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("new password: ")
    if getpass.getpass("again: ") != first:
        raise AccountError("the two passwords differ")
    return first


def print_users(rows: list[Any]) -> None:
    """One line per user."""
    for row in rows:
        credentials = ", ".join(
            name
            for name, held in (("token", row.has_token), ("password", row.has_password))
            if held
        )
        state = (
            f"removed {row.removed_at:%Y-%m-%d}"
            if row.removed_at
            else credentials or "no credentials"
        )
        print(f"{row.name:<24} {row.role:<8} {state}")


def command_judgements(args: argparse.Namespace) -> int:
    """lookalike judgements export: CSV or JSON lines, one current judgement per row."""
    from lookalike.tasks.database import connect_checked
    from lookalike.tasks.judgements import EXPORT_FIELDS, export_judgements

    engine = connect_checked(
        Settings.from_env(database_url=args.database_url).resolved_database_url
    )
    try:
        with _output(args.output) as out:
            rows = export_judgements(engine)
            if args.format == "csv":
                writer = csv.DictWriter(out, fieldnames=list(EXPORT_FIELDS))
                writer.writeheader()
                writer.writerows(rows)
            else:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        engine.dispose()
    return 0


class _output:
    """The named file (written whole, UTF-8) or stdout."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.file: TextIO | None = None

    def __enter__(self) -> TextIO:
        if self.path is None:
            return sys.stdout
        self.file = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        return self.file

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

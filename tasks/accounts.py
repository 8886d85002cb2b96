"""Users who may write, their API tokens and passwords, kept only as salted hashes."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select, update

from lookalike.sql.schema import users
from lookalike.tasks.database import utcnow
from lookalike.tasks.errors import LookalikeError

ROLES = ("curator", "admin")
TOKEN_PREFIX = "lka"
MIN_PASSWORD_LENGTH = 12
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN = re.compile(rf"{TOKEN_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})")
# scrypt's interactive-login parameters (RFC 7914 section 2): about 50 ms and 16 MiB a check.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32, "maxmem": 64 * 1024 * 1024}


class AccountError(LookalikeError):
    """A user name, role or password that cannot be used (one line for the user)."""


@dataclass(frozen=True)
class Identity:
    """Who a request acts as: the user's id, name, role and current credential version."""

    id: int
    name: str
    role: str
    credential_version: int

    @property
    def is_admin(self) -> bool:
        """Admins may do everything curators may, and read the audit trail and user list."""
        return self.role == "admin"


@dataclass(frozen=True)
class UserRow:
    """A user as `lookalike users list` shows them."""

    name: str
    role: str
    has_token: bool
    has_password: bool
    created_at: datetime
    removed_at: datetime | None


def add_user(engine: Engine, name: str, role: str) -> None:
    """Create a user without credentials; a removed user of that name comes back."""
    check_name(name)
    if role not in ROLES:
        raise AccountError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    with engine.begin() as conn:
        row = _user_row(conn, name)
        if row is not None and row.removed_at is None:
            raise AccountError(f"user {name!r} exists already")
        if row is not None:
            values = {"role": role, "removed_at": None, **_next_version(row)}
            conn.execute(update(users).where(users.c.id == row.id).values(**values))
            return
        conn.execute(
            users.insert().values(name=name, role=role, credential_version=1, created_at=utcnow())
        )


def issue_token(engine: Engine, name: str) -> str:
    """A new API token for the user, replacing any earlier one; shown once, stored hashed."""
    key, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    with engine.begin() as conn:
        row = _active_user(conn, name)
        values = {"token_key": key, "token_hash": hash_token_secret(secret), **_next_version(row)}
        conn.execute(update(users).where(users.c.id == row.id).values(**values))
    return f"{TOKEN_PREFIX}_{key}_{secret}"


def set_password(engine: Engine, name: str, password: str) -> None:
    """Set the user's password for signing in on the page (ends their current sessions)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    with engine.begin() as conn:
        row = _active_user(conn, name)
        values = {"password_hash": hash_password(password), **_next_version(row)}
        conn.execute(update(users).where(users.c.id == row.id).values(**values))


def remove_user(engine: Engine, name: str) -> None:
    """Revoke every credential of the user; their judgements stay, attributed to them."""
    with engine.begin() as conn:
        row = _active_user(conn, name)
        values = {
            "token_key": None,
            "token_hash": None,
            "password_hash": None,
            "removed_at": utcnow(),
            **_next_version(row),
        }
        conn.execute(update(users).where(users.c.id == row.id).values(**values))


def list_users(engine: Engine) -> list[UserRow]:
    """Every user, removed ones included, by name."""
    with engine.connect() as conn:
        rows = conn.execute(select(users).order_by(users.c.name)).all()
    return [
        UserRow(
            name=row.name,
            role=row.role,
            has_token=row.token_hash is not None,
            has_password=row.password_hash is not None,
            created_at=row.created_at,
            removed_at=row.removed_at,
        )
        for row in rows
    ]


def count_active_users(conn: Connection) -> int:
    """How many users can sign in (the page offers signing in only when there are some)."""
    query = select(func.count()).select_from(users).where(users.c.removed_at.is_(None))
    return int(conn.execute(query).scalar_one())


def identity_for_token(conn: Connection, token: str) -> Identity | None:
    """The active user whose token this is, or None (malformed, unknown, replaced, revoked)."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    key, secret = match.groups()
    row = conn.execute(select(users).where(users.c.token_key == key)).one_or_none()
    if row is None or row.token_hash is None or row.removed_at is not None:
        return None
    return _identity(row) if token_secret_matches(secret, row.token_hash) else None


def identity_for_password(conn: Connection, name: str, password: str) -> Identity | None:
    """The active user with this name and password, or None.

    An unknown name costs the same scrypt as a known one: timing does not tell which names exist.
    """
    row = conn.execute(select(users).where(users.c.name == name)).one_or_none()
    stored = row.password_hash if row is not None and row.removed_at is None else None
    if not password_matches(password, stored or _DUMMY_PASSWORD_HASH) or stored is None:
        return None
    return _identity(row)


def identity_for_session(conn: Connection, user_id: int, version: int) -> Identity | None:
    """The user a session was signed in as, if still active with the same credentials."""
    row = conn.execute(select(users).where(users.c.id == user_id)).one_or_none()
    if row is None or row.removed_at is not None or row.credential_version != version:
        return None
    return _identity(row)


def hash_token_secret(secret: str) -> str:
    """salt$sha256(salt + secret), hex.

    A token secret is 256 random bits, beyond any guessing, so one fast hash suffices (as
    for GitHub's tokens); slow hashing is for secrets people choose, i.e. passwords.
    """
    salt = secrets.token_bytes(16)
    return f"{salt.hex()}${hashlib.sha256(salt + secret.encode()).hexdigest()}"


def token_secret_matches(secret: str, stored: str) -> bool:
    """Whether the secret hashes to the stored value (compared in constant time)."""
    salt_hex, _, digest = stored.partition("$")
    expected = hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode()).hexdigest()
    return hmac.compare_digest(expected, digest)


def hash_password(password: str) -> str:
    """scrypt$salt$key, hex, with the parameters in _SCRYPT."""
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${salt.hex()}${key.hex()}"


def password_matches(password: str, stored: str) -> bool:
    """Whether the password derives the stored key (compared in constant time)."""
    _, salt_hex, key_hex = stored.split("$")
    key = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt_hex), **_SCRYPT)
    return hmac.compare_digest(key.hex(), key_hex)


_DUMMY_PASSWORD_HASH = "scrypt$" + "00" * 16 + "$" + "00" * 32


def check_name(name: str) -> None:
    """Refuse names that would be awkward in URLs, files and logs."""
    if not _NAME.fullmatch(name):
        raise AccountError(
            f"bad user name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _user_row(conn: Connection, name: str) -> Any:
    return conn.execute(select(users).where(users.c.name == name)).one_or_none()


def _active_user(conn: Connection, name: str) -> Any:
    """The user's row, or AccountError when there is no such active user."""
    row = _user_row(conn, name)
    if row is None or row.removed_at is not None:
        raise AccountError(f"no user {name!r}: add one with `lookalike users add {name}`")
    return row


def _next_version(row: Any) -> dict[str, int]:
    """A credential change: sessions signed in before it end."""
    return {"credential_version": int(row.credential_version) + 1}


def _identity(row: Any) -> Identity:
    return Identity(
        id=int(row.id),
        name=str(row.name),
        role=str(row.role),
        credential_version=int(row.credential_version),
    )

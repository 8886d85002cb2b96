"""Who a request acts as (API token or the page's session), CSRF for the page, and the guards."""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from litestar.concurrency import sync_to_thread
from litestar.config.csrf import CSRFConfig
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.middleware.session.client_side import CookieBackendConfig
from litestar.types import ASGIApp, Receive, Scope, Send
from sqlalchemy import Engine

from lookalike.api.admission import client_key, refused_slowly
from lookalike.api.errors import AdminOnlyError, SignInRequiredError
from lookalike.tasks.accounts import (
    Identity,
    count_active_users,
    identity_for_password,
    identity_for_session,
    identity_for_token,
)
from lookalike.tasks.settings import Settings

log = logging.getLogger(__name__)

SESSION_COOKIE = "lookalike_session"
CSRF_COOKIE = "lookalike_csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_PATH = "/api/session"
SESSION_MAX_AGE_S = 12 * 3600
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
# With LOOKALIKE_READ_REQUIRES_LOGIN, what stays open: the pages and their files (they ask
# for data only after signing in), signing in, the health check and the schema.
OPEN_WHEN_LOGIN_REQUIRED = [
    "^/$",
    "^/duplicates$",
    "^/map$",
    "^/static/",
    "^/health$",
    f"^{SESSION_PATH}$",
    "^/schema",
]
_BEARER = re.compile(r"Bearer\s+(\S+)\s*", re.IGNORECASE)
_SESSION_COOKIE_CHUNK = re.compile(rf"(?:^|;)\s*{SESSION_COOKIE}(?:-\d+)?=")


class SecurityGate:
    """Anonymous reads go straight to the route; everything else through the session,
    identity and CSRF middleware (Litestar's, in that order).

    Those three cost more than the neighbours route itself (measured: 9,000 -> 4,800
    requests/s); a GET without an Authorization header or a session cookie needs none of
    them, unless reading requires an account. The page gets its CSRF cookie from
    GET /api/session, which always takes the full path.
    """

    def __init__(self, app: ASGIApp, settings: Settings, key: bytes) -> None:
        chain = [session_config(settings, key).middleware, identity_middleware(),
                 csrf_middleware(settings, key)]  # fmt: skip
        guarded = app
        for define in reversed(chain):
            guarded = define(guarded)
        self.app = app
        self.guarded = guarded
        self.anonymous_reads = not settings.read_requires_login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.anonymous_reads and scope["type"] == "http" and is_anonymous_read(scope):
            scope["user"] = None
            scope["auth"] = None
            await self.app(scope, receive, send)
        else:
            await self.guarded(scope, receive, send)


def is_anonymous_read(scope: Scope) -> bool:
    """A safe request other than /api/session with neither a token nor a session cookie."""
    if scope.get("method") not in SAFE_METHODS or scope["path"] == SESSION_PATH:
        return False
    for name, value in scope["headers"]:
        if name == b"authorization":
            return False
        if name == b"cookie" and _SESSION_COOKIE_CHUNK.search(value.decode("latin-1")):
            return False
    return True


def security_middleware(settings: Settings) -> DefineMiddleware:
    """The SecurityGate with its chain, keyed by LOOKALIKE_SESSION_SECRET (or a random key)."""
    return DefineMiddleware(SecurityGate, settings=settings, key=signing_key(settings))


def signing_key(settings: Settings) -> bytes:
    """32 bytes for the session cookie's AES-GCM and the CSRF token's HMAC.

    From LOOKALIKE_SESSION_SECRET when set (sessions survive restarts and are shared by
    several API processes); else random, so that a restart signs everyone out.
    """
    if settings.session_secret:
        return hashlib.sha256(settings.session_secret.encode()).digest()
    return secrets.token_bytes(32)


def session_config(settings: Settings, key: bytes) -> CookieBackendConfig:
    """The page's session: an encrypted HttpOnly, SameSite=Strict cookie (Litestar's)."""
    return CookieBackendConfig(
        secret=key,
        key=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE_S,
        secure=settings.secure_cookies,
        httponly=True,
        samesite="strict",
    )


def csrf_middleware(settings: Settings, key: bytes) -> DefineMiddleware:
    """Litestar's double-submit CSRF check, for the requests a browser sends with cookies."""
    config = CSRFConfig(
        secret=hashlib.sha256(b"csrf" + key).hexdigest(),
        cookie_name=CSRF_COOKIE,
        header_name=CSRF_HEADER,
        cookie_secure=settings.secure_cookies,
        cookie_samesite="strict",
        cookie_httponly=False,  # the page's script reads it and echoes it in the header
    )
    return DefineMiddleware(BrowserCSRFMiddleware, config=config)


class BrowserCSRFMiddleware(CSRFMiddleware):
    """CSRF checks on state-changing requests that carry the session cookie, and on signing in.

    Only cookies ride along on a forged cross-site request: a request without the session
    cookie can act only through an Authorization header, which no other site can make a
    browser send. API clients with tokens therefore need no CSRF token; the page always does.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not needs_csrf_check(scope):
            await self.app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def needs_csrf_check(scope: Scope) -> bool:
    """Safe requests (which get the CSRF cookie), sign-in, and anything with a session."""
    if scope.get("method") in SAFE_METHODS or scope["path"] == SESSION_PATH:
        return True
    cookies = b"; ".join(value for name, value in scope["headers"] if name == b"cookie")
    return bool(_SESSION_COOKIE_CHUNK.search(cookies.decode("latin-1")))


@dataclass(frozen=True)
class Accounts:
    """Identities, read through the API's reader engine."""

    engine: Engine

    def for_token(self, token: str) -> Identity | None:
        with self.engine.connect() as conn:
            return identity_for_token(conn, token)

    def for_password(self, name: str, password: str) -> Identity | None:
        with self.engine.connect() as conn:
            return identity_for_password(conn, name, password)

    def for_session(self, session: dict[str, Any]) -> Identity | None:
        user_id, version = session.get("user_id"), session.get("version")
        if not isinstance(user_id, int) or not isinstance(version, int):
            return None
        with self.engine.connect() as conn:
            return identity_for_session(conn, user_id, version)

    def any_users(self) -> bool:
        with self.engine.connect() as conn:
            return count_active_users(conn) > 0


class IdentityMiddleware(AbstractAuthenticationMiddleware):
    """Sets request.user to the Identity of a Bearer token or of the session, else None.

    A token that is presented but not valid is a 401 on every route: the client meant to
    act as someone and should hear that it does not. Anonymous requests pass unless
    LOOKALIKE_READ_REQUIRES_LOGIN is on.
    """

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        state = connection.app.state
        accounts: Accounts = state.accounts
        header = connection.headers.get("authorization")
        if header is not None:
            return await self._from_header(accounts, header)
        identity = None
        session = connection.scope.get("session")
        if isinstance(session, dict) and session:
            identity = await sync_to_thread(accounts.for_session, session)
        if identity is None and state.settings.read_requires_login and not _is_open(connection):
            raise SignInRequiredError("sign in first: reading this archive needs an account")
        return AuthenticationResult(user=identity, auth="session" if identity else None)

    @staticmethod
    async def _from_header(accounts: Accounts, header: str) -> AuthenticationResult:
        match = _BEARER.fullmatch(header)
        if match is None:
            raise SignInRequiredError("the Authorization header must be 'Bearer TOKEN'")
        identity = await sync_to_thread(accounts.for_token, match.group(1))
        if identity is None:
            raise SignInRequiredError("this token is not valid (unknown, replaced or revoked)")
        return AuthenticationResult(user=identity, auth="token")


_OPEN = re.compile("|".join(OPEN_WHEN_LOGIN_REQUIRED))


def _is_open(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    return bool(_OPEN.match(connection.scope["path"]))


def identity_middleware() -> DefineMiddleware:
    return DefineMiddleware(IdentityMiddleware)


def current_identity(connection: ASGIConnection[Any, Any, Any, Any]) -> Identity | None:
    """The request's Identity, or None for anonymous readers."""
    user = connection.scope.get("user")
    return user if isinstance(user, Identity) else None


async def requires_identity(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of write routes: a signed-in user (curator or admin), within the write rates."""
    identity = current_identity(connection)
    if identity is None:
        raise SignInRequiredError("writing needs an identity: sign in, or send a Bearer token")
    admission = connection.app.state.admission
    address = client_key(connection)
    await refused_slowly(
        lambda: admission.write_limit.take(f"user:{identity.id}"),
        lambda: admission.write_limit.take(f"address:{address}"),
    )


async def requires_admin(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of admin routes."""
    identity = current_identity(connection)
    if identity is None:
        raise SignInRequiredError("this needs an admin's identity: sign in, or send a Bearer token")
    if not identity.is_admin:
        raise AdminOnlyError(f"only admins may do this; {identity.name} is a {identity.role}")


async def limit_sign_ins(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of signing in: attempts per client address, before any password is checked."""
    admission = connection.app.state.admission
    address = client_key(connection)
    await refused_slowly(lambda: admission.sign_in_limit.take(address))

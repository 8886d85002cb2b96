"""/api/session: who the caller is; signing the page in (token or password) and out."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.concurrency import sync_to_thread
from litestar.openapi import ResponseSpec
from litestar.status_codes import HTTP_200_OK

from lookalike.api.errors import BadRequestError, SignInRequiredError
from lookalike.api.judgement_store import JudgementStore
from lookalike.api.openapi import DENIALS, REFUSALS, RefusableOperation
from lookalike.api.schemas import ErrorAnswer, SessionInfo, SignIn
from lookalike.api.security import SESSION_PATH, Accounts, current_identity, limit_sign_ins
from lookalike.tasks.accounts import Identity
from lookalike.tasks.settings import Settings


class SessionController(Controller):
    """The page's sign-in; API clients send `Authorization: Bearer TOKEN` instead."""

    path = SESSION_PATH
    tags = ["session"]

    @get("/")
    async def get_session(
        self,
        request: Request[Any, Any, Any],
        settings: Settings,
        accounts: Accounts,
        judgement_store: JudgementStore,
    ) -> SessionInfo:
        """Who the caller is (by token or session), and whether judgements can be saved."""
        any_users = await sync_to_thread(accounts.any_users)
        return session_info(current_identity(request), settings, judgement_store, any_users)

    @post(
        "/",
        guards=[limit_sign_ins],
        status_code=HTTP_200_OK,
        responses={
            401: DENIALS[401],
            403: DENIALS[403],
            429: REFUSALS[429],
            400: ResponseSpec(ErrorAnswer, description="Neither token nor name and password."),
        },
        operation_class=RefusableOperation,
        request_max_body_size=4096,
    )
    async def sign_in(
        self,
        request: Request[Any, Any, Any],
        data: SignIn,
        settings: Settings,
        accounts: Accounts,
        judgement_store: JudgementStore,
    ) -> SessionInfo:
        """Sign in with a token, or a name and password; sets the session cookie.

        Needs the CSRF cookie's value in the X-CSRF-Token header, like every state-changing
        request the page makes.
        """
        identity = await sync_to_thread(check_credentials, accounts, data)
        if identity is None:
            raise SignInRequiredError("wrong token, or wrong name or password")
        request.set_session({"user_id": identity.id, "version": identity.credential_version})
        return session_info(identity, settings, judgement_store, True)

    @delete("/", status_code=204)
    async def sign_out(self, request: Request[Any, Any, Any]) -> None:
        """End the page's session (a no-op without one)."""
        request.clear_session()


def check_credentials(accounts: Accounts, data: SignIn) -> Identity | None:
    """The identity of a token, or of a name and password; BadRequestError for neither."""
    if data.token:
        return accounts.for_token(data.token)
    if data.name and data.password:
        return accounts.for_password(data.name, data.password)
    raise BadRequestError("send a token, or a name and a password")


def session_info(
    identity: Identity | None, settings: Settings, store: JudgementStore, any_users: bool
) -> SessionInfo:
    return SessionInfo(
        signed_in=identity is not None,
        name=identity.name if identity else None,
        role=identity.role if identity else None,
        writable=store.writer is not None,
        sign_in_offered=any_users,
        read_requires_login=settings.read_requires_login,
    )

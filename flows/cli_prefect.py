"""What the commands that run flows ask first: which Prefect API, and whether a run waits."""

from __future__ import annotations

import logging
import os
import sys

from lookalike.tasks.errors import LookalikeError, first_line

log = logging.getLogger("lookalike")


class PrefectServerError(LookalikeError):
    """PREFECT_API_URL names a server that does not answer; one line with the two ways out."""


def prefect_api_url() -> str | None:
    """The configured Prefect API (PREFECT_API_URL, from the environment or the active
    profile); None in ephemeral mode, where a run starts a temporary server of its own."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def check_prefect_server(api_url: str) -> None:
    """PrefectServerError, in one line with the ways out, unless the configured Prefect API
    answers its health check."""
    import httpx
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:  # entering asks the server's version
            failure = client.api_healthcheck()
    except Exception as exc:
        failure = exc
    if failure is None:
        return
    log.debug("Prefect API health check failed", exc_info=failure)
    unreachable = isinstance(failure, httpx.TransportError) or (
        isinstance(failure, RuntimeError) and str(failure).startswith("Failed to reach API")
    )
    if not unreachable:
        raise PrefectServerError(
            f"the Prefect server at {api_url} (PREFECT_API_URL) cannot be used: "
            f"{first_line(failure)}"
        )
    unset = (
        "unset PREFECT_API_URL in the environment"
        if os.environ.get("PREFECT_API_URL")
        else "run prefect config unset PREFECT_API_URL"
    )
    raise PrefectServerError(
        f"no Prefect server answers at {api_url} (PREFECT_API_URL): start it with "
        f"prefect server start, or {unset} to let each run start a temporary one"
    )


def tell_if_waiting(database_url: str, timeout: float) -> None:
    """Say on stderr why a run seems to hang: another run holds the database's run lock."""
    from lookalike.tasks.lock import is_run_lock_busy

    if is_run_lock_busy(database_url):
        print(
            f"lookalike: another run is using this database; waiting up to {timeout:g} s",
            file=sys.stderr,
        )

"""Admission control for expensive work: a few slots, a short queue, per-client rate limits.

Searches by upload and thumbnails made on request cost tens to hundreds of milliseconds of CPU
each; the reads the page lives on cost one. Expensive work therefore runs on its own threads
(never the handler threads the reads use), at most `slots` jobs of a kind at once, `queue` more
waiting, and anything beyond is refused at once with 503 and Retry-After instead of queueing
without bound. TensorFlow and BLAS get the cores but one, so one core's worth of time is left
to the cheap routes whatever the flood.

Rate limits are token buckets per client address rather than Litestar's RateLimitMiddleware:
the middleware counts every request of a route, and a thumbnail only costs when it is not yet
cached, which only the handler knows.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from lookalike.api.errors import ServerBusyError, TooManyRequestsError
from lookalike.tasks.knn.threads import cpu_cores
from lookalike.tasks.settings import Settings, parse_rate

P = ParamSpec("P")
T = TypeVar("T")

# Refused clients are told to come back after at least this long.
MIN_RETRY_AFTER_S = 1
# Start of the running mean of one job's seconds, before any has finished.
FIRST_JOB_GUESS_S = 0.5
# Weight of the newest job in that running mean.
JOB_TIME_WEIGHT = 0.2
# Buckets kept before the full (idle) ones are forgotten.
MAX_TRACKED_CLIENTS = 10_000
# A refusal is answered after this long: a client flooding in a loop then costs the server a
# few refusals a second instead of a thousand, and the delay costs the server nothing.
REFUSAL_DELAY_S = 0.25


def default_slots(cores: int) -> int:
    """Jobs of one kind at once: half the cores but one, at least one."""
    return max(1, (cores - 1) // 2)


def compute_threads(cores: int) -> int:
    """Threads for TensorFlow and BLAS: every core but one, which stays with the cheap routes."""
    return max(1, cores - 1)


class WorkLane:
    """At most `slots` jobs of one kind run at once on the lane's own threads, `queue` more
    wait, and the rest are refused at once with ServerBusyError (503, Retry-After)."""

    def __init__(self, name: str, slots: int, queue: int) -> None:
        self.name = name
        self.slots = slots
        self.capacity = slots + queue
        self._executor: ThreadPoolExecutor | None = None  # made on first use, again after close
        self._lock = threading.Lock()
        self._admitted = 0
        self._job_seconds = FIRST_JOB_GUESS_S

    @property
    def admitted(self) -> int:
        """Jobs running or waiting now."""
        return self._admitted

    def check(self) -> None:
        """Refuse now if the lane is full (no place is taken: the handler admits later)."""
        if self._admitted >= self.capacity:
            raise self._busy()

    @contextmanager
    def held(self) -> Iterator[None]:
        """One place in the lane for the duration of the block, or ServerBusyError at once."""
        with self._lock:
            if self._admitted >= self.capacity:
                raise self._busy()
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    async def run(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """The result of work(*args) computed on the lane's threads (call inside held())."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads(), lambda: self._timed(work, args, kwargs))

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                prefix = f"lookalike-{self.name}"
                self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix=prefix)
            return self._executor

    def _timed(self, work: Callable[..., T], args: Any, kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return work(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - started
            self._job_seconds += JOB_TIME_WEIGHT * (seconds - self._job_seconds)

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the queue's length times one job's time."""
        waiting_rounds = self.capacity / self.slots
        return max(MIN_RETRY_AFTER_S, math.ceil(waiting_rounds * self._job_seconds))

    def _busy(self) -> ServerBusyError:
        return ServerBusyError(
            f"the server is busy with other {self.name} requests",
            retry_after=self.retry_after(),
        )

    def close(self) -> None:
        """Let the threads go (waiting jobs are dropped); a later job starts new ones."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


class ClientRateLimit:
    """A token bucket per client: `count` requests per `period` seconds, refilled evenly, so a
    client may spend its whole allowance in a burst and then one request per period/count."""

    def __init__(self, name: str, rate: tuple[int, float] | None) -> None:
        self.name = name
        self.rate = rate
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # client: (tokens, at)

    def take(self, client: str) -> None:
        """Spend one of the client's tokens, or TooManyRequestsError (429, Retry-After)."""
        if self.rate is None:
            return
        count, period = self.rate
        per_second = count / period
        with self._lock:
            now = time.monotonic()
            tokens, at = self._buckets.get(client, (float(count), now))
            tokens = min(float(count), tokens + (now - at) * per_second)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                wait = math.ceil((1.0 - tokens) / per_second)
                raise TooManyRequestsError(
                    f"too many {self.name} requests from this client (at most {count} per "
                    f"{period:g} s)",
                    retry_after=max(MIN_RETRY_AFTER_S, wait),
                )
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._forget_idle(now, count, per_second)

    def _forget_idle(self, now: float, count: int, per_second: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        self._buckets = {
            client: (tokens, at)
            for client, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * per_second < count
        }


@dataclass(frozen=True)
class Admission:
    """The lanes and limits of one app: searches, and renders (thumbnails, fingerprints)."""

    search: WorkLane
    render: WorkLane
    search_limit: ClientRateLimit
    render_limit: ClientRateLimit
    write_limit: ClientRateLimit  # judgements, per user and per address (two keys)
    sign_in_limit: ClientRateLimit  # per address
    compute_threads: int

    @classmethod
    def from_settings(cls, settings: Settings, cores: int | None = None) -> Admission:
        """Lanes sized from the settings, or from the cores where a setting is 0."""
        cores = cores or cpu_cores()
        slots = settings.search_slots or default_slots(cores)
        return cls(
            search=WorkLane("search", slots, settings.search_queue),
            render=WorkLane("render", slots, settings.render_queue),
            search_limit=ClientRateLimit("search", parse_rate(settings.search_rate)),
            render_limit=ClientRateLimit("render", parse_rate(settings.render_rate)),
            write_limit=ClientRateLimit("judgement", parse_rate(settings.write_rate)),
            sign_in_limit=ClientRateLimit("sign-in", parse_rate(settings.signin_rate)),
            compute_threads=compute_threads(cores),
        )

    def close(self) -> None:
        """Shut the lanes' threads down (the app's shutdown hook)."""
        self.search.close()
        self.render.close()


def client_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Who a request comes from, for rate limits: the peer address, which uvicorn takes from
    X-Forwarded-For when the peer is a proxy it trusts (FORWARDED_ALLOW_IPS)."""
    client = connection.client
    return client.host if client is not None else "unknown"


async def refused_slowly(*checks: Callable[[], None]) -> None:
    """Run the checks; when one refuses, let its refusal out only after REFUSAL_DELAY_S."""
    try:
        for check in checks:
            check()
    except (ServerBusyError, TooManyRequestsError):
        await asyncio.sleep(REFUSAL_DELAY_S)
        raise


async def admit_search(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard of search routes: the client's rate and the lane's room, checked before the body
    is read, so that a refused upload costs next to nothing."""
    admission: Admission = connection.app.state.admission
    client = client_key(connection)
    await refused_slowly(lambda: admission.search_limit.take(client), admission.search.check)


async def limit_renders(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Guard of routes that render on every request (fingerprints): the client's render rate."""
    admission: Admission = connection.app.state.admission
    client = client_key(connection)
    await refused_slowly(lambda: admission.render_limit.take(client))

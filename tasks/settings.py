"""One typed settings object, read from LOOKALIKE_* environment variables with defaults."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from pydantic import ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lookalike.tasks.errors import LookalikeError
from lookalike.tasks.models import DEFAULT_MODEL, MODELS, PRECISIONS

ENV_PREFIX = "LOOKALIKE_"
TASK_RUNNERS = ("local", "dask")

# What a value of the field's type looks like, by pydantic's error type.
_EXPECTED = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "int_type": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
}


class SettingsError(LookalikeError):
    """A setting has a value that cannot be used."""


class Settings(BaseSettings):
    """Every knob of lookalike; the CLI, flows, API and compose file use the same names.

    The environment variable of a field is LOOKALIKE_ plus its name in capitals,
    e.g. ``database_url`` is read from ``LOOKALIKE_DATABASE_URL``; an empty one counts as
    unset. Values given to the constructor win over the environment. A bad value, wherever
    it comes from, is a SettingsError with one line naming it.
    """

    # extra="forbid": a misspelt keyword fails; unknown LOOKALIKE_* variables are not read.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="forbid"
    )

    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file in data_dir
    staging_dir: Path | None = None  # None: data_dir / "staging"
    weights: str = "imagenet"  # imagenet | none | a weights file | a KerasHub preset folder
    model: str = DEFAULT_MODEL  # the feature network, a key of tasks.models.MODELS
    precision: str = ""  # float32 | bfloat16 | float16; empty: float16 on a GPU, else float32
    # CLIP's tokenizer for weights that bring none (none, a weights file): a preset folder or
    # a folder with vocabulary.json and merges.txt (tasks.models.load_text_encoder).
    tokenizer: str = ""
    batch_size: int = 64
    k: int = 100
    decode_workers: int = 0  # 0: one per core
    reduced_scale_decode: bool = False  # big JPEGs decoded at 1/2..1/8 scale: faster, not same
    max_image_pixels: int = 100_000_000  # larger images are refused as decompression bombs
    host: str = "127.0.0.1"
    port: int = 5000
    upload_limit_mb: int = 20
    cors_origins: str = ""  # comma separated; empty: CORS closed
    thumbnail_dir: Path | None = None  # None: data_dir / "thumbnails"
    neighbour_cache: bool = True  # API on MariaDB: every neighbour list in memory (12 B x n x k)
    task_runner: str = "local"  # local | dask: where extraction shards and kNN row blocks run
    dask_address: str = ""  # scheduler of a Dask cluster; empty with dask: a temporary local one
    lock_timeout: float = 3600.0  # seconds a run waits for another run on the same database
    # Near duplicates: pairs within this fraction of the median k-th-neighbour distance.
    duplicate_threshold: float = 0.06
    # Expensive API work (api/admission.py): searches run at most this many at once (0: from
    # the cores), this many more wait, and beyond that the API answers 503 with Retry-After.
    search_slots: int = 0
    search_queue: int = 4
    # Thumbnails made on request wait longer: a page view asks for 21 at once, each short.
    render_queue: int = 64
    # Per-client limits, "COUNT/second|minute|hour" or "off": searches by upload, and thumbnails
    # made on request plus fingerprints.
    search_rate: str = "30/minute"
    render_rate: str = "600/minute"
    # Judgements (the API's only writes): they go through this second database URL, whose
    # account may only write the judgement tables; empty: write routes answer 503.
    writer_database_url: str = ""
    read_requires_login: bool = False  # true: every read route needs a token or a session too
    # Signs the page's session and CSRF cookies; empty: a random one per process, so that
    # sign-ins end when the API restarts. Set it (32+ characters) to keep them.
    session_secret: str = ""
    secure_cookies: bool = True  # false only behind plain HTTP other than localhost
    # Per user and per client address: judgements written; per address: sign-in attempts.
    write_rate: str = "60/minute"
    signin_rate: str = "10/minute"

    def __init__(self, **values: Any) -> None:
        """The environment's values under the given ones, checked."""
        with _one_line_errors(values):
            super().__init__(**values)

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read settings from the environment; keyword overrides that are not None win.

        An explicit task_runner="local" also sets aside LOOKALIKE_DASK_ADDRESS, so that
        `--task-runner local` works where the environment names a cluster.
        """
        given = _given(overrides)
        if given.get("task_runner") == "local":
            given.setdefault("dask_address", "")
        return cls(**given)

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given non-None values replaced, checked like the original."""
        given = _given(overrides)
        with _one_line_errors(given):
            # model_validate validates without reading the environment again.
            return type(self).model_validate({**self.model_dump(), **given})

    @field_validator(
        "reduced_scale_decode",
        "neighbour_cache",
        "read_requires_login",
        "secure_cookies",
        mode="before",
    )
    @classmethod
    def _strip_flag(cls, value: Any) -> Any:
        """' true ' reads as 'true' (pydantic takes true/false, 1/0, yes/no, on/off, any case)."""
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_values(self) -> Self:
        """Refuse values that would fail later in a less clear place.

        SettingsError is no ValueError, so pydantic lets it through unwrapped.
        """
        if self.batch_size < 1:
            raise SettingsError(f"batch size must be at least 1, got {self.batch_size}")
        if self.k < 1:
            raise SettingsError(f"k must be at least 1, got {self.k}")
        if self.decode_workers < 0:
            raise SettingsError(f"decode workers must be 0 or more, got {self.decode_workers}")
        check_task_runner(self.task_runner, self.dask_address)
        if self.model not in MODELS:
            raise SettingsError(f"model must be one of {', '.join(MODELS)}, not {self.model!r}")
        if self.precision not in ("", *PRECISIONS):
            raise SettingsError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        check_duplicate_threshold(self.duplicate_threshold)
        if min(self.search_slots, self.search_queue, self.render_queue) < 0:
            raise SettingsError("search slots, search queue and render queue must be 0 or more")
        for name in ("search_rate", "render_rate", "write_rate", "signin_rate"):
            parse_rate(getattr(self, name), env_name(name))
        if self.session_secret and len(self.session_secret) < MIN_SESSION_SECRET:
            raise SettingsError(
                f"the session secret must have at least {MIN_SESSION_SECRET} characters"
            )
        if not 0 <= self.lock_timeout < float("inf"):
            raise SettingsError(f"the lock timeout must be 0 s or more, got {self.lock_timeout:g}")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL; the embedded SQLite file when none is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lookalike.sqlite').resolve()}"

    @property
    def resolved_staging_dir(self) -> Path:
        """Where extracted feature batches are staged as Arrow files."""
        return self.staging_dir or self.data_dir / "staging"

    @property
    def resolved_thumbnail_dir(self) -> Path:
        """Where the API caches thumbnails."""
        return self.thumbnail_dir or self.data_dir / "thumbnails"


MIN_SESSION_SECRET = 32

# The largest duplicate threshold offered: pairs up to it are kept for regrouping.
MAX_DUPLICATE_THRESHOLD = 0.25


def check_duplicate_threshold(fraction: float) -> None:
    """Refuse a duplicate threshold outside (0, MAX_DUPLICATE_THRESHOLD]."""
    if not 0 < fraction <= MAX_DUPLICATE_THRESHOLD:
        raise SettingsError(
            f"the duplicate threshold must be above 0 and at most {MAX_DUPLICATE_THRESHOLD}, "
            f"got {fraction:g}"
        )


RATE_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


def parse_rate(text: str, name: str = "rate") -> tuple[int, float] | None:
    """A rate such as "30/minute" as (count, period in seconds); None for "off"."""
    if text.strip().lower() == "off":
        return None
    count, _, period = text.strip().partition("/")
    if not count.strip().isdigit() or int(count) < 1 or period.strip() not in RATE_PERIODS:
        raise SettingsError(
            f"{name} must be COUNT/second, COUNT/minute, COUNT/hour or off, got {text!r}"
        )
    return int(count), RATE_PERIODS[period.strip()]


def check_task_runner(kind: str, dask_address: str = "") -> None:
    """The task runner is known, and a Dask address (without spaces) comes with the dask one."""
    if kind not in TASK_RUNNERS:
        raise SettingsError(f"task runner must be one of {', '.join(TASK_RUNNERS)}, not {kind!r}")
    if dask_address and kind != "dask":
        raise SettingsError(
            "a Dask address needs the dask task runner "
            "(--task-runner dask or LOOKALIKE_TASK_RUNNER=dask)"
        )
    if any(char.isspace() for char in dask_address):
        raise SettingsError(f"Dask address must not contain spaces: {dask_address!r}")


def env_name(field: str) -> str:
    """The environment variable a field is read from, e.g. LOOKALIKE_BATCH_SIZE."""
    return ENV_PREFIX + field.upper()


def _given(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The overrides that were given: None means "not given"."""
    return {name: value for name, value in overrides.items() if value is not None}


@contextmanager
def _one_line_errors(given: Mapping[str, Any]) -> Iterator[None]:
    """Turn pydantic's report on a bad value into a one-line SettingsError."""
    try:
        yield
    except ValidationError as exc:
        raise SettingsError(describe_invalid(exc, given)) from None


def describe_invalid(exc: ValidationError, given: Mapping[str, Any]) -> str:
    """One line on the first bad value, named as it was set: keyword, else environment variable."""
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "settings"
    if error["type"] == "extra_forbidden":
        return f"unknown setting {field!r}"
    name = field if field in given else env_name(field)
    expected = _EXPECTED.get(error["type"])
    if expected is None:
        return f"{name}: {error['msg']}, got {error['input']!r}"
    return f"{name} must be {expected}, got {error['input']!r}"

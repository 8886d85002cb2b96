"""One typed settings object, read from LOOKALIKE_* environment variables with defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lookalike.tasks.errors import LookalikeError

ENV_PREFIX = "LOOKALIKE_"
TASK_RUNNERS = ("local", "dask")


class SettingsError(LookalikeError):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True)
class Settings:
    """Every knob of lookalike; the CLI, flows, API and compose file use the same names.

    The environment variable of a field is LOOKALIKE_ plus its name in capitals,
    e.g. ``database_url`` is read from ``LOOKALIKE_DATABASE_URL``.
    """

    data_dir: Path = Path("data")
    database_url: str = ""  # empty: SQLite file in data_dir
    staging_dir: Path | None = None  # None: data_dir / "staging"
    weights: str = "imagenet"  # imagenet | none | path to a .h5 file
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

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from the environment; keyword overrides that are not None win.

        An explicit task_runner="local" also sets aside LOOKALIKE_DASK_ADDRESS, so that
        `--task-runner local` works where the environment names a cluster.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _parse(field.name, str(field.type), raw)
        if overrides.get("task_runner") == "local" and overrides.get("dask_address") is None:
            values.pop("dask_address", None)
        values.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse values that would fail later in a less clear place."""
        if self.batch_size < 1:
            raise SettingsError(f"batch size must be at least 1, got {self.batch_size}")
        if self.k < 1:
            raise SettingsError(f"k must be at least 1, got {self.k}")
        if self.decode_workers < 0:
            raise SettingsError(f"decode workers must be 0 or more, got {self.decode_workers}")
        self._validate_runner()
        if not 0 <= self.lock_timeout < float("inf"):
            raise SettingsError(f"the lock timeout must be 0 s or more, got {self.lock_timeout:g}")

    def _validate_runner(self) -> None:
        """The task runner is known, and a Dask address comes with the dask runner."""
        if self.task_runner not in TASK_RUNNERS:
            raise SettingsError(
                f"task runner must be one of {', '.join(TASK_RUNNERS)}, not {self.task_runner!r}"
            )
        if self.dask_address and self.task_runner != "dask":
            raise SettingsError(
                "a Dask address needs the dask task runner "
                "(--task-runner dask or LOOKALIKE_TASK_RUNNER=dask)"
            )
        if any(char.isspace() for char in self.dask_address):
            raise SettingsError(f"Dask address must not contain spaces: {self.dask_address!r}")

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

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with the given non-None values replaced."""
        changed = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        changed.validate()
        return changed


def _parse(name: str, type_name: str, raw: str) -> Any:
    """Convert one environment string to the field's type."""
    if type_name in ("int", "float"):
        kind = int if type_name == "int" else float
        try:
            return kind(raw)
        except ValueError:
            article = "an integer" if kind is int else "a number"
            raise SettingsError(
                f"{ENV_PREFIX}{name.upper()} must be {article}, got {raw!r}"
            ) from None
    if "Path" in type_name:
        return Path(raw)
    if type_name == "bool":
        return _parse_bool(name, raw)
    return raw


def _parse_bool(name: str, raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off, in any case."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be true or false, got {raw!r}")

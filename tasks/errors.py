"""The errors caused by input or environment: reported to users in one line, no traceback."""

from __future__ import annotations

from lookalike.tasks.catalog import CollectionMismatchError, NoImagesError
from lookalike.tasks.database import DatabaseError
from lookalike.tasks.discover import DiscoveryError
from lookalike.tasks.extract import WeightsError
from lookalike.tasks.knn.space import NonFiniteFeaturesError
from lookalike.tasks.load import LoadError
from lookalike.tasks.settings import SettingsError
from lookalike.tasks.stage import StagingError

USER_ERRORS: tuple[type[BaseException], ...] = (
    CollectionMismatchError,
    DatabaseError,
    DiscoveryError,
    LoadError,
    NoImagesError,
    NonFiniteFeaturesError,
    SettingsError,
    StagingError,
    WeightsError,
)

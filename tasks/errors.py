"""The errors caused by input or environment: reported to users in one line, no traceback."""

from __future__ import annotations

from tasks.catalog import CollectionMismatchError, NoImagesError
from tasks.database import DatabaseError
from tasks.discover import DiscoveryError
from tasks.extract import WeightsError
from tasks.knn_space import NonFiniteFeaturesError
from tasks.load import LoadError
from tasks.settings import SettingsError
from tasks.stage import StagingError

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

"""The schema of the version before sources (one folder per database), for the tests that
build such a database and check that it is migrated or refused: image_names without source_id
and unique by file name, collection with the folder's root; every other table as now."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.dialects import mysql

from lookalike.sql.schema import metadata

_MARIADB: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_nopad_bin",
}
_PATH = String(768).with_variant(
    mysql.VARCHAR(768, collation="utf8mb4_nopad_bin"), "mysql", "mariadb"
)
_TEXT = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def legacy_metadata() -> MetaData:
    """The schema before sources: today's tables, but collection and image_names as they were."""
    legacy = MetaData()
    Table(
        "collection",
        legacy,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("root", _TEXT, nullable=False),
        Column("model", String(64), nullable=False),
        Column("weights", String(255), nullable=False),
        Column("created_at", DateTime, nullable=False),
        **_MARIADB,
    )
    Table(
        "image_names",
        legacy,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("file_name", _PATH, nullable=False, unique=True),
        Column("content_hash", String(32), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("mtime_ns", BigInteger, nullable=False),
        Column("width", Integer),
        Column("height", Integer),
        Column("status", String(16), nullable=False),
        Column("error", _TEXT),
        Column("indexed", Boolean, nullable=False, default=False),
        Index("ix_image_names_status", "status"),
        **_MARIADB,
    )
    for table in metadata.sorted_tables:
        if table.name not in ("collection", "image_names", "sources"):
            table.to_metadata(legacy)
    return legacy

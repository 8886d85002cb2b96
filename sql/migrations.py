"""Bring a database made by an earlier version up to sql/schema.py, keeping every feature."""

from __future__ import annotations

import logging
import re
from pathlib import PurePath

from sqlalchemy import Connection, DateTime, Engine, MetaData, Text, inspect, text

from lookalike.sql.schema import MAX_SOURCE_NAME_CHARS, image_names, sources

log = logging.getLogger(__name__)

# MariaDB DDL commits as it goes: two processes opening an old database at once take turns.
_MARIADB_LOCK = "lookalike_migrate"


def needs_sources_migration(engine: Engine) -> bool:
    """True for a database of one folder (before sources): image_names without source_id."""
    inspector = inspect(engine)
    if not inspector.has_table("image_names"):
        return False
    return "source_id" not in {c["name"] for c in inspector.get_columns("image_names")}


def source_name_for(root: str) -> str:
    """The name a folder's source gets by default: the folder's own name, made printable."""
    name = re.sub(r"[^\w.-]+", "-", PurePath(root).name).strip("-.")
    return (name or "images")[:MAX_SOURCE_NAME_CHARS]


def migrate(engine: Engine) -> bool:
    """Migrate an old database in place; True when it did. Its root becomes source 1.

    No feature is touched: image ids stay, so features, lists, duplicate groups, the map and
    judgements stay valid.
    """
    if not needs_sources_migration(engine):
        return False
    if engine.dialect.name == "sqlite":
        _migrate_sqlite(engine)
    else:
        _migrate_mariadb(engine)
    return True


def _copy_root_to_source(conn: Connection) -> None:
    """Source 1 from the collection row's root (none for a database that never ran)."""
    sources.create(conn, checkfirst=True)
    old_row = text("SELECT root, created_at FROM collection WHERE id = 1").columns(
        root=Text, created_at=DateTime
    )
    row = conn.execute(old_row).first()
    if row is not None:
        conn.execute(
            sources.insert().values(
                id=1, name=source_name_for(row.root), root=row.root, created_at=row.created_at
            )
        )
        name = source_name_for(row.root)
        log.warning("database migrated: its folder %s is now the source %r", row.root, name)


def _migrate_sqlite(engine: Engine) -> None:
    """SQLite cannot change a table's constraints: image_names is rebuilt (SQLite's
    documented twelve steps), with foreign keys off so that the drop cascades to nothing."""
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # a no-op inside a transaction
        conn.commit()
        try:
            with conn.begin():
                if "source_id" in {c["name"] for c in inspect(conn).get_columns("image_names")}:
                    return  # another process migrated it first
                _copy_root_to_source(conn)
                _rebuild_sqlite_image_names(conn)
                conn.exec_driver_sql("ALTER TABLE collection DROP COLUMN root")
                problems = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                if problems:
                    raise RuntimeError(f"migration left broken references: {problems[:3]}")
        finally:
            conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            conn.commit()


def _rebuild_sqlite_image_names(conn: Connection) -> None:
    """Copy image_names into the new layout under a temporary name, then swap it in."""
    scratch = MetaData()
    new = image_names.to_metadata(scratch, name="image_names_migrating")
    for index in list(new.indexes):
        new.indexes.discard(index)  # the real index names are created after the swap
    sources.to_metadata(scratch)
    new.create(conn)
    columns = [c.name for c in image_names.columns if c.name != "source_id"]
    listed = ", ".join(columns)
    conn.exec_driver_sql(
        f"INSERT INTO image_names_migrating (source_id, {listed}) "
        f"SELECT 1, {listed} FROM image_names"
    )
    conn.exec_driver_sql("DROP TABLE image_names")
    conn.exec_driver_sql("ALTER TABLE image_names_migrating RENAME TO image_names")
    for index in image_names.indexes:
        index.create(conn)


def _migrate_mariadb(engine: Engine) -> None:
    """ALTER TABLE in place, under a named lock; DDL commits as it goes, so each step checks."""
    with engine.connect() as conn:
        conn.execute(text("SELECT GET_LOCK(:name, 3600)"), {"name": _MARIADB_LOCK})
        conn.commit()
        try:
            if not needs_sources_migration(engine):
                return
            with conn.begin():
                _copy_root_to_source(conn)
            conn.exec_driver_sql(
                "ALTER TABLE image_names"
                " ADD COLUMN source_id INTEGER NOT NULL DEFAULT 1 AFTER id,"
                " MODIFY file_name VARCHAR(767) COLLATE utf8mb4_nopad_bin NOT NULL,"
                " DROP INDEX file_name,"
                " ADD CONSTRAINT uq_image_names_source_file UNIQUE (source_id, file_name),"
                " ADD FOREIGN KEY (source_id) REFERENCES sources (id)"
            )
            conn.exec_driver_sql("ALTER TABLE image_names ALTER COLUMN source_id DROP DEFAULT")
            conn.exec_driver_sql("ALTER TABLE collection DROP COLUMN root")
            conn.commit()
        finally:
            conn.rollback()
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": _MARIADB_LOCK})
            conn.commit()

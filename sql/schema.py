"""The one definition of lookalike's tables; `make schema` writes their MariaDB DDL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateIndex, CreateTable

# image_names.status
STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_PENDING = "pending"  # discovered, not yet extracted
# runs.status: running until the run records how it ended; a row still running when the next
# run takes the run lock belongs to a run whose process died, and becomes interrupted.
RUN_RUNNING = "running"
RUN_COMPLETED = "completed"
RUN_FAILED = "failed"
RUN_INTERRUPTED = "interrupted"

metadata = MetaData()
_MARIADB: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_nopad_bin",
}

# Paths are case-sensitive and compared byte for byte, hence the binary collation. 767
# characters: with the source id, the unique key is 4 + 767 * 4 = 3072 bytes, InnoDB's limit.
MAX_FILE_NAME_CHARS = 767
_path = String(MAX_FILE_NAME_CHARS).with_variant(
    mysql.VARCHAR(MAX_FILE_NAME_CHARS, collation="utf8mb4_nopad_bin"), "mysql", "mariadb"
)
MAX_SOURCE_NAME_CHARS = 64
_text = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

# One row: the model and weights every feature of this database comes from.
collection = Table(
    "collection",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("model", String(64), nullable=False),
    Column("weights", String(255), nullable=False),
    Column("created_at", DateTime, nullable=False),
    **_MARIADB,
)

runs = Table(
    "runs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime),
    Column("status", String(16), nullable=False),
    Column("weights", String(255), nullable=False),
    Column("summary", _text),
    **_MARIADB,
)

# The archive's folders: each source is one root folder under a name. An image is (source,
# relative path): the same path in two sources is two images.
sources = Table(
    "sources",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(MAX_SOURCE_NAME_CHARS), nullable=False, unique=True),
    Column("root", _text, nullable=False),
    Column("created_at", DateTime, nullable=False),
    # The last run that brought this source's images up to date (runs.id); NULL: none yet.
    Column("last_run_id", Integer),
    **_MARIADB,
)

image_names = Table(
    "image_names",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    # No cascade: a source is removed by removing its images first (tasks/sources.py).
    Column("source_id", Integer, ForeignKey("sources.id"), nullable=False),
    Column("file_name", _path, nullable=False),
    Column("content_hash", String(32), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("width", Integer),
    Column("height", Integer),
    Column("status", String(16), nullable=False),
    Column("error", _text),
    # False until this image's current features have been through a neighbour computation.
    Column("indexed", Boolean, nullable=False, default=False),
    Index("ix_image_names_status", "status"),
    UniqueConstraint("source_id", "file_name", name="uq_image_names_source_file"),
    **_MARIADB,
)

image_features = Table(
    "image_features",
    metadata,
    Column(
        "image_id",
        Integer,
        ForeignKey("image_names.id", ondelete="CASCADE"),
        primary_key=True,
        autoincrement=False,
    ),
    Column("model", String(64), nullable=False),
    # Little-endian float32 x the collection's model's dimension (2048 for InceptionV3).
    Column("features", LargeBinary, nullable=False),
    # Content key of the staged Arrow batch holding the same vector, read memory-mapped by kNN.
    Column("staged_batch", String(40)),
    **_MARIADB,
)

# No foreign keys here: the neighbour table is rebuilt beside the live one and swapped in.
image_neighbours = Table(
    "image_neighbours",
    metadata,
    Column("image_id", Integer, primary_key=True, autoincrement=False),
    Column("rank", SmallInteger, primary_key=True, autoincrement=False),
    Column("neighbour_id", Integer, nullable=False),
    Column("distance", Float, nullable=False),
    Index("ix_image_neighbours_neighbour_id", "neighbour_id"),
    **_MARIADB,
)

# Duplicate groups (tasks/duplicates.py): a group's id is its representative's image id; every
# member lies within the threshold of the representative. No foreign keys: the three tables
# are rewritten together by the find-duplicates step.
duplicate_groups = Table(
    "duplicate_groups",
    metadata,
    Column("image_id", Integer, primary_key=True, autoincrement=False),
    Column("group_id", Integer, nullable=False),
    Column("distance", Float, nullable=False),  # to the representative; 0 for itself
    Column("kind", String(8), nullable=False),  # exact (same content hash) or near
    Index("ix_duplicate_groups_group_id", "group_id"),
    **_MARIADB,
)

# Neighbour pairs (a < b) up to the largest threshold offered, so that another threshold
# regroups them without reading the neighbour table; exact pairs (same hash) at distance 0.
duplicate_pairs = Table(
    "duplicate_pairs",
    metadata,
    Column("image_id", Integer, primary_key=True, autoincrement=False),
    Column("other_id", Integer, primary_key=True, autoincrement=False),
    Column("distance", Float, nullable=False),
    **_MARIADB,
)

# The images (and their content) the stored groups were computed from: the next run's
# changed and deleted images are the differences.
duplicate_inputs = Table(
    "duplicate_inputs",
    metadata,
    Column("image_id", Integer, primary_key=True, autoincrement=False),
    Column("content_hash", String(32), nullable=False),
    **_MARIADB,
)

# One row: what the stored groups were computed from, and the distance scale they use.
duplicate_state = Table(
    "duplicate_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("fingerprint", String(64), nullable=False),  # inputs; equal: nothing to redo
    # Model, weights, list length and threshold: while they stay, an update can be incremental.
    Column("basis", String(400), nullable=False),
    Column("scale", Float, nullable=False),  # median distance to the k-th neighbour
    Column("threshold", Float, nullable=False),  # a fraction of the scale
    Column("histogram", _text, nullable=False),  # JSON: first-neighbour distances, binned
    Column("computed_at", DateTime, nullable=False),
    **_MARIADB,
)

# Where each image is on the map (tasks/map_layout.py): UMAP of the stored neighbour graph.
image_map = Table(
    "image_map",
    metadata,
    Column("image_id", Integer, primary_key=True, autoincrement=False),
    Column("x", Float, nullable=False),
    Column("y", Float, nullable=False),
    Column("content_hash", String(32), nullable=False),  # of the image when it was placed
    **_MARIADB,
)

# One row: what the stored map was laid out from.
map_state = Table(
    "map_state",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("fingerprint", String(64), nullable=False),  # inputs; equal: nothing to redo
    # Model, weights and layout parameters: while they stay, new images can be placed.
    Column("basis", String(400), nullable=False),
    Column("fitted_images", Integer, nullable=False),  # images at the last full fit
    Column("placed_images", Integer, nullable=False),  # images placed since, among neighbours
    Column("computed_at", DateTime, nullable=False),
    **_MARIADB,
)


# People who may write (tasks/accounts.py). A removed user keeps the row, so that their
# judgements stay attributed, but loses every credential.
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("role", String(16), nullable=False),  # curator | admin
    # An API token is "lka_<key>_<secret>": the key finds the row, the secret is kept only as
    # a salted SHA-256 (salt$hex); the password only as salted scrypt (salt$hex).
    Column("token_key", String(16), unique=True),
    Column("token_hash", String(128)),
    Column("password_hash", String(200)),
    # Raised whenever a credential changes or the user is removed: sessions carry the value
    # they were signed in with and end when it no longer matches.
    Column("credential_version", Integer, nullable=False, default=1),
    Column("created_at", DateTime, nullable=False),
    Column("removed_at", DateTime),
    **_MARIADB,
)

# One current verdict per user and pair; the pair is stored as (smaller id, larger id), since
# "same object" or "not similar" holds whichever of the two images it was given from.
# A cleared mark keeps its row with verdict NULL: the writer account may insert and update
# these tables, never delete from them. No foreign keys to images: a judgement outlives a
# photo's removal, as knowledge about the archive.
judgements = Table(
    "judgements",
    metadata,
    Column("image_id", Integer, primary_key=True, autoincrement=False),
    Column("other_id", Integer, primary_key=True, autoincrement=False),
    Column("user_id", Integer, primary_key=True, autoincrement=False),
    Column("verdict", String(16)),  # same_object | similar | not_similar; NULL: cleared
    Column("note", _text),
    Column("updated_at", DateTime, nullable=False),
    Index("ix_judgements_other_id", "other_id"),
    Index("ix_judgements_user_id", "user_id"),
    **_MARIADB,
)

# Every change to a judgement, oldest first: who, when, from what to what.
judgement_audit = Table(
    "judgement_audit",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
    Column("image_id", Integer, nullable=False),
    Column("other_id", Integer, nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("old_verdict", String(16)),
    Column("new_verdict", String(16)),
    Column("note", _text),
    Column("changed_at", DateTime, nullable=False),
    Column("address", String(64)),  # the client's address, as the API saw it
    Index("ix_judgement_audit_pair", "image_id", "other_id"),
    **_MARIADB,
)


def mariadb_ddl() -> str:
    """The CREATE statements for MariaDB, as used to initialise a container."""
    dialect = mysql.dialect()
    statements = []
    for table in metadata.sorted_tables:
        create = str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)).strip()
        statements.append(create + ";")
        for index in sorted(table.indexes, key=lambda ix: str(ix.name)):
            statements.append(
                str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect)).strip() + ";"
            )
    header = "-- Generated by `make schema` from sql/schema.py; do not edit by hand.\n"
    return header + "\n\n".join(statements) + "\n"


if __name__ == "__main__":
    print(mariadb_ddl(), end="")

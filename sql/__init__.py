"""The database schema: SQLAlchemy Core tables and the MariaDB DDL generated from them."""

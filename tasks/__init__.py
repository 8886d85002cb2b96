"""Pipeline stages: plain typed functions, each module with thin Prefect task wrappers."""

"""Prefect flows that wire the stages in tasks/ together, and the lookalike command line."""

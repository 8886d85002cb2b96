"""The base of every error caused by input or environment, and the one line users see of it.

Nothing of lookalike is imported here, so that any module (and the CLI, before Prefect and
the tasks are imported) can use LookalikeError without import cycles or start-up cost.
"""

from __future__ import annotations


class LookalikeError(Exception):
    """Bad input or environment (folder, database, weights, settings): one line, no traceback.

    The CLI prints the first line of the message and exits with status 2; anything else that
    escapes is a bug and keeps its traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first non-blank line of the exception's message; its class name when there is none."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__

"""Progress: a process-local hook through which long stages report work done."""

from __future__ import annotations

from collections.abc import Callable

ProgressHook = Callable[[str, int, int], None]  # (stage, items just finished, total items)

_hook: ProgressHook | None = None


def set_progress_hook(hook: ProgressHook | None) -> None:
    """Install (or remove, with None) the function that draws progress, e.g. the CLI's bar."""
    global _hook
    _hook = hook


def report_progress(stage: str, advance: int, total: int) -> None:
    """Tell the installed hook, if any, that `advance` more of `total` items are done."""
    if _hook is not None:
        _hook(stage, advance, total)

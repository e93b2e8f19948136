"""Progress of long steps, reported to whoever installed a reporter (the CLI, on a terminal).

The pipeline and the study say *what* is under way (``with task("training digits", total=12) as
advance: ... advance()``); they never print. With no reporter installed (a library user, a test, a
command whose output is piped) a task costs nothing and shows nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar

Advance = Callable[[int], None]
# A reporter opens a task by description and total (None: unknown) and yields its advance().
Reporter = Callable[[str, "int | None"], AbstractContextManager[Advance]]

_reporter: ContextVar[Reporter | None] = ContextVar("hwprune_progress", default=None)


def _nothing(_steps: int = 1) -> None:
    return None


@contextmanager
def task(description: str, total: int | None = None) -> Iterator[Advance]:
    """A long step; call the yielded ``advance(n)`` as it goes."""
    reporter = _reporter.get()
    if reporter is None:
        yield _nothing
        return
    with reporter(description, total) as advance:
        yield advance


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    """Install ``reporter`` for the steps run inside this block (in this thread or task)."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def install(reporter: Reporter | None) -> None:
    """Install ``reporter`` for the rest of this thread's run (the CLI, once per command)."""
    _reporter.set(reporter)

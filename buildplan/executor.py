"""Where a task's work runs: the Executor interface the doit actions call.

The local executor runs the node in this process (buildplan/runner.py). A Dask build
(buildplan/distributed.py) installs its own for the life of the cluster. The runner knows no
executor, so it imports nothing that imports it back.
"""
from __future__ import annotations

import contextlib
from typing import Protocol


class Executor(Protocol):
    name: str  # "local", "dask"

    def run(self, store, node_id: str):
        """Build one node of `store`'s plan: None on success, a doit TaskFailed on failure."""

    def running_on(self) -> dict[str, str]:
        """node id -> where it runs now, for the live progress line ({} when it is this process)."""


class LocalExecutor:
    name = "local"

    def run(self, store, node_id: str):
        from buildplan.runner import run_task  # only when a task really runs: a no-op never imports it

        return run_task(store, node_id)

    def running_on(self) -> dict[str, str]:
        return {}


LOCAL = LocalExecutor()
_current: Executor = LOCAL


def current() -> Executor:
    return _current


def remote() -> bool:
    """Whether tasks run elsewhere than this process (their output is not ours to redirect)."""
    return _current is not LOCAL


@contextlib.contextmanager
def using(executor: Executor):
    """Run this process's tasks on `executor` for the duration of the block."""
    global _current
    previous, _current = _current, executor
    try:
        yield executor
    finally:
        _current = previous

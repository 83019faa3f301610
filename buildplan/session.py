"""One Session per config per process: what a doit run works from, made once.

doit builds it through a loader plugin (`SessionLoader`, pyproject.toml): the config path, the
tasks (replayed from the no-op snapshot while nothing changed, else expanded from the plan), the
artifacts root, and, when first needed, the plan and the Store that answers freshness. Commands
reach it as `self.loader.session`, the reporter and the doit actions through `current()` or
`for_config(path)`. Whether a command builds, and so takes the build lock, is declared by the
command (`builds`), not guessed from the command line.

A Dask worker or a test that has only a config path gets the same object from `for_config`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from doit.cmd_base import DodoTaskLoader

from buildplan import env

# doit's own commands that change artifacts/ (ours say so with a `builds` attribute)
_BUILDING_DOIT_COMMANDS = frozenset({"run", "clean"})


class Session:
    def __init__(self, config_path: str):
        self.config_path = config_path
        self._store = None
        self._tasks = None  # (specs, root, fresh, replayed)
        self.building = False

    # --- what doit needs before anything else ----------------------------------------
    def _load_tasks(self):
        if self._tasks is None:
            from buildplan import snapshot, tasks

            snap = snapshot.load(self.config_path)  # only if nothing changed since the last full check
            if snap:
                self._tasks = (snap["tasks"], snap["root"], frozenset(snap["fresh"]), True)
            else:
                plan = self.plan  # a ConfigError here: the caller reports it
                self._tasks = (tasks.task_specs(plan), plan.root, frozenset(), False)
                snapshot.take_at_exit(self.config_path, plan)
        return self._tasks

    @property
    def root(self) -> str:
        return self._load_tasks()[1]

    @property
    def replayed(self) -> bool:
        """Whether this run's tasks came from the no-op snapshot (no plan expanded)."""
        return self._load_tasks()[3]

    def doit_tasks(self):
        from buildplan import tasks

        specs, _, fresh, _ = self._load_tasks()
        yield from tasks.to_doit(specs, self.config_path, _Actions, fresh)

    def skipped_targets(self) -> dict[str, str]:
        specs = self._load_tasks()[0]
        return next((spec.get("skipped", {}) for spec in specs if spec.get("basename") == "default"), {})

    # --- the plan and its state, when needed ----------------------------------------------
    @property
    def store(self):
        if self._store is None:
            from buildplan import config
            from buildplan.plan import build_plan
            from buildplan.state import Store

            loaded = config.load(self.config_path)
            if env.get(env.WORKER_ARTIFACTS):  # a Dask worker keeping its own artifacts/
                loaded = loaded._replace(artifacts=os.path.abspath(env.get(env.WORKER_ARTIFACTS)))
            self._store = Store(build_plan(loaded))
        return self._store

    @property
    def plan(self):
        return self.store.plan

    # --- a build ----------------------------------------------------------------------
    def begin_build(self) -> None:
        """Take the build lock (one build per artifacts/ at a time) and, on the full path, bring
        the manifest in line with the declaration (a batch size taken out, a damaged file)."""
        from buildplan import lock

        if self.building:
            return
        lock.hold(self.root, sys.argv[1:])
        self.building = True
        if not self.replayed:
            try:
                self.store.write_manifest()
            except OSError as e:  # e.g. a full disk: the tasks will say so; the manifest is derived anyway
                print(f"warning: manifest not refreshed: {e}", file=sys.stderr)


class _Actions:
    """What doit calls for each artifact, with (config path, node id): plain data in the task, so
    the snapshot can keep it, and the session of that config (made here if this process has
    none: a doit worker process, a test)."""

    @staticmethod
    def run(config_path: str, node_id: str):
        from buildplan import executor  # the runner is imported only when a task really runs

        return executor.current().run(for_config(config_path).store, node_id)

    @staticmethod
    def clean(config_path: str, node_id: str):
        from buildplan.runner import clean_task

        return clean_task(for_config(config_path).store, node_id)

    @staticmethod
    def fresh(config_path: str, node_id: str) -> bool:
        store = for_config(config_path).store
        return store.is_fresh(store.plan.nodes[node_id])


_SESSIONS: dict[str, Session] = {}
_current: Session | None = None


def for_config(config_path: str) -> Session:
    if config_path not in _SESSIONS:
        _SESSIONS[config_path] = Session(config_path)
    return _SESSIONS[config_path]


def current() -> Session | None:
    """The session doit's loader opened in this process (None outside a doit run)."""
    return _current


def store_for(config_path: str):
    return for_config(config_path).store


def reset() -> None:
    """Forget every session (tests that change files between in-process runs)."""
    global _current
    _SESSIONS.clear()
    _current = None


class SessionLoader(DodoTaskLoader):
    """doit's loader: dodo.py (the checkout guard, DOIT_CONFIG), then the session."""

    def setup(self, opt_values):
        global _current
        super().setup(opt_values)
        from doit import get_var

        from buildplan.files import default_config_path

        path = str(Path(get_var("config", str(default_config_path()))).resolve())
        self.session = _current = for_config(path)
        try:
            self.session.root  # noqa: B018 - the snapshot or the validated plan, before anything runs
            if env.cache_overridden():  # the cache's environment, checked before any work
                from buildplan.cache import settings

                settings({}, path)
        except Exception as e:
            from buildplan.core import ConfigError  # not imported on the no-op path

            if not isinstance(e, ConfigError):
                raise
            print(f"error: {e}", file=sys.stderr)  # a user mistake: one clear message, no traceback
            sys.exit(2)

    def load_doit_config(self):
        # doit's database lives beside the artifacts it describes, wherever models.yaml puts them
        return {**super().load_doit_config(), "dep_file": str(Path(self.session.root) / ".doit.db")}

    def load_tasks(self, cmd, pos_args):
        if getattr(cmd, "builds", cmd.get_name() in _BUILDING_DOIT_COMMANDS) is True:
            self.session.begin_build()
        return super().load_tasks(cmd, pos_args)

"""One plan, and one Store answering freshness from it, per config per process.

dodo.py hands over the plan it expanded; on the no-op fast path (no plan expanded) the first
caller that needs one makes it. The runner, `doit stale`, nightly and the freshness checks all
share it: a process never expands the same config twice.
"""
from __future__ import annotations

import os

from buildplan import env

_STORES: dict = {}  # config path -> Store


def store_for(config_path: str, plan=None):
    """The Store for a config, made from `plan` if given, else from the config when first needed."""
    if config_path not in _STORES:
        from buildplan.state import Store

        if plan is None:
            from buildplan import config
            from buildplan.plan import build_plan

            loaded = config.load(config_path)
            if env.get(env.WORKER_ARTIFACTS):  # a Dask worker keeping its own artifacts/
                loaded = loaded._replace(artifacts=os.path.abspath(env.get(env.WORKER_ARTIFACTS)))
            plan = build_plan(loaded)
        _STORES[config_path] = Store(plan)
    return _STORES[config_path]


def plan_for(config_path: str):
    return store_for(config_path).plan

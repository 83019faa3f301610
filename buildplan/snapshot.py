"""The no-op fast path: replay the last full check while nothing it read has changed.

When a `doit` process that expanded the plan exits, it writes a snapshot: the doit tasks as
data, which artifacts were fresh, and the stat keys (inode, size, mtime, ctime) of everything
those answers came from: the config and the files it names, every project source file, the
files and folders that locate and identify the toolchains, and every record, output and
checkpoint, plus the Python and the environment variables that matter. The next `doit` stats
those few hundred paths and, if not one changed, makes its tasks from the snapshot: no
validation, no plan expansion, no fingerprints. Any difference, harmless or not, means the full
path. Artifacts not fresh in the snapshot are still checked in full when doit asks.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import sys

from buildplan import env, files
from buildplan.files import CODE_DIRS, cache_dir, keep_newest, read_memo, stat_keys, write_memo

# The environment the core reads; backends add the variables they read (ENVIRONMENT), and the
# snapshot records their names, so a replay need not import the backends to compare them.
ENV = ("PATH", "HOME", *env.WATCHED)
FORMAT = 2


def _file(config_path: str):
    return cache_dir() / "noop" / f"{hashlib.sha256(config_path.encode()).hexdigest()[:16]}.json"


def _context(env_keys) -> dict:
    return {"format": FORMAT, "python": sys.version, "prefix": sys.prefix,
            "env": {k: os.environ.get(k) for k in env_keys}}


def _env_keys() -> list[str]:
    from buildplan.backends import registry

    return sorted({*ENV, *(k for b in registry().values() for k in getattr(b, "ENVIRONMENT", ()))})


def load(config_path: str) -> dict | None:
    """The snapshot for this config if everything it was made from is unchanged, else None."""
    try:
        snap = read_memo(_file(config_path))
        if snap and snap["context"] == _context(snap["context"]["env"]) and stat_keys(snap["watched"]) == snap["stats"]:
            return snap
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, torn or from another format: the full path
    return None


def _watched(plan) -> list[str]:
    from buildplan import backends, toolchains
    from buildplan.state import Store

    repo = files.REPO
    paths = [plan.config.path, str(repo / "dodo.py")]
    for d in CODE_DIRS:  # the folders too: a module added or removed
        paths += [str(repo / d), *sorted(str(repo / d / f) for f in os.listdir(repo / d) if f.endswith(".py"))]
    for m in plan.config.models:  # what validation looked at
        if m.checkpoint.path:  # validation looked for config.json only in a folder
            paths += [m.checkpoint.path] + ([os.path.join(m.checkpoint.path, "config.json")]
                                            if m.checkpoint.kind == "hf_dir" else [])
        if m.calibration.get("data"):
            paths.append(m.calibration["data"])
    for name in (toolchains.PYTHON, *sorted(set(plan.target_backend.values()))):
        backends.toolchain(name, plan.config)  # fills WATCHED[name]
        paths += toolchains.WATCHED[name]
    store = Store(plan)
    paths.append(str(store.root / files.MANIFEST))  # a damaged or deleted manifest sends the next run the full way
    for node in plan.nodes.values():
        paths += store.input_files(node)
    return list(dict.fromkeys(paths))  # an upstream record is an input of each of its consumers


def take(config_path: str, plan):
    """Write the snapshot. Nothing computed earlier in this process is trusted (it may predate an
    edit made during the run): stats first, then a new plan, toolchain detection and freshness
    pass, then the stats again. A change in between aborts, so a snapshot can be missing or
    useless, never wrong."""
    from buildplan import backends, codedeps, config, state
    from buildplan.plan import build_plan
    from buildplan.tasks import task_specs

    watched = _watched(plan)
    before = stat_keys(watched)
    backends.reset_toolchains()
    codedeps.reset()
    state.code_hash.cache_clear()
    try:
        plan = build_plan(config.load(config_path))
    except config.ConfigError:
        return
    if _watched(plan) != watched:
        return
    store = state.Store(plan)
    if store.manifest_problem():
        return  # the next build, on the full path, rewrites it first
    fresh = sorted(store.fresh_closure())
    store.save_verdicts()
    specs = task_specs(plan)
    if stat_keys(watched) != before:
        return
    snap = {"context": _context(_env_keys()), "watched": watched, "stats": before, "root": plan.root,
            "tasks": specs, "fresh": fresh}
    try:
        write_memo(_file(config_path), snap)
        keep_newest(_file(config_path).parent, 64)
    except OSError:
        pass  # a read-only cache: the full path each time


def take_at_exit(config_path: str, plan):
    # registered before any Store registers its verdicts, so it runs after they are saved
    atexit.register(take, config_path, plan)

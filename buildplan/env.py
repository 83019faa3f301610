"""Every environment variable the build reads, in one place, each with one meaning.

The memo folder (parsed YAML, the no-op snapshot, toolchain identities, code closures), the
toolchain location (where ./bootstrap.sh installs toolchain environments) and the shared artifact cache are
three different things with three names. `BLIPC_CACHE`, which used to set the first two, still
works and says once that it is deprecated.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CONFIG = "BLIPC_CONFIG"  # the models.yaml to use (like config=FILE)
MEMO_DIR = "BLIPC_MEMO_DIR"  # memos: only ever a faster way to an answer
TOOLCHAIN_DIR = "BLIPC_TOOLCHAIN_DIR"  # where ./bootstrap.sh puts toolchain environments
CACHE_URL, CACHE_MODE, CACHE_REQUIRED = "BLIPC_CACHE_URL", "BLIPC_CACHE_MODE", "BLIPC_CACHE_REQUIRED"  # shared cache
RELEASES_URL = "BLIPC_RELEASES_URL"  # where `doit publish` / `doit fetch` go (over models.yaml's releases.url)
DASK_SCHEDULER, DASK_POOL_MB = "BLIPC_DASK_SCHEDULER", "BLIPC_DASK_POOL_MB"
WORKER_ARTIFACTS = "BLIPC_WORKER_ARTIFACTS"  # a Dask worker that keeps its own artifacts/
VERBOSE, WAIT = "BLIPC_VERBOSE", "BLIPC_WAIT"
OLD_CACHE = "BLIPC_CACHE"  # deprecated: memo folder and toolchain location at once

_warned = False


def get(name: str) -> str | None:
    """A variable's value; unset and empty are the same."""
    return os.environ.get(name) or None


def raw(name: str) -> str | None:
    """A variable's value as set, empty included (an empty BLIPC_CACHE_URL turns a cache off)."""
    return os.environ.get(name)


def cache_overridden() -> bool:
    """Whether the shared cache's settings come (partly) from the environment."""
    return any(raw(n) is not None for n in (CACHE_URL, CACHE_MODE, CACHE_REQUIRED))


def flag(name: str) -> bool:
    return (os.environ.get(name) or "0") != "0"


def _old_cache() -> str | None:
    global _warned
    value = get(OLD_CACHE)
    if value and not _warned:
        _warned = True
        print(f"warning: {OLD_CACHE} is deprecated: it set both the memo folder and the toolchain location; "
              f"use {MEMO_DIR} and/or {TOOLCHAIN_DIR} (the shared artifact cache is {CACHE_URL})", file=sys.stderr)
    return value


def _default_dir() -> Path:
    return Path.home() / ".cache" / "blipc"


def memo_dir() -> Path:
    return Path(get(MEMO_DIR) or _old_cache() or _default_dir())


def toolchain_dir() -> Path:
    return Path(get(TOOLCHAIN_DIR) or _old_cache() or _default_dir())


def config_path(repo: Path) -> Path:
    return Path(get(CONFIG) or repo / "models.yaml")


# What the no-op snapshot compares: any change sends the next run the full way.
# (A backend declares the variables it reads itself, as ENVIRONMENT, and reads them with get().)
WATCHED = (CONFIG, MEMO_DIR, TOOLCHAIN_DIR, OLD_CACHE, CACHE_URL, CACHE_MODE, CACHE_REQUIRED,
           WORKER_ARTIFACTS)

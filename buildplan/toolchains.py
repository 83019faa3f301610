"""Find the toolchains that build artifacts and say exactly which build of each is in use.

An identity (version + build hash) is part of every artifact's fingerprint: a different
TPU-MLIR or CANN build makes its artifacts stale. Identities hash large files (TPU-MLIR's
RECORD, the atc binary), so each is memoised on disk while the files it came from keep their
stat keys: a no-op build only stats them.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

from buildplan.core import PYTHON
from buildplan.files import cache_dir, read_memo, sha256_file, stat_keys, write_memo



class Toolchain(NamedTuple):
    name: str
    available: bool
    identity: dict = {}  # goes into fingerprints; empty when unavailable; never mutated
    bin_dir: str | None = None
    problem: str = ""  # why it is unavailable and how to get it
    standin: bool = False  # a test stand-in, never a real compiler

    @property
    def label(self) -> str:
        if not self.available:
            return "missing"
        build = self.identity.get("build")
        return self.identity.get("version", "?") + (f" (build {build})" if build else "")


def short_sha(path: str | Path, limit: int | None = None) -> str:
    """A build identity: sha256 of a file (or its first `limit` bytes), 16 hex digits."""
    return sha256_file(path, limit)[:16]


def installed_versions(names) -> dict:
    """Versions from the `<name>-<version>.dist-info` folder names on sys.path: one listdir per
    entry instead of importlib.metadata's full scan (20 ms per no-op run)."""
    wanted = {n.replace("-", "_").lower(): n for n in names}
    found = {}
    for entry in sys.path:
        try:
            listing = os.listdir(entry or ".")
        except OSError:
            continue
        for item in listing:
            if item.endswith(".dist-info") and "-" in item:
                dist, version = item[:-len(".dist-info")].rsplit("-", 1)
                name = wanted.get(dist.replace("-", "_").replace(".", "_").lower())
                if name and name not in found:  # the first sys.path entry wins, as for imports
                    found[name] = version
    return {n: found.get(n) for n in names}


# Per toolchain, the paths whose stat keys decide whether it is found and which build it is
# (the no-op snapshot watches them too).
WATCHED: dict[str, list[str]] = {}


def memoised(name: str, watched: list[str], identify) -> Toolchain:
    """identify(), reused from the cache while every watched path keeps its stat key. Installing
    or removing a package renames a dist-info folder, which changes its parent's stat key."""
    key = f"{name}:{'|'.join(watched)}"
    stats = stat_keys(watched)
    memo_path = cache_dir() / "toolchains.json"
    memo = read_memo(memo_path) or {}
    hit = memo.get(key)
    if isinstance(hit, dict) and hit.get("stats") == stats:
        with contextlib.suppress(TypeError):  # a damaged entry: identify again
            return Toolchain(**hit["toolchain"])
    tc = identify()
    if tc.available:  # a missing toolchain is cheap to detect and its message depends on the env
        memo[key] = {"stats": stats, "toolchain": tc._asdict()}
        try:
            write_memo(memo_path, memo)
        except OSError:
            pass  # a read-only cache: identify again next time
    return tc


def python_libs(libs: tuple[str, ...]) -> Toolchain:
    """The Python libraries `libs` as a toolchain: found when all are installed, identified by their versions."""
    WATCHED[PYTHON] = [entry or "." for entry in sys.path]
    return memoised(PYTHON, WATCHED[PYTHON], lambda: _identify_python_libs(libs))


def _identify_python_libs(libs: tuple[str, ...]) -> Toolchain:
    versions = installed_versions(libs)
    missing = [k for k, v in versions.items() if v is None]
    return Toolchain(PYTHON, not missing, {"version": versions[libs[0]] or "?", "libs": versions},
                     problem=f"missing Python packages {missing}: run ./bootstrap.sh" if missing else "")

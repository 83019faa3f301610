"""The shared artifact cache: build once, pull everywhere.

Two stores under one prefix, as Bazel's remote cache: `cas/<sha256>` holds output files by
content, `ac/<key>.json` holds what an artifact is (its outputs' roles, sha256 and sizes, its
figures, its toolchain, who built it where and when). The key is the artifact's fingerprint made
portable: params, code hashes, toolchain identity, upstream content digests and the checkpoint's
and calibration files' content hashes, plus FORMAT; no absolute path, host, user or PATH.

Safe against poisoning: an entry is written only after the task succeeded and every gate
passed, files first and the entry last, created only if absent (first writer wins); a stand-in
build is never written. A hit is used only when every file downloads with the recorded size and
sha256, into scratch space first; anything else is a miss, reported, and the artifact is built.
A cache that cannot be reached degrades to local builds with one warning (BLIPC_CACHE_REQUIRED=1
makes that a failure).
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import NamedTuple

from buildplan import stores
from buildplan.core import ConfigError
from buildplan.files import utc_now
from buildplan.stores import CHUNK, Transfer

FORMAT = "blipc-cache-1"  # the salt: bumping it disowns every entry written before
MODES = ("off", "read", "write")
CacheUnavailable = stores.StoreUnavailable  # the cache cannot be used at all

class CacheSettings(NamedTuple):
    url: str | None
    mode: str  # off | read | write
    required: bool  # an unavailable cache fails the build instead of a warning
    where: str  # what set them: "models.yaml" or the environment variable

    @property
    def reads(self) -> bool:
        return self.mode in ("read", "write") and bool(self.url)

    @property
    def writes(self) -> bool:
        return self.mode == "write" and bool(self.url)


def settings(configured: dict, config_file: str) -> CacheSettings:
    """models.yaml's `cache:` block, overridden by BLIPC_CACHE_URL / BLIPC_CACHE_MODE /
    BLIPC_CACHE_REQUIRED (CI sets them; credentials never come from either)."""
    from buildplan import env

    from_env = env.raw(env.CACHE_URL)
    url = from_env if from_env is not None else configured.get("url")
    if from_env and url:
        check_url(url, env.CACHE_URL, "environment")
    mode = env.raw(env.CACHE_MODE)
    where = env.CACHE_MODE if mode is not None else f"{config_file}: cache.mode"
    if mode is None:
        mode = configured.get("mode") or ("read" if url else "off")
    if mode not in MODES:
        raise ConfigError(where, "", f"unknown cache mode {mode!r}", f"allowed: {', '.join(MODES)}")
    required = env.flag(env.CACHE_REQUIRED) or bool(configured.get("required"))
    return CacheSettings(url or None, mode, required, where)


def check_url(url: str, field: str, file: str) -> None:
    stores.check_url(url, field, file, "cache")


# --- keys and entries -------------------------------------------------------------------------
def key(parts: dict) -> str:
    """The artifact's cache key: its fingerprint parts without anything machine-specific (the
    sources' paths; only their content hashes count)."""
    portable = {"format": FORMAT, "params": parts["params"], "code": parts["code"], "toolchain": parts["toolchain"],
                "inputs": parts["inputs"], "sources": sorted(str(v) for v in parts["sources"].values())}
    return hashlib.sha256(json.dumps(portable, sort_keys=True, default=str).encode()).hexdigest()


# Record fields that describe the artifact (kept in an entry) rather than this build of it.
LOCAL_FIELDS = ("fingerprint", "parts", "outputs", "roles", "duration_s", "finished_at", "host", "log",
                "from_cache", "peak_rss_mb", "tool_peak_rss_mb")


def entry_for(record: dict, cache_key: str) -> dict:
    outputs = {role: {"path": rel, **{k: record["outputs"][rel][k] for k in ("sha256", "size")}}
               for role, rel in record["roles"].items()}
    return {"format": FORMAT, "key": cache_key, "node": record["node"], "digest": record["digest"], "outputs": outputs,
            "result": {k: v for k, v in record.items() if k not in LOCAL_FIELDS},
            "figures_of_build": {k: record[k] for k in ("duration_s", "peak_rss_mb", "tool_peak_rss_mb") if k in record},
            "provenance": {"host": record.get("host") or socket.gethostname(), "user": _user(),
                           "built_at": record.get("finished_at"), "uploaded_at": utc_now()}}


def valid_entry(entry, node) -> bool:
    return (isinstance(entry, dict) and entry.get("format") == FORMAT and entry.get("node") == node.id
            and isinstance(entry.get("outputs"), dict) and set(entry["outputs"]) == set(node.outputs)
            and all(isinstance(m, dict) and isinstance(m.get("sha256"), str) and len(m["sha256"]) == 64
                    and isinstance(m.get("size"), int) for m in entry["outputs"].values())
            and isinstance(entry.get("digest"), str) and isinstance(entry.get("result"), dict))


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


# --- the cache's layout in a store -------------------------------------------------------------
class CacheStore:
    """The cache's two folders in a store (buildplan/stores.py): `ac/<key>.json` entries and
    `cas/<sha256>` files."""

    def __init__(self, store):
        self.store = store
        self.name = store.name

    def check(self, writing: bool) -> None:
        self.store.check(writing, ("ac", "cas"))

    def get_entry(self, cache_key: str) -> bytes | None:
        return self.store.get(f"ac/{cache_key}.json")

    def put_entry(self, cache_key: str, data: bytes) -> bool:
        """Create the entry if absent; False when another writer was first."""
        return self.store.put(f"ac/{cache_key}.json", data, create_only=True)

    def has_blob(self, sha: str, size: int) -> bool:
        return self.store.size(f"cas/{sha}") == size

    def put_blob(self, sha: str, path: Path) -> Transfer:
        return self.store.upload(f"cas/{sha}", path)  # same name, same content: a concurrent writer changes nothing

    def open_blob(self, sha: str):
        return self.store.open(f"cas/{sha}")

    def entries(self):
        for name, _ in self.store.list("ac"):
            if name.endswith(".json") and "/" not in name:
                yield name[:-len(".json")]

    def blobs(self):
        for name, size in self.store.list("cas"):
            if "/" not in name:
                yield name, size

    def delete(self, kind: str, name: str) -> None:
        self.store.delete(f"ac/{name}.json" if kind == "ac" else f"cas/{name}")


def open_store(url: str) -> CacheStore:
    return CacheStore(stores.open_store(url))


# --- the cache as the build uses it --------------------------------------------------------------
class Cache:
    """One per process. Unavailable at the first failure: one warning, then local builds only."""

    def __init__(self, cache_settings: CacheSettings):
        self.settings = cache_settings
        self.store = open_store(cache_settings.url) if cache_settings.reads else None
        self.problem: str | None = None
        self._checked = False

    @property
    def name(self) -> str:
        return self.settings.url or "(none)"

    def usable(self) -> bool:
        if self.store is None or self.problem:
            return False
        if not self._checked:
            self._checked = True
            try:
                self.store.check(self.settings.writes)
            except CacheUnavailable as e:
                self.unavailable(str(e))
                return False
        return True

    def unavailable(self, reason: str) -> None:
        """Give up on the cache for this process: one warning, or a failure if it is required."""
        if self.problem is None:
            self.problem = reason
            if self.settings.required:
                raise CacheUnavailable(f"cache {self.name} unavailable: {reason} (BLIPC_CACHE_REQUIRED is set)")
            print(f"warning: cache {self.name} unavailable: {reason}; building locally", file=sys.stderr)

    def lookup(self, node, cache_key: str) -> dict | None:
        if not self.usable():
            return None
        try:
            raw = self.store.get_entry(cache_key)
        except CacheUnavailable as e:
            self.unavailable(str(e))
            return None
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if not valid_entry(entry, node) or entry["key"] != cache_key:
            print(f"warning: cache {self.name}: entry {cache_key[:16]} for {node.id} is damaged: ignored",
                  file=sys.stderr)
            return None
        return entry

    def fetch(self, entry: dict, role: str, dest: Path) -> Transfer:
        """Download one output to dest, checking size and sha256 as it streams. Raises
        CacheMiss when the file is missing or not what the entry says."""
        meta = entry["outputs"][role]
        start = time.monotonic()
        try:
            body = self.store.open_blob(meta["sha256"])
            if body is None:
                raise CacheMiss(f"{meta['path']}: file {meta['sha256'][:16]} missing from the cache")
            h, size = hashlib.sha256(), 0
            dest.parent.mkdir(parents=True, exist_ok=True)
            with body, open(dest, "wb") as out:
                for chunk in iter(lambda: body.read(CHUNK), b""):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        except CacheUnavailable as e:
            self.unavailable(str(e))
            raise CacheMiss(f"the cache stopped answering: {e}") from None
        except OSError as e:
            if getattr(e, "errno", None) is None:  # a connection dropped mid-stream (urllib3 errors)
                self.unavailable(f"download failed: {e}")
                raise CacheMiss(f"download of {meta['path']} failed: {e}") from None
            raise
        except Exception as e:  # noqa: BLE001 - a dropped connection surfaces as many types
            if type(e).__module__.split(".")[0] in ("urllib3", "botocore", "http"):
                self.unavailable(f"download failed: {type(e).__name__}")
                raise CacheMiss(f"download of {meta['path']} failed: {type(e).__name__}") from None
            raise
        if size != meta["size"] or h.hexdigest() != meta["sha256"]:
            raise CacheMiss(f"{meta['path']}: corrupt in the cache ({size} bytes, sha256 {h.hexdigest()[:16]}; "
                            f"the entry says {meta['size']} bytes, {meta['sha256'][:16]})")
        return Transfer(size, time.monotonic() - start)

    def push(self, record: dict, root: Path, log=print) -> str:
        """Upload a committed, successful record's outputs, then its entry (created only if
        absent). Returns what happened, for the log."""
        if not self.usable():
            return "cache unavailable"
        cache_key = key(record["parts"])
        try:
            for rel, meta in record["outputs"].items():
                if self.store.has_blob(meta["sha256"], meta["size"]):
                    continue
                log(f"cache: uploading {rel}: {self.store.put_blob(meta['sha256'], root / rel)}")
            created = self.store.put_entry(cache_key, json.dumps(entry_for(record, cache_key), indent=1).encode())
        except CacheUnavailable as e:
            self.unavailable(str(e))
            return f"not uploaded: {e}"
        return f"uploaded as {cache_key[:16]}" if created else f"already in the cache as {cache_key[:16]} (another writer was first)"


class CacheMiss(Exception):
    """A hit that cannot be used: a file missing or corrupt, or the transfer failed."""


_CACHES: dict = {}


def for_config(config) -> Cache:
    """The process's cache for a config (models.yaml's `cache:` block and the environment)."""
    if config.path not in _CACHES:
        _CACHES[config.path] = Cache(settings(config.cache, config.path))
    return _CACHES[config.path]

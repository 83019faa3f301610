"""`doit cache status | push | pull | verify | gc`: the shared cache by hand (buildplan/cache.py)."""
from __future__ import annotations

import hashlib
import json

from buildplan import cache as cache_mod
from buildplan.session import store_for


def selected(plan, names: list[str]) -> list[str]:
    """Node ids for TASK arguments (nodes or groups), with everything upstream, dependencies first."""
    if not names:
        return plan.closure(list(plan.nodes))
    ids = []
    for name in names:
        if name in plan.nodes:
            ids.append(name)
        elif name in plan.groups:
            ids += plan.groups[name]
        else:
            raise SystemExit(f"error: no task or group {name!r} (see `doit list`)")
    return plan.closure(ids)


def _cache(plan) -> cache_mod.Cache:
    cache = cache_mod.for_config(plan.config)
    if not cache.settings.url:
        raise SystemExit("error: no cache configured: set `cache: {url: s3://bucket/prefix | /path}` in "
                         f"{plan.config.path} or BLIPC_CACHE_URL")
    if cache.store is None:  # mode off: commands by hand still reach it
        cache.store = cache_mod.open_store(cache.settings.url)
    return cache


def run(action: str, plan, names: list[str], fix: bool = False, dry_run: bool = False) -> int:
    commands = {"status": status, "push": push, "pull": pull, "verify": verify, "gc": gc}
    if action not in commands:
        raise SystemExit(f"error: unknown cache command {action!r}: use {', '.join(commands)}")
    cache = _cache(plan)
    try:
        cache.store.check(writing=action in ("push",))
    except cache_mod.CacheUnavailable as e:
        print(f"error: cache {cache.name} unavailable: {e}")
        return 2
    return commands[action](plan, cache, names, fix=fix, dry_run=dry_run)


def status(plan, cache, names, **_) -> int:
    from buildplan import report

    store = store_for(plan.config.path)
    entries = set(cache.store.entries())
    blobs = list(cache.store.blobs())
    print(f"cache {cache.name} (mode {cache.settings.mode}, set by {cache.settings.where}): "
          f"{len(entries)} entries, {len(blobs)} files, {sum(s for _, s in blobs) / 2**20:.1f} MiB")
    chosen = set(selected(plan, names))
    stale = {k: v for k, v in report.stale_nodes(plan).items() if k in chosen}
    cached = report.in_cache(plan, stale)
    counts = {"fresh here": 0, "of which in the cache": 0, "stale here, in the cache (a pull)": 0,
              "stale here, not in the cache (a build)": 0, "stale here, unknown until upstream is built": 0}
    for node_id in chosen:
        if node_id in stale:
            counts[{True: "stale here, in the cache (a pull)", False: "stale here, not in the cache (a build)",
                    None: "stale here, unknown until upstream is built"}[cached[node_id]]] += 1
        else:
            counts["fresh here"] += 1
            rec = store.read(node_id)
            counts["of which in the cache"] += bool(rec and cache_mod.key(rec["parts"]) in entries)
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 0


def push(plan, cache, names, **_) -> int:
    store = store_for(plan.config.path)
    pushed = skipped = 0
    for node_id in selected(plan, names):
        node = plan.nodes[node_id]
        rec = store.read(node_id)
        if rec is None or not store.is_fresh(node):
            continue
        if rec.get("standin") or (rec.get("toolchain") or {}).get("standin"):
            print(f"{node_id}: not pushed: built by a test stand-in")
            skipped += 1
            continue
        print(f"{node_id}: {cache.push(rec, store.root)}")
        pushed += 1
    print(f"cache push: {pushed} artifact(s) offered, {skipped} refused")
    return 0


def pull(plan, cache, names, **_) -> int:
    from buildplan.runner import run_task

    store = store_for(plan.config.path)
    pulled, missing = 0, []
    for node_id in selected(plan, names):
        if store.is_fresh(plan.nodes[node_id]):
            continue
        got = run_task(store, node_id, build=False)
        if got is None:
            pulled += 1
            print(f"{node_id}: pulled")
        else:
            missing.append(node_id)
            if got is not False:  # a TaskFailed
                print(f"{node_id}: {got.message if hasattr(got, 'message') else got}")
    print(f"cache pull: {pulled} pulled, {len(missing)} not in the cache (build them with doit)")
    return 0


def verify(plan, cache, names, fix: bool = False, **_) -> int:
    """Every stored file re-hashed; every entry's files present with their sizes."""
    sizes = dict(cache.store.blobs())
    corrupt = []
    for sha in sizes:
        body = cache.store.open_blob(sha)
        h = hashlib.sha256()
        with body:
            for chunk in iter(lambda body=body: body.read(cache_mod.CHUNK), b""):
                h.update(chunk)
        if h.hexdigest() != sha:
            corrupt.append(sha)
            print(f"corrupt file cas/{sha}: its content hashes to {h.hexdigest()[:16]}")
    broken = []
    for cache_key in cache.store.entries():
        raw = cache.store.get_entry(cache_key)
        try:
            entry = json.loads(raw) if raw else None
            outputs = entry["outputs"].values()
            bad = [m["path"] for m in outputs if sizes.get(m["sha256"]) != m["size"] or m["sha256"] in corrupt]
        except (ValueError, KeyError, TypeError, AttributeError):
            bad = ["(the entry itself is not readable)"]
        if bad:
            broken.append(cache_key)
            print(f"entry ac/{cache_key}.json: files missing or corrupt: {', '.join(bad)}")
    if fix:
        for sha in corrupt:
            cache.store.delete("cas", sha)
        for cache_key in broken:
            cache.store.delete("ac", cache_key)
    print(f"cache verify: {len(sizes)} files, {len(corrupt)} corrupt; {len(broken)} broken entries"
          + (" (deleted)" if fix and (corrupt or broken) else ""))
    return 1 if corrupt or broken else 0


def gc(plan, cache, names, dry_run: bool = False, **_) -> int:
    """Delete stored files that no entry refers to (e.g. left by an upload that died before its entry)."""
    used = set()
    for cache_key in cache.store.entries():
        raw = cache.store.get_entry(cache_key)
        try:
            used |= {m["sha256"] for m in json.loads(raw)["outputs"].values()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    orphans = [(sha, size) for sha, size in cache.store.blobs() if sha not in used]
    for sha, _ in orphans:
        if not dry_run:
            cache.store.delete("cas", sha)
    print(f"cache gc: {len(orphans)} orphaned file(s), {sum(s for _, s in orphans) / 2**20:.1f} MiB"
          + (" (dry run)" if dry_run else " deleted"))
    return 0

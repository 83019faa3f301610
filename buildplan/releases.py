"""Releases: what leaves the build, by name (`doit publish`, `doit fetch`, `doit releases`).

A release is an immutable, versioned copy of the declared deliverables (the members of the
`compile:<target>` groups: bmodels, combined and bundled bmodels, OMs, ORT models) that are built,
fresh and accepted, in a store the cache also uses (a directory or S3, buildplan/stores.py):

    <channel>/versions/<version>/<model>/<CHIP>/<file>    the files, as under artifacts/
    <channel>/versions/<version>/manifest.json            written after every file, create-only
    <channel>/latest.json                                 the channel's pointer, replaced last

A version exists for readers once its manifest does, and the manifest names only files already
uploaded and never changed after; the pointer is one atomic write. So a reader of `latest` gets
the old release or the new one whole, and a publish killed halfway leaves files that no manifest
or pointer names (`doit releases prune` removes them once they are INCOMPLETE_GRACE_S old).
Never published: a test stand-in's output, a failed, stale or damaged artifact (the manifest's
`not_included` says which and why).
"""
from __future__ import annotations

import calendar
import contextlib
import hashlib
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

from buildplan.config import CHANNEL_PATTERN, DEFAULT_CHANNEL
from buildplan.core import BuildError, ConfigError
from buildplan.files import utc_now
from buildplan.stores import CHUNK, StoreUnavailable, open_store

FORMAT = "blipc-release-1"
VERSION_PATTERN = r"\d{8}T\d{6}Z-[0-9a-f]{4}"  # UTC start time (sorts as time does), then 4 random hex digits
INCOMPLETE_GRACE_S = 6 * 3600  # an unfinished version younger than this may still be uploading
MANIFEST = "manifest.json"
FETCHED = "release.json"  # what `doit fetch` writes beside the files it fetched


class ReleaseError(BuildError):
    """A publish or fetch that cannot be done as asked (nothing to publish, no such version...)."""


def versions_dir(channel: str) -> str:
    return f"{channel}/versions"


def version_dir(channel: str, version: str) -> str:
    return f"{versions_dir(channel)}/{version}"


def pointer(channel: str) -> str:
    return f"{channel}/latest.json"


STAMP = "YYYYMMDDTHHMMSSZ"  # a version's time part, as new_version writes it


def new_version(now: float | None = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(2)


def version_time(version: str) -> float | None:
    with contextlib.suppress(ValueError):
        return float(calendar.timegm(time.strptime(version[:len(STAMP)], "%Y%m%dT%H%M%SZ")))
    return None


# --- settings --------------------------------------------------------------------------------
def settings(configured: dict, url: str | None = None, channel: str | None = None, keep: int | None = None) -> dict:
    """Where releases go: command-line values over BLIPC_RELEASES_URL over models.yaml's
    `releases:` block."""
    from buildplan import env

    url = url or env.get(env.RELEASES_URL) or configured.get("url")
    if not url:
        raise ReleaseError("no release store: set `releases: {url: s3://bucket/prefix | /path}` in models.yaml, "
                           f"{env.RELEASES_URL}, or pass --to / --from")
    channel = channel or configured.get("channel") or DEFAULT_CHANNEL
    if not re.fullmatch(CHANNEL_PATTERN, channel):
        raise ReleaseError(f"channel {channel!r}: use lower-case letters, digits, '_' or '-' (at most 64)")
    return {"url": url, "channel": channel, "keep": keep if keep is not None else configured.get("keep")}


# --- what a release holds --------------------------------------------------------------------
def deliverables(plan, targets: list[str] | None = None) -> list:
    """The declared deliverables: every member of a `compile:<target>` group (what the backends
    put there), for the named targets or all."""
    names = [g.split(":", 1)[1] for g in plan.groups if g.startswith("compile:")]
    unknown = sorted(set(targets or ()) - set(names))
    if unknown:
        raise ReleaseError(f"no target {', '.join(unknown)} in {plan.config.path} (targets: {', '.join(sorted(names))})")
    chosen = [n for n in names if not targets or n in targets]
    return [plan.nodes[i] for n in chosen for i in plan.groups[f"compile:{n}"]]


def contents(plan, store, targets: list[str] | None = None) -> tuple[list, list[dict]]:
    """(node, record) of each deliverable a release may hold, and why each other one is left out."""
    included, left_out = [], []
    for node in deliverables(plan, targets):
        rec, why = store.record(node.id), None
        if rec is None:
            failure = store.read_failure(node.id)
            why = f"failed: {failure['error'].splitlines()[0]}" if failure else "not built"
        elif rec.is_standin:
            why = "made by a test stand-in, not a real compile"
        elif not store.is_fresh(node):
            why = "out of date (run doit first)"
        else:
            damaged = store.verify(node)
            why = f"damaged: {damaged[0]} (doit verify --fix, then rebuild)" if damaged else None
        if why:
            left_out.append({"node": node.id, "labels": node.labels, "why": why})
        else:
            included.append((node, rec))
    return included, left_out


def toolchains(plan, store, nodes) -> dict:
    """name -> identity of every toolchain that made the nodes or anything upstream of them."""
    found = {}
    for node_id in plan.closure([n.id for n in nodes]):
        rec = store.record(node_id)
        identity = rec.parts.get("toolchain") if rec else None
        if isinstance(identity, dict) and identity.get("name"):
            found[identity["name"]] = identity
    return dict(sorted(found.items()))


def manifest_for(plan, store, channel: str, version: str, included: list, left_out: list[dict]) -> dict:
    artifacts = []
    for node, rec in included:
        for rel, meta in rec.outputs.items():
            artifacts.append({
                "path": rel, "sha256": meta["sha256"], "size": meta["size"], "node": node.id, "stage": node.stage,
                "model": node.model, **{k: node.labels[k] for k in ("target", "graph", "precision", "batch") if k in node.labels},
                "fingerprint": rec.fingerprint, "toolchain": rec.parts.get("toolchain"), "built_at": rec.finished_at,
                # False: built with its numerical check turned off (simulate: false), so no figure accepted it
                "validated": rec.result.acceptance_figure() is not None,
                "acceptance": rec.result.acceptance, "figures": rec.result.figures, "details": rec.result.extra})
    return {"format": FORMAT, "channel": channel, "version": version, "published_at": utc_now(),
            "config": Path(plan.config.path).name, "toolchains": toolchains(plan, store, [n for n, _ in included]),
            "artifacts": artifacts, "not_included": left_out}


# --- publish ---------------------------------------------------------------------------------
def publish(plan, state, where: dict, targets: list[str] | None = None, dry_run: bool = False, log=print) -> dict:
    """Upload a new version of `where["channel"]`, then move its pointer; with where["keep"], prune
    the channel after. Returns what was published (for the nightly report)."""
    included, left_out = contents(plan, state, targets)
    channel = where["channel"]
    for item in left_out:
        log(f"not published: {item['node']}: {item['why']}")
    if not included:
        raise ReleaseError(f"nothing to publish: none of the {len(left_out)} declared deliverable(s) is built, fresh "
                           "and accepted (run doit first)")
    store = open_store(where["url"])
    # Names sort by their second; a publish right after another waits for the next one, so that
    # the listing's order and `latest` follow the order of publishing.
    latest_stamp = str((read_json(store, pointer(channel)) or {}).get("version", ""))[:len(STAMP)]
    version, waited_from = new_version(), time.time()
    while version[:len(STAMP)] <= latest_stamp and time.time() - waited_from < 2:
        time.sleep(0.1)
        version = new_version()
    files = [(rel, meta) for _, rec in included for rel, meta in rec.outputs.items()]
    total = sum(meta["size"] for _, meta in files)
    if dry_run:
        for rel, meta in files:
            log(f"would publish {rel} ({meta['size'] / 2**20:.1f} MiB)")
        log(f"publish (dry run): {len(files)} file(s), {total / 2**20:.1f} MiB to {store.link(version_dir(channel, version))}")
        if where.get("keep"):
            prune(store, channel, where["keep"], dry_run=True, log=log)
        return {"channel": channel, "version": None, "files": len(files), "bytes": total}
    store.check(writing=True)
    start = time.monotonic()
    top = version_dir(channel, version)
    for rel, meta in files:
        store.upload(f"{top}/{rel}", Path(plan.root) / rel)
        if store.size(f"{top}/{rel}") != meta["size"]:
            raise ReleaseError(f"{rel}: the store holds a different size after the upload; version {version} left "
                               "unfinished (invisible to readers)")
    doc = manifest_for(plan, state, channel, version, included, left_out)
    body = json.dumps(doc, indent=1).encode()
    if not store.put(f"{top}/{MANIFEST}", body, create_only=True):
        raise ReleaseError(f"version {version} of {channel} already has a manifest (another publisher): not replaced")
    moved = _move_pointer(store, channel, version, hashlib.sha256(body).hexdigest())
    seconds = time.monotonic() - start
    log(f"published {channel}/{version}: {len(files)} file(s), {total / 2**20:.1f} MiB in {seconds:.1f} s to "
        f"{store.link(top)}" + ("" if moved else f" ({channel}'s latest left on a newer version)"))
    if where.get("keep"):
        prune(store, channel, where["keep"], dry_run=False, log=log)
    return {"channel": channel, "version": version, "link": store.link(f"{top}/{MANIFEST}"), "files": len(files),
            "bytes": total, "seconds": round(seconds, 3), "left_out": len(left_out)}


def _move_pointer(store, channel: str, version: str, manifest_sha256: str) -> bool:
    """Point the channel at `version`, unless a concurrent publisher already moved it to a later
    second. Within one second the random suffixes say nothing of order: the publish that ends
    later moves it."""
    current = read_json(store, pointer(channel))
    if current and str(current.get("version", ""))[:len(STAMP)] > version[:len(STAMP)]:
        return False
    store.put(pointer(channel), json.dumps({"format": FORMAT, "channel": channel, "version": version,
                                            "manifest_sha256": manifest_sha256, "moved_at": utc_now()}).encode())
    return True


def read_json(store, name: str) -> dict | None:
    raw = store.get(name)
    try:
        doc = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# --- what a store holds ----------------------------------------------------------------------
def versions(store, channel: str) -> list[dict]:
    """Every version folder of a channel, oldest first: name, complete (has its manifest), files, bytes."""
    found: dict[str, dict] = {}
    for name, size in store.list(versions_dir(channel)):
        version, _, rest = name.partition("/")
        v = found.setdefault(version, {"version": version, "complete": False, "files": 0, "bytes": 0})
        v["complete"] |= rest == MANIFEST
        v["files"] += 1
        v["bytes"] += size
    return [found[k] for k in sorted(found)]


def channels(store) -> list[str]:
    return sorted({name.split("/", 1)[0] for name, _ in store.list("") if name.endswith("/latest.json")
                   and name.count("/") == 1})


def retention(found: list[dict], keep: int, latest: str | None, now: float) -> list[dict]:
    """The versions to delete to keep the newest `keep` complete ones (and always the one the
    pointer names): older complete versions, and unfinished ones older than INCOMPLETE_GRACE_S."""
    complete = [v for v in found if v["complete"]]
    kept = {v["version"] for v in complete[-keep:]} | ({latest} if latest else set())
    doomed = []
    for v in found:
        if v["version"] in kept:
            continue
        if v["complete"]:
            doomed.append(v)
        else:
            started = version_time(v["version"])
            if started is None or now - started > INCOMPLETE_GRACE_S:
                doomed.append(v)
    return doomed


def prune(store, channel: str, keep: int, dry_run: bool, log=print) -> list[dict]:
    latest = (read_json(store, pointer(channel)) or {}).get("version")
    doomed = retention(versions(store, channel), keep, latest, time.time())
    for v in doomed:
        what = f"{channel}/{v['version']} ({v['files']} file(s), {v['bytes'] / 2**20:.1f} MiB" + \
            ("" if v["complete"] else ", an unfinished upload") + ")"
        log(f"{'would delete' if dry_run else 'deleting'} {what}")
        if not dry_run:
            top = version_dir(channel, v["version"])
            store.delete(f"{top}/{MANIFEST}", up_to=versions_dir(channel))  # invisible first, then the files
            for name, _ in list(store.list(top)):
                store.delete(f"{top}/{name}", up_to=versions_dir(channel))
    log(f"retention on {channel}: keep {keep}, {len(doomed)} version(s) " + ("to delete (dry run)" if dry_run else "deleted"))
    return doomed


# --- fetch -----------------------------------------------------------------------------------
def resolve(store, ref: str) -> tuple[str, str, str | None]:
    """(channel, version, the manifest's sha256 when the pointer gave it) for `channel` (its
    latest) or `channel/version`."""
    channel, _, version = ref.partition("/")
    if not re.fullmatch(CHANNEL_PATTERN, channel) or (version and not re.fullmatch(VERSION_PATTERN, version)):
        raise ReleaseError(f"{ref!r} is not a release name: give a channel (its latest) or <channel>/<version>, "
                           f"e.g. nightly or nightly/{new_version()}")
    if version:
        return channel, version, None
    latest = read_json(store, pointer(channel))
    if not latest or not isinstance(latest.get("version"), str):
        known = channels(store)
        raise ReleaseError(f"no channel {channel!r} in {store.name}" +
                           (f" (channels: {', '.join(known)})" if known else " (it holds no release yet)"))
    return channel, latest["version"], latest.get("manifest_sha256")


def fetch(url: str, ref: str, dest: Path, target: str | None = None, log=print) -> dict:
    """Download a release (or one target's files of it) into dest, each file checked against the
    manifest's size and sha256 before it takes its name; a partial download resumes."""
    store = open_store(url)
    store.check(writing=False)
    channel, version, expected = resolve(store, ref)
    raw = store.get(f"{version_dir(channel, version)}/{MANIFEST}")
    if raw is None:
        known = [v["version"] for v in versions(store, channel) if v["complete"]][-5:]
        raise ReleaseError(f"no version {version} in channel {channel} of {store.name}" +
                           (f" (latest versions: {', '.join(known)})" if known else ""))
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise ReleaseError(f"{channel}/{version}: its manifest is not the one the pointer names (damaged in the store)")
    doc = json.loads(raw)
    chosen = [a for a in doc["artifacts"] if target is None or a.get("target") == target]
    if not chosen:
        targets = sorted({a.get("target") for a in doc["artifacts"] if a.get("target")})
        missing = [m for m in doc.get("not_included", []) if m.get("labels", {}).get("target") == target]
        raise ReleaseError(f"{channel}/{version} has no file for target {target!r} (it has: {', '.join(targets)})" +
                           (f"; left out of it: {missing[0]['node']}: {missing[0]['why']}" if missing else ""))
    start, moved = time.monotonic(), 0
    dest.mkdir(parents=True, exist_ok=True)
    for art in chosen:
        moved += _download(store, f"{version_dir(channel, version)}/{art['path']}", dest / art["path"], art, log)
    written = {**doc, "fetched": [a["path"] for a in chosen], "fetched_at": utc_now(), "from": store.link(version_dir(channel, version))}
    tmp = dest / f".{FETCHED}.tmp"
    tmp.write_text(json.dumps(written, indent=1))
    os.replace(tmp, dest / FETCHED)
    seconds = time.monotonic() - start
    log(f"fetched {channel}/{version}: {len(chosen)} file(s), {moved / 2**20:.1f} MiB downloaded in {seconds:.1f} s into {dest}")
    return {"channel": channel, "version": version, "files": [a["path"] for a in chosen], "bytes": moved,
            "seconds": round(seconds, 3)}


def _hash_file(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h


def _download(store, name: str, final: Path, art: dict, log) -> int:
    """One file into place, verified; resumes a `.part` left by an interrupted fetch. Bytes moved."""
    if final.is_file() and final.stat().st_size == art["size"] and _hash_file(final).hexdigest() == art["sha256"]:
        log(f"{art['path']}: already here")
        return 0
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    moved, whole = _fill(store, name, part, art, offset if offset <= art["size"] else 0, log)
    if not whole and offset:  # the bytes kept from before may be the bad ones: once more from the start
        again, whole = _fill(store, name, part, art, 0, log)
        moved += again
    if not whole:
        part.unlink(missing_ok=True)
        raise ReleaseError(f"{art['path']}: the copy in {store.name} is not the published file (its sha256 or size "
                           "differs from the manifest's): not kept. The release is damaged; publish a new one")
    os.replace(part, final)
    return moved


def _fill(store, name: str, part: Path, art: dict, offset: int, log) -> tuple[int, bool]:
    """Download `name` into `part` from byte `offset` (the part's bytes before it kept): (bytes
    moved, whether the part is now the published file)."""
    h = _hash_file(part) if offset else hashlib.sha256()
    moved = 0
    if offset < art["size"]:
        body = store.open(name, offset=offset)
        if body is None:
            raise ReleaseError(f"{art['path']}: missing from the release in {store.name} (deleted while fetching?)")
        if offset:
            log(f"{art['path']}: resuming after {offset / 2**20:.1f} MiB")
        with body, open(part, "ab" if offset else "wb") as out:
            for chunk in iter(lambda: body.read(CHUNK), b""):
                h.update(chunk)
                out.write(chunk)
                moved += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    return moved, offset + moved == art["size"] and h.hexdigest() == art["sha256"]


def catch(fn):
    """Run a release command: its own errors and an unreachable store as one line, exit status 1."""
    try:
        return fn()
    except (ReleaseError, ConfigError, StoreUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

"""Build state: fingerprints, per-artifact records, freshness with reasons, the manifest.

An artifact is fresh only if its record exists, its outputs are on disk as recorded, and
the fingerprint of (params, code, toolchain, upstream contents, source files) still matches.
Records are committed one by one, atomically, the moment an artifact finishes.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path

from buildplan import backends, files
from buildplan.core import Node
from buildplan.files import LOGS_DIR, MANIFEST, atomic_write, read_json, read_memo, safe_name, sha256_file, stat_key, tree_paths, write_memo
from buildplan.plan import Plan
from buildplan.records import Record, valid_record


@functools.cache
def code_hash(rel: str) -> str:
    return sha256_file(files.REPO / rel)[:16]


_THIS_FILE = stat_key(__file__)


def flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Store:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.root = Path(plan.root)
        self.state_dir = self.root / ".state"
        self.log_dir = self.root / LOGS_DIR
        self._hashcache: dict | None = None
        self._records: dict[str, tuple] = {}
        self._state_str = str(self.state_dir)
        self._verdicts: dict[str, str] | None = None  # node id -> key under which it was found fresh
        self._verdicts_dirty = False
        self._code_stats: dict[str, tuple | None] = {}
        self._toolchain_reprs: dict[str | None, str] = {}
        self._unreadable: set[str] = set()  # node ids whose record exists but cannot be trusted

    # --- records ----------------------------------------------------------------------
    def record_path(self, node_id: str) -> Path:
        return Path(self._record_file(node_id))

    def _record_file(self, node_id: str) -> str:  # str, not Path: this runs for every check
        return f"{self._state_str}/{safe_name(node_id)}.json"

    def log_path(self, node_id: str) -> Path:
        return self.log_dir / f"{safe_name(node_id)}.log"

    def read(self, node_id: str) -> dict | None:
        """The committed record, or None. Parsed records are reused while the file's stat key is
        unchanged: a full check reads each upstream record once, not once per consumer. Commits
        replace the file (new inode), so a record written by another process is seen."""
        path = self._record_file(node_id)
        key = stat_key(path)
        if key is None:
            return None
        hit = self._records.get(node_id)
        if hit and hit[0] == key:
            return hit[1]
        rec = read_json(path)
        if not valid_record(rec, node_id):
            self._unreadable.add(node_id)  # damaged or foreign: no record, and the check says why
            return None
        self._unreadable.discard(node_id)
        self._records[node_id] = (key, rec)
        return rec

    def record(self, node_id: str) -> Record | None:
        """The committed record, typed; None when there is none or it is unreadable."""
        return Record.from_json(self.read(node_id), node_id)

    def drop(self, node_id: str):
        with contextlib.suppress(FileNotFoundError):
            self.record_path(node_id).unlink()

    def commit(self, record: dict):
        atomic_write(self.record_path(record["node"]), json.dumps(record, indent=1, sort_keys=True))
        self.write_manifest()

    def failure_path(self, node_id: str) -> Path:
        return self.state_dir / "failed" / f"{safe_name(node_id)}.json"

    def mark_failure(self, node_id: str, error: str, log: str, at: str, finding: dict | None = None):
        marker = {"node": node_id, "error": error, "log": log, "at": at, **({"finding": finding} if finding else {})}
        atomic_write(self.failure_path(node_id), json.dumps(marker, default=str))

    def clear_failure(self, node_id: str):
        with contextlib.suppress(FileNotFoundError):
            self.failure_path(node_id).unlink()

    def read_failure(self, node_id: str) -> dict | None:
        marker = read_json(self.failure_path(node_id))
        return marker if marker and isinstance(marker.get("error"), str) else None

    # --- fingerprints -----------------------------------------------------------------
    def source_hash(self, path: str) -> str:
        """sha256 of an external file, cached by (size, mtime, inode): no re-hash of GBs on no-op.
        A folder (a transformers checkpoint) hashes as the list of its files and their hashes."""
        if os.path.isdir(path):
            listing = [(os.path.relpath(f, path), self.source_hash(f)) for f in tree_paths(path)[1:]]
            return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        cache = self._load_hashcache()
        hit = cache.get(path)
        if isinstance(hit, list) and hit[:3] == key and len(hit) == 4 and isinstance(hit[3], str):
            return hit[3]
        digest = sha256_file(path)
        cache[path] = key + [digest]
        self._write_memo("hashcache.json", cache)
        return digest

    def _write_memo(self, name: str, value):
        """A memo under .state/, only where artifacts/ already exists: a read-only command on a
        config never built creates nothing."""
        if self.root.is_dir():
            write_memo(self.state_dir / name, value)

    def _load_hashcache(self) -> dict:
        if self._hashcache is None:
            self._hashcache = read_memo(self.state_dir / "hashcache.json") or {}
        return self._hashcache

    def parts(self, node: Node) -> dict:
        tc = backends.toolchain(node.toolchain, self.plan.config) if node.toolchain else None
        inputs = {}
        for dep in node.deps:
            rec = self.read(dep)
            inputs[dep] = rec["digest"] if rec else None
        sources = {}
        for src in node.sources:
            sources[src] = self.source_hash(src) if os.path.exists(src) else None
        return {
            "params": node.params,
            "code": {rel: code_hash(rel) for rel in node.code},
            "toolchain": {"name": tc.name, **tc.identity} if tc and tc.available else ({"name": node.toolchain, "missing": True} if tc else None),
            "inputs": inputs,
            "sources": sources,
        }

    @staticmethod
    def fingerprint(parts: dict) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    # --- freshness --------------------------------------------------------------------
    def check(self, node: Node) -> list[dict]:
        """Reasons the artifact is not fresh; an empty list means fresh."""
        key = self._verdict_key(node)
        if key is not None and self._load_verdicts().get(node.id) == key:
            return []
        reasons = self._check(node)
        if not reasons and key is not None:
            self._remember_fresh(node.id, key)
        return reasons

    def _check(self, node: Node) -> list[dict]:
        rec = self.read(node.id)
        reasons = []
        for rel in node.paths:
            p = f"{self.plan.root}/{rel}"
            try:
                st = os.stat(p)
            except FileNotFoundError:
                reasons.append({"kind": "output_missing", "text": f"output missing: {rel}"})
                continue
            if rec:
                want = rec["outputs"].get(rel)
                if not want:
                    reasons.append({"kind": "output_modified", "text": f"output not in the record: {rel}"})
                elif (st.st_size, st.st_mtime_ns) != (want["size"], want["mtime_ns"]) and (
                        st.st_size != want["size"] or sha256_file(p) != want["sha256"]):
                    reasons.append({"kind": "output_modified", "text": f"output modified on disk: {rel}"})
        if node.toolchain:
            tc = backends.toolchain(node.toolchain, self.plan.config)
            if not tc.available:
                reasons.append({"kind": "toolchain_missing", "text": f"toolchain {node.toolchain} is not available"})
        if rec is None:
            if node.id in self._unreadable:
                reasons.insert(0, {"kind": "record_unreadable",
                                   "text": "record unreadable (damaged or not a build record): rebuilt"})
            elif not reasons:
                reasons.append({"kind": "never_built", "text": "no build record (never built, failed or interrupted)"})
            elif all(r["kind"] in ("output_missing", "toolchain_missing") for r in reasons):
                # never built: its outputs are missing by definition, one reason says it
                reasons = [{"kind": "never_built", "text": "not built yet"},
                           *(r for r in reasons if r["kind"] == "toolchain_missing")]
            return reasons
        now = self.parts(node)
        if self.fingerprint(now) != rec["fingerprint"]:
            kinds = {r["kind"] for r in reasons}
            reasons.extend(r for r in explain(rec["parts"], now) if r["kind"] not in kinds)
        return reasons

    def verify(self, node: Node) -> list[str]:
        """Re-hash every recorded output (what a freshness check skips while size and mtime match):
        the problems found, [] when the outputs are exactly as recorded or nothing is recorded."""
        rec = self.read(node.id)
        if rec is None:
            if os.path.exists(self._record_file(node.id)):
                return [f"record {os.path.basename(self._record_file(node.id))} is unreadable (damaged); "
                        "the next build rebuilds it"]
            return []  # never built
        problems = []
        for rel, meta in rec["outputs"].items():
            path = self.root / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                problems.append(f"{rel}: missing")
                continue
            if st.st_size != meta["size"]:
                problems.append(f"{rel}: {st.st_size} bytes, recorded {meta['size']}")
            elif sha256_file(path) != meta["sha256"]:
                how = "size and mtime unchanged" if st.st_mtime_ns == meta["mtime_ns"] else "same size, modified since"
                problems.append(f"{rel}: content differs from the record (sha256), {how}")
        return problems

    def is_fresh(self, node: Node) -> bool:
        return not self.check(node)

    def fresh_closure(self) -> set[str]:
        """Nodes fresh together with everything upstream of them. A node's own check compares its
        inputs with the upstream *records*, which a stale upstream still has until it is rebuilt;
        only this set may be taken as up to date without asking again after upstream work."""
        fresh: dict[str, bool] = {}

        def visit(node_id: str) -> bool:
            if node_id not in fresh:
                node = self.plan.nodes[node_id]
                fresh[node_id] = all(visit(d) for d in node.deps) and self.is_fresh(node)
            return fresh[node_id]
        return {node_id for node_id in self.plan.nodes if visit(node_id)}

    # --- verdict memo -----------------------------------------------------------------
    # A node found fresh stays fresh while nothing _check reads has changed: its declaration,
    # its toolchain, its build code and its input_files, compared by inode, size, mtime and ctime
    # (any write or replace changes ctime). A no-op run then stats files instead of parsing every
    # record and recomputing every fingerprint. Keys are self-validating, so a lost, old or
    # concurrently written memo costs only a recheck.
    VERDICTS = "verdicts.json"

    def input_files(self, node: Node) -> list[str]:
        """The files a node's freshness is read from, its own record first (build code aside):
        upstream records, outputs, and each source, a folder with every file in it."""
        return [self._record_file(node.id), *map(self._record_file, node.deps),
                *(f"{self.plan.root}/{rel}" for rel in node.paths),
                *(p for src in node.sources for p in tree_paths(src))]

    def _verdict_key(self, node: Node) -> str | None:
        paths = self.input_files(node)
        record = stat_key(paths[0])
        if record is None:
            return None  # never built: nothing to remember
        stats = [record, *map(stat_key, paths[1:])]
        for rel in node.code:
            if rel not in self._code_stats:
                self._code_stats[rel] = stat_key(files.REPO / rel)
            stats.append(self._code_stats[rel])
        if node.toolchain not in self._toolchain_reprs:
            self._toolchain_reprs[node.toolchain] = repr(backends.toolchain(node.toolchain, self.plan.config)
                                                         if node.toolchain else None)
        # This file goes in too: it defines what fresh means. repr, not canonical JSON: a
        # spurious mismatch only costs a full check.
        return hashlib.sha1(repr((self.plan.root, _THIS_FILE, node, self._toolchain_reprs[node.toolchain],
                                  stats)).encode()).hexdigest()

    def _load_verdicts(self) -> dict:
        if self._verdicts is None:
            self._verdicts = read_memo(self.state_dir / self.VERDICTS) or {}
        return self._verdicts

    def _remember_fresh(self, node_id: str, key: str):
        verdicts = self._load_verdicts()
        if verdicts.get(node_id) == key:
            return
        verdicts[node_id] = key
        if not self._verdicts_dirty:
            self._verdicts_dirty = True
            atexit.register(self.save_verdicts)  # once per process, not once per node

    def save_verdicts(self):
        if not self._verdicts_dirty:
            return
        keep = {k: v for k, v in self._verdicts.items() if k in self.plan.nodes}
        with contextlib.suppress(OSError):  # a read-only artifacts tree: no memo, still correct
            self._write_memo(self.VERDICTS, keep)
        self._verdicts_dirty = False

    # --- manifest ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _manifest_lock(self):
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".manifest.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def write_manifest(self):
        """artifacts/manifest.json always lists exactly the committed records whose outputs exist."""
        with self._manifest_lock():
            atomic_write(self.root / MANIFEST, json.dumps(self.expected_manifest(), indent=1))

    def manifest_problem(self) -> str | None:
        """Why artifacts/manifest.json is not what consumers should read (missing, damaged, or not
        listing exactly what is built), or None. Any build repairs it; so does `doit verify --fix`."""
        expected = self.expected_manifest()
        path = self.root / MANIFEST
        if not path.exists():
            return f"{path} is missing" if expected["artifacts"] else None
        found = read_json(path)
        if found is None:
            return f"{path} is damaged (not a JSON object)"
        if found != expected:
            return f"{path} does not list exactly the built artifacts"
        return None

    def committed_records(self):
        """(file, record) of every record file under .state/ that has a record's shape, declared
        or not (a record dropped by a task that just started, or damaged, is skipped)."""
        for p in sorted(self.state_dir.glob("*.json")):
            rec = read_json(p)
            if valid_record(rec, rec.get("node") if rec else None):
                yield p, rec

    def expected_manifest(self) -> dict:
        """What manifest.json should say: every valid, declared record whose outputs exist."""
        entries = []
        for p, rec in self.committed_records():
            if rec["node"] not in self.plan.nodes:
                continue  # no longer declared
            for rel, meta in rec["outputs"].items():
                if (self.root / rel).exists():
                    entries.append({"path": rel, **meta, "node": rec["node"], "stage": rec["stage"],
                                    "model": rec["model"], "labels": rec.get("labels", {}),
                                    "fingerprint": rec["fingerprint"], "record": str(p.relative_to(self.root))})
        return {"artifacts": entries}


def undeclared(store: "Store") -> dict[str, list[str]]:
    """Records (and their outputs) of artifacts the config no longer declares: node id -> output paths
    that no declared artifact also writes."""
    declared_outputs = {rel for node in store.plan.nodes.values() for rel in node.paths}
    found = {}
    for p, rec in store.committed_records():
        if rec["node"] not in store.plan.nodes and p.name == f"{safe_name(rec['node'])}.json":
            found[rec["node"]] = [rel for rel in rec["outputs"] if rel not in declared_outputs]
    return found


def explain(old: dict, new: dict) -> list[dict]:
    """Turn a fingerprint difference into sentences a user can act on."""
    new = json.loads(json.dumps(new, default=str))  # as recorded: tuples become lists
    out = []
    old_params, new_params = flatten(old.get("params")), flatten(new.get("params"))
    for key in sorted(set(old_params) | set(new_params)):
        a, b = old_params.get(key, "<unset>"), new_params.get(key, "<unset>")
        if a != b:
            out.append({"kind": "param", "text": f"parameter {key} changed from {a!r} to {b!r}"})
    changed = [f for f in sorted(set(old.get("code", {})) | set(new.get("code", {})))
               if old.get("code", {}).get(f) != new.get("code", {}).get(f)]
    if changed:
        out.append({"kind": "code", "text": f"build code changed: {', '.join(changed)}"})
    ot, nt = old.get("toolchain") or {}, new.get("toolchain") or {}
    if ot != nt:
        if nt.get("missing"):
            out.append({"kind": "toolchain_missing", "text": f"toolchain {nt['name']} is not available"})
        else:
            out.append({"kind": "toolchain", "text": f"toolchain {nt.get('name')} changed from {_tc(ot)} to {_tc(nt)}"})
    for src in sorted(set(old.get("sources", {})) | set(new.get("sources", {}))):
        if old.get("sources", {}).get(src) != new.get("sources", {}).get(src):
            out.append({"kind": "checkpoint", "text": f"checkpoint changed: {src}"})
    for dep in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {}))):
        a, b = old.get("inputs", {}).get(dep), new.get("inputs", {}).get(dep)
        if a != b:
            text = f"upstream {dep} not built" if b is None else f"upstream {dep} was rebuilt with different content"
            out.append({"kind": "upstream", "text": text})
    return out or [{"kind": "fingerprint", "text": "fingerprint changed"}]


def _tc(identity: dict) -> str:
    if not identity or identity.get("missing"):
        return "missing"
    if identity.get("name") == "python":
        return ", ".join(f"{k} {v}" for k, v in identity.get("libs", {}).items())
    return f"{identity.get('version')} (build {identity.get('build')})"

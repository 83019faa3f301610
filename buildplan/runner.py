"""Execute one plan node: stage into a scratch dir, rename outputs into place, commit the record.

The record is dropped before work starts and committed only after every output is in place
and every gate passed, so a failure or a kill at any moment leaves nothing that looks fresh.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from buildplan import backends, env
from buildplan.core import BuildError, Node, StageError
from buildplan.files import SymlinkRefused, refuse_symlinks, safe_name, sha256_file, utc_now
from buildplan.plan import Plan
from buildplan.records import RECORD_FIELDS, Record, StageResult
from buildplan.state import Store

_MEASURE_RSS = Path(__file__).with_name("measure_rss.py")


def staging_dir(root: Path, node_id: str) -> Path:
    """This process's scratch folder for a task (the pid tells a later build whether it is dead)."""
    return root / ".staging" / f"{safe_name(node_id)}.{os.getpid()}"


class Context:
    def __init__(self, plan: Plan, store: Store, node: Node):
        self.plan, self.store, self.node = plan, store, node
        self.root = Path(plan.root)
        self.staging = staging_dir(self.root, node.id)
        self.log_path = store.log_path(node.id)
        self.tool_peak_rss = 0  # bytes: the largest process any toolchain command of this node ran

    def path(self, rel: str) -> Path:
        return self.root / rel

    def tmp(self, role: str) -> Path:
        """Where the stage writes its output `role`; the runner renames it into place on success."""
        p = self.staging / "out" / self.node.outputs[role]
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def workdir(self, name: str = "work") -> Path:
        p = self.staging / name
        p.mkdir(parents=True, exist_ok=True)
        return p

    def input(self, role: str) -> Path:
        """The output `role` of the one dependency that has it."""
        found = [self.plan.nodes[d].outputs[role] for d in self.node.deps if role in self.plan.nodes[d].outputs]
        if len(found) != 1:
            raise StageError(f"{self.node.id}: {len(found)} dependencies have an output {role!r}, "
                             f"the stage needs exactly one (deps: {', '.join(self.node.deps)})")
        return self.root / found[0]

    def toolchain(self):
        return backends.toolchain(self.node.toolchain, self.plan.config)

    def log(self, text: str):
        with open(self.log_path, "a") as f:
            f.write(text.rstrip("\n") + "\n")

    def run(self, argv: list[str], cwd: Path, env_extra: dict | None = None, what: str | None = None) -> str:
        """Run a toolchain command (argument list, no shell); its output goes to the task log."""
        tool_env = dict(os.environ)
        tc = self.toolchain()
        if tc.bin_dir:
            tool_env["PATH"] = tc.bin_dir + os.pathsep + tool_env.get("PATH", "")
        tool_env.update(env_extra or {})
        self.log(f"$ (cd {cwd} && {' '.join(argv)})")
        start = len(self.log_path.read_bytes()) if self.log_path.exists() else 0
        rss_file = self.staging / f".peak_rss.{time.monotonic_ns()}"
        rss_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            proc = subprocess.Popen([sys.executable, str(_MEASURE_RSS), str(rss_file), *argv], cwd=cwd, env=tool_env,
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                proc.wait()
            except BaseException:
                proc.terminate()  # the launcher passes it on to the tool
                proc.wait()
                raise
        with contextlib.suppress(FileNotFoundError, ValueError):
            self.tool_peak_rss = max(self.tool_peak_rss, int(rss_file.read_text()))
        with open(self.log_path, "rb") as f:
            f.seek(start)
            output = f.read().decode(errors="replace")
        if proc.returncode != 0:
            tail = "\n".join("    " + line for line in output.strip().splitlines()[-8:])
            raise StageError(f"{what or Path(argv[0]).name} failed (exit {proc.returncode}).\n  last lines:\n{tail}")
        return output


@contextlib.contextmanager
def tool_output_to(log_path: Path):
    """Send everything the stage's libraries print (onnxsim, ONNX Runtime's C++ logger, torch's
    exporter, Python warnings) to the task's log, at the file-descriptor level, so the console
    shows the build, not their chatter. BLIPC_VERBOSE=1 leaves it on the console."""
    if env.flag(env.VERBOSE):
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _reset_peak_rss() -> bool:
    """Start this process's peak-RSS count afresh (Linux: VmHWM), so a stage that runs inside the
    doit process (export, simplify) gets its own peak, not the process's earlier one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _out_of_space(e: BaseException | None) -> OSError | None:
    """The ENOSPC (or EDQUOT) behind a failure, if that is what it was."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e):  # libraries that wrap it (torch, onnx, protobuf)
            return OSError(errno.ENOSPC, "No space left on device")
        e = e.__cause__ or e.__context__
    return None


def _out_of_space_message(node_id: str, e: OSError, root: Path) -> str:
    where = e.filename or root
    try:
        free = f"{shutil.disk_usage(root).free / 2**20:.0f} MiB free there now"
    except OSError:
        free = "free space unknown"
    return (f"{node_id}: out of disk space writing {where} ({free}). Free some space and run again: "
            "every artifact already built is intact and stays fresh; this one's partial files were removed.")


def run_task(store: Store, node_id: str, build: bool = True, placement: dict | None = None):
    """Build one node in this process. Returns None on success, a TaskFailed with the log path on
    failure. build=False only pulls from the cache (`doit cache pull`): False when it was not there.
    placement: where a Dask build ran it (worker, memory_request_mb), kept in the record."""
    from doit.exceptions import TaskFailed

    try:
        return _run_task(store, node_id, build, placement or {})
    except OSError as e:  # out of space before or after the stage itself (log, record, manifest)
        full = _out_of_space(e)
        if full is None:
            raise
        root = Path(store.plan.root)
        shutil.rmtree(staging_dir(root, node_id), ignore_errors=True)
        return TaskFailed(_out_of_space_message(node_id, full, root))


def _run_task(store: Store, node_id: str, build: bool, placement: dict):
    from doit.exceptions import TaskFailed

    from buildplan import cache as cache_mod

    plan = store.plan
    node = plan.nodes[node_id]
    ctx = Context(plan, store, node)
    try:  # everything this task writes, before it writes anything
        for path in (ctx.log_path, ctx.staging, store.record_path(node_id), store.failure_path(node_id),
                     ctx.root / "manifest.json", *(ctx.path(rel) for rel in node.paths)):
            refuse_symlinks(ctx.root, path)
    except SymlinkRefused as e:
        return TaskFailed(f"{node_id}: {e}")
    store.drop(node_id)
    store.clear_failure(node_id)
    store.log_dir.mkdir(parents=True, exist_ok=True)
    ctx.log_path.write_text(f"# {node_id}  started {utc_now()} on {socket.gethostname()}\n")
    started = time.time()
    peak_is_own = _reset_peak_rss()
    parts = store.parts(node)  # what it is made from: doit ran (or pulled) every upstream task first
    cache = cache_mod.for_config(plan.config)
    try:
        result = _pull(ctx, cache, parts) if cache.settings.reads else None
        pulled = result is not None
        if not pulled:
            if not build:
                shutil.rmtree(ctx.staging, ignore_errors=True)
                return False
            module, func = node.action.split(":")
            with tool_output_to(ctx.log_path):
                result = getattr(importlib.import_module(module), func)(node, ctx)
        from_cache = result.pop("from_cache") if pulled else None
        result = StageResult.of(result, node.id)
        outputs = {}
        for rel in node.paths:
            staged = ctx.staging / "out" / rel
            if not staged.exists():
                raise StageError(f"the stage did not produce {rel}")
        for rel in node.paths:
            final = ctx.path(rel)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(ctx.staging / "out" / rel, final)
            st = final.stat()
            outputs[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(final)}
    except BaseException as e:  # noqa: BLE001 - any failure, incl. KeyboardInterrupt, must not leave a record
        with contextlib.suppress(OSError):  # a full disk must not hide the failure itself
            ctx.log(traceback.format_exc())
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        full = _out_of_space(e)
        if full is not None:
            shutil.rmtree(ctx.staging, ignore_errors=True)  # the partial work is what filled the disk
            with contextlib.suppress(OSError):
                store.mark_failure(node_id, "out of disk space", str(ctx.log_path.relative_to(ctx.root)), utc_now())
            return TaskFailed(_out_of_space_message(node_id, full, ctx.root))
        kept = ctx.staging if ctx.staging.exists() else None
        detail = str(e) if isinstance(e, BuildError) else f"{type(e).__name__}: {e}"
        msg = f"{node_id}: {detail}\n  log: {ctx.log_path}"
        if kept:
            msg += f"\n  scratch files kept for inspection: {kept}"
        store.mark_failure(node_id, detail, str(ctx.log_path.relative_to(ctx.root)), utc_now(),
                           getattr(e, "finding", None))
        return TaskFailed(msg)
    shutil.rmtree(ctx.staging, ignore_errors=True)
    digest = outputs_digest(outputs)
    tc = ctx.toolchain() if node.toolchain else None
    committed = Record(
        node=node.id, stage=node.stage, model=node.model, labels=node.labels,
        fingerprint=store.fingerprint(parts), parts=parts, outputs=outputs, roles=dict(node.outputs), digest=digest,
        toolchain={"name": tc.name, "label": tc.label, "standin": tc.standin} if tc else None,
        started_unix=round(started, 3),  # with duration_s: what ran at the same time (Dask builds)
        duration_s=round(time.time() - started, 3), finished_at=utc_now(), host=socket.gethostname(),
        tool_peak_rss_mb=round(ctx.tool_peak_rss / 2**20, 1) if ctx.tool_peak_rss else None,
        # the doit process itself while this task ran (the stage's own work: export, gates, onnxsim)
        peak_rss_mb=round(_peak_rss_bytes() / 2**20, 1) if peak_is_own else None,
        log=str(ctx.log_path.relative_to(ctx.root)),
        worker=placement.get("worker"), memory_request_mb=placement.get("memory_request_mb"),
        from_cache=from_cache, result=result,
    )
    record = committed.to_json()
    store.commit(record)
    ctx.log(f"# done in {record['duration_s']} s" + (" (pulled from the cache)" if pulled else ""))
    if cache.settings.writes and not pulled and not committed.is_standin:  # only what this machine built and proved
        try:
            ctx.log(f"cache: {cache.push(record, ctx.root, ctx.log)}")
        except cache_mod.CacheUnavailable as e:
            return TaskFailed(f"{node_id}: built, but {e}")
    return None


def _pull(ctx: Context, cache, parts: dict) -> dict | None:
    """The node's outputs from the cache, downloaded into the staging folder and checked against
    the entry's sizes and sha256: what the record takes from the entry, or None (a miss)."""
    from buildplan import cache as cache_mod

    node = ctx.node
    cache_key = cache_mod.key(parts)
    entry = cache.lookup(node, cache_key)
    if entry is None:
        return None
    moved = seconds = 0.0
    try:
        for role in node.outputs:
            transfer = cache.fetch(entry, role, ctx.tmp(role))
            moved, seconds = moved + transfer.bytes, seconds + transfer.seconds
    except cache_mod.CacheMiss as e:
        shutil.rmtree(ctx.staging / "out", ignore_errors=True)
        message = f"cache {cache.name}: {node.id}: entry {cache_key[:16]} unusable ({e}): building it instead"
        ctx.log(message)
        print(f"warning: {message}", file=sys.stderr)
        return None
    ctx.log(f"pulled from the cache {cache.name}, key {cache_key}: {cache_mod.Transfer(int(moved), seconds)}")
    kept = {k: v for k, v in entry["result"].items() if k not in RECORD_FIELDS}  # what the stage said
    return {**kept, "from_cache": {"cache": cache.name, "key": cache_key, "bytes": int(moved),
                                   "seconds": round(seconds, 3), **entry["provenance"],
                                   "build": entry.get("figures_of_build", {})}}


def outputs_digest(outputs: dict) -> str:
    """What downstream fingerprints take from this artifact: the content of all its outputs."""
    return hashlib.sha256("".join(f"{k}={v['sha256']};" for k, v in sorted(outputs.items())).encode()).hexdigest()


def clean_task(store: Store, node_id: str):
    store.drop(node_id)
    for rel in store.plan.nodes[node_id].paths:
        with contextlib.suppress(FileNotFoundError):
            (store.root / rel).unlink()
    store.write_manifest()

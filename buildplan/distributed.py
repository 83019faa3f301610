"""Parallel and distributed builds on Dask: `doit -n N -P dask` (also `doit nightly -P dask`).

doit's `run` command is replaced by a subclass (a command plugin, pyproject.toml) that accepts
`-P dask`: it connects to the scheduler at BLIPC_DASK_SCHEDULER (tcp://host:8786) or starts a
LocalCluster sized to this machine, then lets doit's thread runner drive the build. Freshness
checks and doit's database stay in this process; each task's action submits the real work to a
worker and waits for it. So the DAG order, `--continue`, the records and the no-op fast path are
doit's and ours as before, and only execution moves.

Memory-aware placement: every task asks for a `MEM` resource, in MB: its last measured peak
(the record's toolchain or stage peak RSS) plus a quarter, else its stage's estimate for the
model's size (MEMORY_MB declared by the stage or backend module, from the figures in the README).
Dask's resources are per worker, but the workers of a LocalCluster share one machine: each of
them advertises the whole pool (this machine's available memory less a margin, or
BLIPC_DASK_POOL_MB) so any task that fits the machine can run anywhere, and this process hands
out the pool itself: a task is submitted only once its MB are free, so the sum of what runs never
passes the pool. Workers started by hand say what they have (`dask worker --resources MEM=...`)
and Dask keeps each of them within it. A task bigger than every worker fails at once saying both
sizes, and a guard in the worker kills a task whose process tree grows past three times its
request.

Workers without this machine's artifacts/ (BLIPC_WORKER_ARTIFACTS set on the worker) pull the
task's inputs from the shared cache, build, and push the outputs; this process then pulls them.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import uuid

from doit.cmd_run import Run
from doit.exceptions import InvalidCommand

from buildplan import env

SCHEDULER_ENV, POOL_ENV = env.DASK_SCHEDULER, env.DASK_POOL_MB  # POOL: what a LocalCluster's tasks may use together
MARGIN_MB = 2048  # left to the OS and this process when sizing a LocalCluster
GUARD_FACTOR = 3.0  # the guard kills a task using this many times the memory it asked for
DEFAULT_MB = 2048  # a stage that declares no estimate


class DaskRun(Run):
    """doit's `run`, plus `-P dask`."""
    name = "run"
    builds = True
    cmd_options = Run.cmd_options + (
        {"name": "dask_scheduler", "long": "dask-scheduler", "type": str, "default": "",
         "help": f"with -P dask: the scheduler to use, tcp://host:8786 (default: ${SCHEDULER_ENV}, "
                 "else a LocalCluster on this machine)"},
    )

    def _execute(self, outfile, verbosity=None, always=False, continue_=False, reporter="console", num_process=0,
                 par_type="process", single=False, auto_delayed_regex=False, force_verbosity=False,
                 failure_verbosity=0, pdb=False, dask_scheduler=""):
        kwargs = dict(verbosity=verbosity, always=always, continue_=continue_, reporter=reporter,
                      single=single, auto_delayed_regex=auto_delayed_regex, force_verbosity=force_verbosity,
                      failure_verbosity=failure_verbosity, pdb=pdb)
        if par_type == "thread" and num_process:
            # each task sends its tools' output to its log by redirecting fds 1 and 2, which belong
            # to the whole process: under threads, other tasks' console lines would land there too
            raise InvalidCommand("-P thread is not supported: tasks redirect the process's own output to their "
                                 "logs. Use -P process (doit's default for -n N) or -P dask")
        if par_type != "dask":
            if dask_scheduler:
                raise InvalidCommand("--dask-scheduler needs -P dask")
            return super()._execute(outfile, num_process=num_process, par_type=par_type, **kwargs)
        with cluster(num_process, dask_scheduler or env.get(env.DASK_SCHEDULER)) as dask:
            # doit's threads only wait on Dask futures: one per worker keeps every worker busy
            return super()._execute(outfile, num_process=dask.workers, par_type="thread", **kwargs)


@contextlib.contextmanager
def cluster(num_process: int, address: str | None):
    """A Dask client for this build: the scheduler at `address`, else a LocalCluster of
    `num_process` workers (default: as many as the cores and memory allow), installed as this
    process's executor for the block."""
    import logging

    from buildplan import executor

    import psutil
    from distributed import Client, LocalCluster

    local = pool = None
    if address:
        client = Client(address, timeout="20s")
    else:
        pool_mb = float(env.get(env.DASK_POOL_MB) or psutil.virtual_memory().available / 2**20 - MARGIN_MB)
        workers = num_process or max(1, min(os.cpu_count() or 1, int(pool_mb // DEFAULT_MB)))
        local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                             dashboard_address="127.0.0.1:0", resources={"MEM": pool_mb},
                             memory_limit=0,  # Dask's own monitor sees the worker, not its toolchain children
                             silence_logs=logging.ERROR)
        client = Client(local)
        pool = MemoryPool(pool_mb)
    try:
        info = client.scheduler_info()["workers"]
        mems = [w.get("resources", {}).get("MEM", 0) for w in info.values()]
        memory = (f"sharing {pool.total_mb:.0f} MB" if pool else
                  f"MEM {', '.join(f'{m:.0f}' for m in mems)} MB")
        print(f"dask: {len(info)} workers ({memory}), dashboard {client.dashboard_link}", file=sys.stderr)
        with executor.using(DaskExecutor(client, pool, max(mems, default=0), max(1, len(info)))) as dask:
            yield dask
    finally:
        client.close()
        if local is not None:
            local.close()


class DaskExecutor:
    """Runs each task's work on a Dask worker; freshness, records and doit's database stay here."""
    name = "dask"

    def __init__(self, client, pool: MemoryPool | None, largest_mb: float, workers: int):
        self.client, self.pool, self.largest_mb, self.workers = client, pool, largest_mb, workers

    def running_on(self) -> dict[str, str]:
        """node id -> the name of the worker running it now (for the live progress line)."""
        try:
            names = {addr: str(w.get("name")) for addr, w in self.client.scheduler_info()["workers"].items()}
            return {key.rsplit("-", 1)[0]: names.get(addr, addr)
                    for addr, keys in self.client.processing().items() for key in keys}
        except Exception:  # noqa: BLE001 - the cluster going away is reported by the tasks themselves
            return {}

    def run(self, store, node_id: str):
        return run_remote(self, store, node_id)


def memory_need(store, node) -> float:
    """MB a task asks for: its last measured peak plus a quarter, else its stage's estimate."""
    rec = store.read(node.id)
    measured = rec and (rec.get("tool_peak_rss_mb") or rec.get("peak_rss_mb"))
    if measured:
        return round(float(measured) * 1.25, 1)
    from buildplan.backends import memory_estimate

    arch = next((m.arch for m in store.plan.config.models if m.name == node.model), None)
    return float(memory_estimate(node.stage, arch) or DEFAULT_MB)


def run_remote(dask: DaskExecutor, store, node_id: str):
    """The doit action of a node while a Dask build runs: the work on a worker, the record here."""
    from doit.exceptions import TaskFailed

    config_path = store.plan.config.path
    node = store.plan.nodes[node_id]
    need = memory_need(store, node)
    if need > dask.largest_mb:
        return TaskFailed(f"{node_id} needs about {need:.0f} MB of memory; the largest Dask worker offers "
                          f"{dask.largest_mb:.0f} MB (MEM resource). Start workers with more "
                          f"(`dask worker --resources MEM=<MB>`, or {POOL_ENV} for a local cluster) "
                          "or fewer per machine.")
    with dask.pool.lease(need) if dask.pool else contextlib.nullcontext():
        future = dask.client.submit(work, config_path, node_id, need, store.plan.root, resources={"MEM": need},
                                key=f"{node_id}-{uuid.uuid4().hex[:8]}", pure=False)
        try:
            status, message = future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - the worker died more often than Dask retries, or the cluster went away
            return TaskFailed(f"{node_id}: the Dask worker failed: {type(e).__name__}: {e}")
    if status != "ok":
        return TaskFailed(message)
    if store.read(node_id) is None:  # built on a worker with its own artifacts/: its outputs come by the cache
        from buildplan.runner import run_task

        pulled = run_task(store, node_id, build=False)
        if pulled is not None:
            return TaskFailed(f"{node_id}: built on a worker, but not found in the shared cache afterwards: "
                              "workers without this machine's artifacts/ need a cache in write mode")
    return None


def work(config_path: str, node_id: str, need_mb: float, main_root: str):
    """On a worker: build one node (its inputs pulled from the cache first when this worker has
    its own artifacts/), under the memory guard. Returns ("ok", "") or ("failed", message)."""
    from distributed import get_worker

    from buildplan.runner import run_task
    from buildplan.session import store_for

    placement = {"worker": str(get_worker().name), "memory_request_mb": need_mb}
    store = store_for(config_path)
    if store.plan.root != main_root:
        for dep in store.plan.closure([node_id])[:-1]:
            if not store.is_fresh(store.plan.nodes[dep]) and run_task(store, dep, build=False) is not None:
                return "failed", f"{node_id}: input {dep} is neither on this worker nor in the shared cache"
    guard = MemoryGuard(need_mb * GUARD_FACTOR)
    with guard:
        result = run_task(store, node_id, placement=placement)
    if guard.exceeded_mb:
        return "failed", (f"{node_id}: killed by the memory guard: its processes used {guard.exceeded_mb:.0f} MB, "
                          f"more than {GUARD_FACTOR:g} x the {need_mb:.0f} MB it asked for")
    if result is None:
        return "ok", ""
    return "failed", getattr(result, "message", None) or str(result)


class MemoryPool:
    """The memory the tasks of one machine's workers may use together, in MB. Only this process
    submits them, so a condition variable is the whole ledger (no Dask semaphore to leak)."""

    def __init__(self, total_mb: float):
        self.total_mb, self.in_use_mb = total_mb, 0.0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def lease(self, mb: float):
        with self._changed:
            self._changed.wait_for(lambda: self.in_use_mb + mb <= self.total_mb)
            self.in_use_mb += mb
        try:
            yield
        finally:
            with self._changed:
                self.in_use_mb -= mb
                self._changed.notify_all()


class MemoryGuard:
    """Kills the task's child processes when they and this process's growth pass `limit_mb`:
    Dask's resources are only labels, and a runaway toolchain must not make the machine swap."""

    def __init__(self, limit_mb: float):
        self.limit_mb, self.exceeded_mb = limit_mb, 0.0
        self._stop = threading.Event()

    def __enter__(self):
        import psutil

        self._me = psutil.Process()
        self._base = self._me.memory_info().rss
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self):
        import psutil

        while not self._stop.wait(0.5):
            try:
                children = self._me.children(recursive=True)
                used = max(0, self._me.memory_info().rss - self._base)
                for c in children:
                    with contextlib.suppress(psutil.Error):
                        used += c.memory_info().rss
            except psutil.Error:
                continue
            if used / 2**20 > self.limit_mb:
                self.exceeded_mb = used / 2**20
                for c in children:
                    with contextlib.suppress(psutil.Error):
                        c.kill()
                return

"""Parallel and distributed builds on Dask (`doit -n 2 -P dask`), with real worker processes and
real TPU-MLIR: the same artifacts as a serial build, a worker killed mid-task, the main process
killed, a task too big for every worker, local workers sharing one memory pool (and the live
line on a terminal), and workers with their own artifact folders sharing only the cache."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, doit, doit_on_a_terminal, executed, free_port, records, write_config

pytestmark = pytest.mark.tpu_mlir
BIN = Path(sys.executable).parent


def _models():
    return [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny"},
             "graphs": ["BLIP_text", "BLIP_image", "blip_itm"],
             "targets": {"cpu": {"precisions": ["F32"], "batch_sizes": [1, 2]},
                         "bm1684x": {"graphs": ["blip_itm"]}}}]


def _shas(root: Path) -> dict:
    return {rel: m["sha256"] for rec in records(root).values() for rel, m in rec["outputs"].items()}


def test_dask_build_equals_the_serial_one(tmp_path):
    serial = write_config(tmp_path / "serial.yaml", _models(), tmp_path / "serial")
    parallel = write_config(tmp_path / "dask.yaml", _models(), tmp_path / "dask")
    doit(serial)
    proc = doit(parallel, "-n", "2", "-P", "dask")
    assert "dask: 2 workers" in proc.stderr and "dashboard http://127.0.0.1:" in proc.stderr
    recs = records(tmp_path / "dask")
    assert {r.get("worker") for r in recs.values()} <= {"0", "1"} and all("worker" in r for r in recs.values())
    a, b = _shas(tmp_path / "serial"), _shas(tmp_path / "dask")
    assert a.keys() == b.keys()
    differ = sorted(k for k in a if a[k] != b[k])
    # The ONNX graphs, references, checkpoint and MLIR are byte-identical. ORT-format files and
    # bmodels are not reproducible even between two serial builds (ORT writes a hash map in its
    # own order): for them the same record, the same figures.
    assert all(k.endswith((".ort", ".bmodel")) for k in differ), differ
    assert any(k.endswith(".onnx") for k in a) and not any(k.endswith(".onnx") for k in differ)
    serial_recs = records(tmp_path / "serial")
    for name, rec in recs.items():
        assert rec["fingerprint"] == serial_recs[name]["fingerprint"], name  # same inputs, code, toolchain
        assert rec["parts"]["params"] == serial_recs[name]["parts"]["params"]
        for fig in ("ort_vs_onnx", "bmodel_vs_onnx", "top_mlir_vs_onnx", "simplified_vs_raw"):
            if fig in rec.get("figures", {}):
                assert rec["figures"][fig] == serial_recs[name]["figures"][fig], (name, fig)
    assert executed(doit(parallel, "-n", "2", "-P", "dask")) == []  # and then it is a no-op


def test_a_worker_killed_mid_task_is_retried_and_nothing_half_written_counts(tmp_path):
    cfg = write_config(tmp_path / "models.yaml", _models(), tmp_path / "artifacts")
    staging = tmp_path / "artifacts" / ".staging"
    killed = []

    def kill_the_transform():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for d in staging.glob("transform__*.*") if staging.exists() else ():
                pid = int(d.suffix[1:])
                os.kill(pid, signal.SIGKILL)  # the Dask worker process running it
                killed.append(pid)
                return
            time.sleep(0.2)
    watcher = threading.Thread(target=kill_the_transform)
    watcher.start()
    proc = doit(cfg, "-n", "2", "-P", "dask")
    watcher.join()
    assert killed, "no transform task was seen running"
    recs = records(tmp_path / "artifacts")
    assert "transform__r.blip_itm.1b" in recs and recs["transform__r.blip_itm.1b"]["figures"]["top_mlir_vs_onnx"]
    assert doit(cfg, "stale", "--check", check=False).returncode == 0
    assert "bmodel:r.blip_itm.bm1684x.F32.1b" in executed(proc)


def test_the_main_process_killed_takes_its_workers_along_and_a_rerun_resumes(tmp_path):
    cfg = write_config(tmp_path / "models.yaml", _models(), tmp_path / "artifacts")
    staging = tmp_path / "artifacts" / ".staging"
    main = subprocess.Popen([str(BIN / "doit"), "-n", "2", "-P", "dask", f"config={cfg}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (staging.exists() and any(staging.glob("transform__*"))):
            assert main.poll() is None, "the build ended before its transform started"
            assert time.time() < deadline, "no transform task was seen running"
            time.sleep(0.2)
        finished = set(records(tmp_path / "artifacts"))
        assert finished and "transform__r.blip_itm.1b" not in finished
        main.kill()  # SIGKILL: no cleanup of any kind in the main process
        main.wait()
        deadline = time.time() + 60
        while time.time() < deadline and _alive(main.pid):
            time.sleep(0.5)
        assert not _alive(main.pid), "Dask workers or their toolchain processes outlived the build"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main.pid, signal.SIGKILL)
    rerun = doit(cfg, "-n", "2", "-P", "dask")
    again = set(executed(rerun))
    assert "transform:r.blip_itm.1b" in again and not again & {n.replace("__", ":") for n in finished}
    assert doit(cfg, "stale", "--check", check=False).returncode == 0


def _alive(session: int) -> bool:
    """Whether any process of this session (the build, its workers, their tools) is left."""
    import psutil

    return any(p.info["pid"] != session and _session_of(p.info["pid"]) == session
               for p in psutil.process_iter(["pid"]))


def _session_of(pid: int):
    try:
        return os.getsid(pid)
    except OSError:
        return None


def test_a_task_bigger_than_every_worker_fails_at_once_saying_so(tmp_path):
    cfg = write_config(tmp_path / "models.yaml", _models(), tmp_path / "artifacts")
    started = time.time()
    proc = doit(cfg, "-n", "2", "-P", "dask", env={"BLIPC_DASK_POOL_MB": "300"}, check=False)
    assert proc.returncode != 0 and time.time() - started < 120
    assert "checkpoint:r needs about 800 MB of memory; the largest Dask worker offers 300 MB" in proc.stdout, proc.stdout
    assert not (tmp_path / "artifacts" / "checkpoints").exists()


def test_local_workers_share_the_machine_memory_pool(tmp_path):
    # Before any measurement the tiny estimates are 800-1600 MB a task; a pool of 1700 MB lets no
    # two exports or simplifications run together, where 2 workers with a MEM each would.
    models = _models()
    models[0]["targets"] = {"cpu": {"precisions": ["F32"], "batch_sizes": [1, 2]}}
    cfg = write_config(tmp_path / "models.yaml", models, tmp_path / "artifacts")
    status, screen = doit_on_a_terminal(cfg, "-n", "2", "-P", "dask", env={"BLIPC_DASK_POOL_MB": "1700"})
    assert status == 0, screen[-3000:]
    assert "dask: 2 workers (sharing 1700 MB)" in screen
    recs = list(records(tmp_path / "artifacts").values())
    stages = [r["stage"] for r in recs]
    assert stages.count("simplify") == stages.count("ort") == 6 and {r["worker"] for r in recs} <= {"0", "1"}
    assert all(r["memory_request_mb"] > 0 for r in recs)
    events = sorted([(r["started_unix"], r["memory_request_mb"]) for r in recs] +
                    [(r["started_unix"] + r["duration_s"], -r["memory_request_mb"]) for r in recs])
    in_use, peak = 0.0, 0.0
    for _, delta in events:  # ends sort before starts at the same instant
        in_use += delta
        peak = max(peak, in_use)
    assert peak <= 1700, f"tasks asking for {peak:.0f} MB ran at once in a pool of 1700 MB"
    # the live line on a terminal: finished/total, each running task's time and where it runs
    live = [part.split("\r")[0] for part in screen.split("\r\x1b[K> ")[1:]]
    assert live and all(re.match(r"\[\d+/14\] ", line) for line in live), live
    assert any(re.search(r" \d+ s on worker [01]\b", line) for line in live), live


def test_workers_with_their_own_artifacts_share_only_the_cache(tmp_path):
    cache = tmp_path / "cache"
    models = _models()
    models[0]["targets"] = {"cpu": {"precisions": ["F32"], "batch_sizes": [1, 2]}}
    cfg = write_config(tmp_path / "models.yaml", models, tmp_path / "main")
    cfg.write_text(cfg.read_text() + f"cache: {{url: '{cache}', mode: read}}\n")
    port = free_port()
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        for i in range(2):
            env = {**os.environ, "BLIPC_WORKER_ARTIFACTS": str(tmp_path / f"worker{i}"),
                   "BLIPC_CACHE_URL": str(cache), "BLIPC_CACHE_MODE": "write"}
            procs.append(subprocess.Popen(
                [str(BIN / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nthreads", "1", "--nworkers", "1",
                 "--resources", "MEM=4000", "--memory-limit", "0", "--no-dashboard", "--name", f"w{i}"],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(3)
        proc = doit(cfg, "-P", "dask", "--dask-scheduler", f"tcp://127.0.0.1:{port}")
        assert "dask: 2 workers" in proc.stderr
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(30)
    main = records(tmp_path / "main")
    assert main and all("from_cache" in r for r in main.values())  # built elsewhere, pulled here
    built_on = {r["from_cache"]["build"].get("duration_s") is not None for r in main.values()}
    assert built_on == {True}
    workers = [records(tmp_path / f"worker{i}") for i in range(2)]
    assert all(workers), "both workers built something"
    assert doit(cfg, "stale", "--check", check=False).returncode == 0

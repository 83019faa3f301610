"""Serial vs Dask: the default matrix from scratch, `doit` then `doit -n N -P dask` (a LocalCluster
on this machine), in one run, each into an empty artifacts folder, no cache.

    .venv/bin/python bench/parallel.py [--workers 2]
    .venv/bin/python bench/parallel.py --base-transforms [--workers 4] [--pool-mb 22000]

Prints wall times, the speed-up, where the tasks ran, and the machine's peak memory use during
each run (sampled every 0.5 s: total minus available). Works in artifacts-bench/parallel/.

--base-transforms is the memory-pressure run: BLIP-base captioning (synthetic checkpoint), its
two step-decoder graphs at batch sizes 1 and 2 exported, simplified and transformed by TPU-MLIR
(4 transforms of 6-7 GB each, asking for 11 GB each before they are measured) on --workers Dask
workers sharing a pool of --pool-mb: at most two transforms fit at once. Prints the machine's
peak memory against the pool, the most MB that ran at once by the records, and any task killed.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
DOIT = str(Path(sys.executable).parent / "doit")


def timed(argv: list[str], env: dict | None = None) -> tuple[float, float, str, float]:
    """wall seconds, the machine's peak used memory (MB) while it ran, its output, and the CPU
    seconds of the command and every process under it (all are waited for: RUSAGE_CHILDREN)"""
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.wait(0.5):
            vm = psutil.virtual_memory()
            peak[0] = max(peak[0], (vm.total - vm.available) / 2**20)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, peak[0], proc.stdout + proc.stderr, _children_cpu() - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (root / ".state").glob("*.json")
            if p.name not in ("hashcache.json", "verdicts.json")]


def most_at_once(recs: list[dict], key: str) -> float:
    """The largest sum of `key` over tasks whose run windows overlapped."""
    events = sorted([(r["started_unix"], r[key]) for r in recs] +
                    [(r["started_unix"] + r["duration_s"], -r[key]) for r in recs])
    in_use = peak = 0.0
    for _, delta in events:
        in_use += delta
        peak = max(peak, in_use)
    return peak


def base_transforms(workers: int, pool_mb: int) -> None:
    work = REPO / "artifacts-bench" / "pressure"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    graphs = ["blip_cap_venc", "blip_cap_step"]
    model = {"name": "captioning", "task": "captioning", "checkpoint": {"synthetic": "base", "seed": 1},
             "graphs": graphs, "targets": {"bm1684x": {"batch_sizes": [1, 2], "simulate": False}}}
    cfg = work / "models.yaml"
    cfg.write_text(yaml.safe_dump({"artifacts": str(work / "artifacts"), "models": [model]}, sort_keys=False))
    transforms = [f"transform:captioning.{g}.{bs}b" for g in graphs for bs in (1, 2)]
    idle = (psutil.virtual_memory().total - psutil.virtual_memory().available) / 2**20
    wall, peak, out, _ = timed([DOIT, "-n", str(workers), "-P", "dask", f"config={cfg}", *transforms],
                            env={"BLIPC_DASK_POOL_MB": str(pool_mb)})
    recs = records(work / "artifacts")
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"in use before: {idle:.0f} MB; {workers} workers sharing a pool of {pool_mb} MB")
    print(f"{'task':44} {'asked':>8} {'peak (own/tool)':>16} {'time':>7}  worker")
    for r in sorted(recs, key=lambda r: r["started_unix"]):
        measured = max(r.get("peak_rss_mb") or 0, r.get("tool_peak_rss_mb") or 0)
        print(f"{r['node']:44} {r['memory_request_mb']:6.0f}MB {measured:14.0f}MB {r['duration_s']:6.1f}s  "
              f"{r['worker']}")
    at_once = [r for r in recs if r["stage"] == "transform"]
    print(f"wall {wall:.1f} s; machine peak {peak:.0f} MB (pool {pool_mb} MB); most asked at once "
          f"{most_at_once(recs, 'memory_request_mb'):.0f} MB; transforms running at once at most "
          f"{most_at_once([{**r, 'one': 1} for r in at_once], 'one'):.0f}; "
          f"killed by the guard: {out.count('killed by the memory guard')}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--base-transforms", action="store_true", help="the memory-pressure run instead")
    ap.add_argument("--pool-mb", type=int, default=22000)
    args = ap.parse_args()
    if args.base_transforms:
        return base_transforms(args.workers or 4, args.pool_mb)
    args.workers = args.workers or 2
    work = REPO / "artifacts-bench" / "parallel"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "models.yaml").read_text())
    idle = (psutil.virtual_memory().total - psutil.virtual_memory().available) / 2**20
    results = {}
    for name, extra in (("serial", []), ("dask", ["-n", str(args.workers), "-P", "dask"])):
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**raw, "artifacts": str(work / name)}, sort_keys=False))
        wall, peak, out, cpu = timed([DOIT, *extra, f"config={cfg}"])
        recs = records(work / name)
        workers = {}
        for r in recs:
            workers[r.get("worker", "main process")] = workers.get(r.get("worker", "main process"), 0) + 1
        results[name] = (wall, peak, len(recs), workers, cpu, sum(r["duration_s"] for r in recs))
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"in use before: {idle:.0f} MB")
    for name, (wall, peak, count, workers, cpu, task_s) in results.items():
        print(f"{name:8} {wall:8.1f} s  {count} artifacts  machine peak {peak:6.0f} MB  CPU {cpu:6.0f} s "
              f"({cpu / wall:.2f} cores)  tasks' own times {task_s:6.0f} s  tasks per worker {workers}")
    serial_wall, serial_cpu = results["serial"][0], results["serial"][4]
    print(f"speed-up: {serial_wall / results['dask'][0]:.2f}x; the most {psutil.cpu_count()} cores allow for the serial "
          f"run's CPU time: {serial_wall / max(serial_cpu / psutil.cpu_count(), 1e-9):.2f}x")


if __name__ == "__main__":
    main()

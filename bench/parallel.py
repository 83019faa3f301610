"""Serial vs Dask: the default matrix from scratch, `doit` then `doit -n N -P dask` (a LocalCluster
on this machine), in one run, each into an empty artifacts folder, no cache.

    .venv/bin/python bench/parallel.py [--workers 2]

Prints wall times, the speed-up, where the tasks ran, and the machine's peak memory use during
each run (sampled every 0.5 s: total minus available). Works in artifacts-bench/parallel/.
"""
import argparse
import json
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


def timed(argv: list[str]) -> tuple[float, float, str]:
    """wall seconds, the machine's peak used memory (MB) while it ran, stdout"""
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.wait(0.5):
            vm = psutil.virtual_memory()
            peak[0] = max(peak[0], (vm.total - vm.available) / 2**20)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, peak[0], proc.stdout + proc.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    work = REPO / "artifacts-bench" / "parallel"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "models.yaml").read_text())
    idle = (psutil.virtual_memory().total - psutil.virtual_memory().available) / 2**20
    results = {}
    for name, extra in (("serial", []), ("dask", ["-n", str(args.workers), "-P", "dask"])):
        cfg = work / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({**raw, "artifacts": str(work / name)}, sort_keys=False))
        wall, peak, out = timed([DOIT, *extra, f"config={cfg}"])
        recs = [json.loads(p.read_text()) for p in (work / name / ".state").glob("*.json")
                if p.name not in ("hashcache.json", "verdicts.json")]
        workers = {}
        for r in recs:
            workers[r.get("worker", "main process")] = workers.get(r.get("worker", "main process"), 0) + 1
        results[name] = (wall, peak, len(recs), workers)
    print(f"machine: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.1f} GiB; "
          f"in use before: {idle:.0f} MB")
    for name, (wall, peak, count, workers) in results.items():
        print(f"{name:8} {wall:8.1f} s  {count} artifacts  machine peak {peak:6.0f} MB  tasks per worker {workers}")
    print(f"speed-up: {results['serial'][0] / results['dask'][0]:.2f}x")


if __name__ == "__main__":
    main()

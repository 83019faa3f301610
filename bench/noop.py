"""No-op build cost: `doit` on the default matrix (everything built) vs bare doit with the same
number of trivial up-to-date tasks, both measured in this one run. Also times `doit stale`.

    .venv/bin/python bench/noop.py [--runs 25]
"""
import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOIT = str(Path(sys.executable).parent / "doit")
sys.path.insert(0, str(REPO))

BARE = '''
DOIT_CONFIG = {"dep_file": %r, "backend": "json", "verbosity": 1}
def ok():
    return True
def task_t():
    for i in range(%d):
        yield {"name": str(i), "actions": [ok], "uptodate": [True], "targets": []}
'''


def once(argv, cwd) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU time (user+sys of the child) is far less disturbed by
    other load on a small machine than wall time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def interleaved(commands, runs):
    """Alternate the commands run by run, so load from other processes hits all of them alike;
    report each one's median wall and median CPU time."""
    times = [[] for _ in commands]
    for _ in range(runs):
        for i, (argv, cwd) in enumerate(commands):
            times[i].append(once(argv, cwd))
    return [(statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    from buildplan import config
    from buildplan.plan import build_plan, plan_for

    plan = build_plan(config.load(REPO / "models.yaml"))
    subprocess.run([DOIT], cwd=REPO, check=True, capture_output=True)  # make sure all buildable is built
    count = len(plan.nodes)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "dodo.py").write_text(BARE % (str(Path(d) / ".db"), count))
        subprocess.run([DOIT], cwd=d, check=True, capture_output=True)
        (bare, bare_cpu), (ours, ours_cpu), (stale, stale_cpu) = interleaved(
            [([DOIT], d), ([DOIT], REPO), ([DOIT, "stale"], REPO)], args.runs)
    t = time.perf_counter()
    for _ in range(20):
        build_plan(config.load(REPO / "models.yaml"))
    plan_ms = (time.perf_counter() - t) / 20 * 1000
    t = time.perf_counter()
    for _ in range(20):
        plan_for(config.load(REPO / "models.yaml"))
    memo_ms = (time.perf_counter() - t) / 20 * 1000
    print(f"tasks: {count} artifact nodes (default matrix)")
    print(f"medians of {args.runs} interleaved runs        wall     CPU")
    print(f"bare doit, {count} trivial up-to-date tasks: {bare * 1000:5.0f} ms {bare_cpu * 1000:5.0f} ms")
    print(f"doit no-op on the default matrix:           {ours * 1000:5.0f} ms {ours_cpu * 1000:5.0f} ms"
          f"  -> ratio {ours / bare:.2f}x wall, {ours_cpu / bare_cpu:.2f}x CPU")
    print(f"doit stale on the default matrix:           {stale * 1000:5.0f} ms {stale_cpu * 1000:5.0f} ms")
    print(f"plan expansion (config load + build_plan):  {plan_ms:.1f} ms")
    print(f"plan from its memo (config load + plan_for): {memo_ms:.1f} ms")


if __name__ == "__main__":
    main()

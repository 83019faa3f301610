"""No-op build cost: `doit` on the default matrix (everything built) vs bare doit with the same
number of trivial up-to-date tasks, both measured in this one run. Also times `doit stale`.

    .venv/bin/python bench/noop.py [--runs 7]
"""
import argparse
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


def timed(argv, cwd, runs):
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(argv, cwd=cwd, check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    from buildplan import config
    from buildplan.plan import build_plan

    plan = build_plan(config.load(REPO / "models.yaml"))
    subprocess.run([DOIT], cwd=REPO, check=True, capture_output=True)  # make sure all buildable is built
    count = len(plan.nodes)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "dodo.py").write_text(BARE % (str(Path(d) / ".db"), count))
        subprocess.run([DOIT], cwd=d, check=True, capture_output=True)
        bare = timed([DOIT], d, args.runs)
    ours = timed([DOIT], REPO, args.runs)
    stale = timed([DOIT, "stale"], REPO, args.runs)
    t = time.perf_counter()
    for _ in range(20):
        build_plan(config.load(REPO / "models.yaml"))
    plan_ms = (time.perf_counter() - t) / 20 * 1000
    print(f"tasks: {count} artifact nodes (default matrix)")
    print(f"bare doit, {count} trivial up-to-date tasks: {bare * 1000:.0f} ms (median of {args.runs})")
    print(f"doit no-op on the default matrix:           {ours * 1000:.0f} ms  -> ratio {ours / bare:.2f}x")
    print(f"doit stale on the default matrix:           {stale * 1000:.0f} ms")
    print(f"plan expansion (config load + build_plan):  {plan_ms:.1f} ms")


if __name__ == "__main__":
    main()

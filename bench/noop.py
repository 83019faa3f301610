"""No-op build cost: `doit` on the default matrix (everything built) vs bare doit with the same
number of trivial up-to-date tasks, both measured in this one run. Also times the first no-op
after a change (no valid snapshot: the full check, and a new snapshot written at exit), `doit
stale`, and the plan expansion, cold (in a fresh interpreter, as in every doit run).

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

# Two baselines. uptodate=True: tasks that never run, so doit keeps no state for them.
# run_once (doit.tools): tasks that ran once and are up to date since, so doit keeps a state entry
# for each and calls a function to decide, as it does for our artifacts.
BARE = '''
from doit.tools import run_once
DOIT_CONFIG = {"dep_file": %r, "backend": "json", "verbosity": 1}
def ok():
    return True
def task_t():
    for i in range(%d):
        yield {"name": str(i), "actions": [ok], "uptodate": [%s], "targets": []}
'''

# doit is imported first, as in a real run; prints the milliseconds the plan took
COLD_PLAN = '''
import sys, time
import doit.doit_cmd
sys.path.insert(0, %r)
t = time.perf_counter()
from buildplan import config
from buildplan.plan import build_plan
plan = build_plan(config.load(%r))
print((time.perf_counter() - t) * 1000)
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


def interleaved(commands, runs) -> list[list[tuple[float, float]]]:
    """Alternate the commands run by run, so load from other processes hits all of them alike.
    A command is (argv, cwd, prepare): prepare() runs untimed before each of its runs."""
    times = [[] for _ in commands]
    for _ in range(runs):
        for i, (argv, cwd, prepare) in enumerate(commands):
            prepare()
            times[i].append(once(argv, cwd))
    return times


def cold_plan_ms(runs: int) -> float:
    code = COLD_PLAN % (str(REPO), str(REPO / "models.yaml"))
    return statistics.median(float(subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                                                  capture_output=True, text=True).stdout) for _ in range(runs))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    from buildplan import config, snapshot
    from buildplan.plan import build_plan

    count = len(build_plan(config.load(REPO / "models.yaml")).nodes)
    subprocess.run([DOIT], cwd=REPO, check=True, capture_output=True)  # make sure all buildable is built
    snap = snapshot._file(str(REPO / "models.yaml"))
    with tempfile.TemporaryDirectory() as never, tempfile.TemporaryDirectory() as once_:
        for d, uptodate in ((never, "True"), (once_, "run_once")):
            Path(d, "dodo.py").write_text(BARE % (str(Path(d) / ".db"), count, uptodate))
            subprocess.run([DOIT], cwd=d, check=True, capture_output=True)
        nothing = lambda: None  # noqa: E731
        bare, bare_once, ours, full, stale = interleaved(
            [([DOIT], never, nothing), ([DOIT], once_, nothing), ([DOIT], REPO, nothing),
             # as after any edit: no valid snapshot, so the full check, then a new snapshot at exit
             ([DOIT], REPO, lambda: snap.unlink(missing_ok=True)),
             ([DOIT, "stale"], REPO, nothing)], args.runs)

    def ms(samples, pick):
        return pick(samples) * 1000

    print(f"tasks: {count} artifact nodes (default matrix); {args.runs} interleaved rounds")
    print("                                            median wall / CPU      min wall / CPU")
    for label, t in (("bare doit, trivial tasks, uptodate=True", bare), ("bare doit, trivial tasks, run_once", bare_once),
                     ("doit no-op on the default matrix", ours), ("doit no-op, first after a change", full),
                     ("doit stale on the default matrix", stale)):
        walls, cpus = [w for w, _ in t], [c for _, c in t]
        print(f"{label:43s} {ms(walls, statistics.median):5.0f} / {ms(cpus, statistics.median):3.0f} ms"
              f"      {ms(walls, min):5.0f} / {ms(cpus, min):3.0f} ms")
    for label, base in (("uptodate=True", bare), ("run_once", bare_once)):
        ratio = lambda f, base=base: f(w for w, _ in ours) / f(w for w, _ in base)  # noqa: E731
        per_round = statistics.median(o[0] / b[0] for o, b in zip(ours, base, strict=True))
        print(f"no-op / bare ({label}): {ratio(statistics.median):.2f}x (medians), {ratio(min):.2f}x (minimums), "
              f"{per_round:.2f}x (median of per-round ratios)")
    print(f"plan, cold (importing config and plan, config load, build_plan): {cold_plan_ms(11):.1f} ms")


if __name__ == "__main__":
    main()

"""doit entry point. The tasks come from the session (buildplan/session.py), which doit's `blipc`
loader makes once per run from models.yaml: replayed from the no-op snapshot while nothing
changed, else expanded from the plan.

    doit                      everything this machine can build (reports skipped targets)
    doit compile:bm1684x      every artifact for one target (and what it needs)
    doit export:<model>       checkpoint -> raw ONNX -> per-batch simplified ONNX
    doit stale [--json] [--check]   which artifacts are out of date, and why
    doit nightly              build all, continue past failures, dated HTML/JSON report
    doit config=FILE ...      use another models.yaml (or BLIPC_CONFIG=FILE)
"""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import buildplan  # noqa: E402

if Path(buildplan.__file__).resolve().parent.parent != _HERE:
    # doit loads its plugins (ours) before this file: a .venv made by another checkout's
    # ./bootstrap.sh (an editable install) runs that checkout's code and models.yaml
    print(f"error: this checkout ({_HERE}) is being run by an environment that runs the code of "
          f"{Path(buildplan.__file__).resolve().parent.parent}.\n  fix: run ./bootstrap.sh here and use "
          f"{_HERE}/.venv/bin/doit", file=sys.stderr)
    sys.exit(2)

DOIT_CONFIG = {
    "default_tasks": ["default"],
    "backend": "safejson",  # buildplan/doitdb.py: atomic, a damaged file never stops a build
    "verbosity": 1,
    "reporter": "blipc",  # buildplan/console.py: a line per task, a live ETA, a summary
}


def task_blip():
    from buildplan.session import current

    yield from current().doit_tasks()

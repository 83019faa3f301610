"""doit entry point: models.yaml -> plan -> tasks. All logic lives in buildplan/, export/, compile/.

    doit                      everything this machine can build (reports skipped targets)
    doit compile:bm1684x      every artifact for one target (and what it needs)
    doit export:<model>       checkpoint -> raw ONNX -> per-batch simplified ONNX
    doit stale [--json] [--check]   which artifacts are out of date, and why
    doit nightly              build all, continue past failures, dated HTML/JSON report
    doit config=FILE ...      use another models.yaml (or BLIPC_CONFIG=FILE)
"""
import sys
from pathlib import Path

from doit import get_var

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Where PYTHONDONTWRITEBYTECODE is set, a module edited since ./bootstrap.sh would be compiled
# from source on every run (~25 ms for the modules a no-op imports): keep their bytecode.
_dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, False

from buildplan import config as _config  # noqa: E402
from buildplan import lock as _lock  # noqa: E402
from buildplan.plan import build_plan  # noqa: E402
from buildplan.tasks import generate  # noqa: E402

CONFIG_PATH = str(Path(get_var("config", str(_config.default_config_path()))).resolve())
try:
    PLAN = build_plan(_config.load(CONFIG_PATH))
except _config.ConfigError as e:  # a user mistake: one clear message, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
finally:
    sys.dont_write_bytecode = _dont_write_bytecode

_lock.hold_if_building(PLAN.root, sys.argv[1:])

DOIT_CONFIG = {
    "default_tasks": ["default"],
    "dep_file": str(Path(PLAN.root) / ".doit.db"),
    "backend": "json",
    "verbosity": 1,
}


def task_blip():
    yield from generate(PLAN, CONFIG_PATH)

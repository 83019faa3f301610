"""doit entry point: models.yaml -> plan -> tasks (replayed from the no-op snapshot while nothing changed).

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
# Where PYTHONDONTWRITEBYTECODE is set, a module edited since ./bootstrap.sh would be compiled
# from source on every run (~25 ms for the modules a no-op imports): keep their bytecode.
_dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, False

from buildplan import env as _env  # noqa: E402
from buildplan import lock as _lock  # noqa: E402
from buildplan import snapshot as _snapshot  # noqa: E402
from buildplan.files import default_config_path  # noqa: E402
from buildplan import session as _session  # noqa: E402
from buildplan import tasks as _tasks  # noqa: E402  (not `from ... import task_specs`: doit runs task_* names)

CONFIG_PATH = str(Path(get_var("config", str(default_config_path()))).resolve())
_SNAPSHOT = _snapshot.load(CONFIG_PATH)  # only if nothing changed since the last full check
if _SNAPSHOT:
    _SPECS, _ROOT, _FRESH = _SNAPSHOT["tasks"], _SNAPSHOT["root"], frozenset(_SNAPSHOT["fresh"])
else:
    from buildplan import config as _config
    from buildplan.plan import build_plan

    try:
        PLAN = build_plan(_config.load(CONFIG_PATH))
    except _config.ConfigError as e:  # a user mistake: one clear message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _SPECS, _ROOT, _FRESH = _tasks.task_specs(PLAN), PLAN.root, frozenset()
    _session.store_for(CONFIG_PATH, PLAN)
    _snapshot.take_at_exit(CONFIG_PATH, PLAN)
sys.dont_write_bytecode = _dont_write_bytecode

if _env.cache_overridden():  # the cache's environment, checked before any work
    from buildplan.cache import settings as _cache_settings
    from buildplan.core import ConfigError as _ConfigError

    try:
        _cache_settings({}, CONFIG_PATH)
    except _ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

_lock.hold_if_building(_ROOT, sys.argv[1:])
if not _SNAPSHOT and _lock.holding():
    # the declaration may have changed (a batch size taken out): the manifest lists declared artifacts only
    try:
        _session.store_for(CONFIG_PATH).write_manifest()
    except OSError as e:  # e.g. a full disk: the tasks will say so; the manifest is derived anyway
        print(f"warning: manifest not refreshed: {e}", file=sys.stderr)

DOIT_CONFIG = {
    "default_tasks": ["default"],
    "dep_file": str(Path(_ROOT) / ".doit.db"),  # beside the artifacts it describes, wherever models.yaml puts them
    "backend": "safejson",  # buildplan/doitdb.py: atomic, a damaged file never stops a build
    "verbosity": 1,
    "reporter": "blipc",  # buildplan/console.py: a line per task, a live ETA, a summary
}


def task_blip():
    yield from _tasks.to_doit(_SPECS, CONFIG_PATH, _FRESH)


def __getattr__(name):  # `doit stale` and `doit nightly` need the plan, also on the fast path
    if name == "PLAN":
        return _session.store_for(CONFIG_PATH).plan
    raise AttributeError(name)

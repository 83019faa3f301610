"""The registries of stages and backends. Export stages (export.EXPORT_STAGES) declare
`STAGE_DOCS` and `declare(plan, model, dims, previous)`. Backends: the modules listed in compile.BACKENDS, each declaring

    NAME        its toolchain's name (also the task `toolchain:<NAME>`)
    LABEL       what users call it ("TPU-MLIR")
    TARGETS     the target names a models.yaml `targets:` block may use, lower-case
    SETTINGS    the keys a target block takes besides graphs and batch_sizes (core.Setting)
    TOOLCHAIN_SETTINGS  the keys of its `toolchains.<NAME>` block (optional)
    ENVIRONMENT the environment variables detect() reads (optional)
    detect(settings) -> (toolchains.Toolchain, watched paths)   find it and say which build it is
    declare(plan, model, dims, target, exported)                  add its nodes to the plan
    STAGE_DOCS  stage name -> one line, for `doit list`
    MEMORY_MB   stage name -> {arch: MB} a task needs before it was measured (optional; Dask builds)

and the run functions its nodes name as actions.
"""
from __future__ import annotations

import functools
import importlib
import json


@functools.cache
def registry() -> dict:
    """backend name -> module, in the order compile.BACKENDS lists them."""
    from compile import BACKENDS

    found = {}
    for module_name in BACKENDS:
        module = importlib.import_module(module_name)
        if module.NAME in found:
            raise ValueError(f"{module_name} and {found[module.NAME].__name__} both call themselves {module.NAME!r}")
        found[module.NAME] = module
    return found


@functools.cache
def by_target() -> dict:
    """target name -> backend module."""
    table = {}
    for module in registry().values():
        for target in module.TARGETS:
            if target in table:
                raise ValueError(f"target {target!r} is claimed by {table[target].NAME} and {module.NAME}")
            table[target] = module
    return table


@functools.cache
def export_stages() -> list:
    """The export stage modules (export.EXPORT_STAGES), in build order."""
    from export import EXPORT_STAGES

    return [importlib.import_module(m) for m in EXPORT_STAGES]


def stage_docs() -> dict:
    """stage name -> one line, from every export stage and backend."""
    docs = {}
    for module in [*export_stages(), *registry().values()]:
        docs.update(module.STAGE_DOCS)
    return docs


def toolchain(name: str, config=None):
    """The toolchain `name`: "python" (the export stages' libraries) or a backend's, as configured
    in `config` (models.yaml's `toolchains.<name>` block). Found once per process."""
    from buildplan.toolchains import PYTHON

    if name == PYTHON:
        return _python()
    settings = (config.toolchains.get(name) if config else None) or {}
    return _backend_toolchain(name, json.dumps(settings, sort_keys=True))


@functools.cache
def _python():
    from buildplan.toolchains import python_libs
    from export import PYTHON_LIBS

    return python_libs(PYTHON_LIBS)


@functools.cache
def _backend_toolchain(name: str, settings_json: str):
    from buildplan.toolchains import WATCHED

    tc, watched = registry()[name].detect(json.loads(settings_json))
    WATCHED[name] = list(watched)
    return tc


def reset_toolchains():
    """Detect every toolchain again (after an install, or to re-check what a snapshot read)."""
    from buildplan.toolchains import WATCHED

    _python.cache_clear()
    _backend_toolchain.cache_clear()
    WATCHED.clear()


def memory_estimate(stage: str, arch: str | None) -> float | None:
    """MB a task of `stage` needs for a model of `arch` before it was ever measured: what the stage
    or backend module declares in MEMORY_MB ({stage: {arch: MB}}), from the figures in the README."""
    for module in [*export_stages(), *registry().values()]:
        table = getattr(module, "MEMORY_MB", {}).get(stage)
        if table:
            return table.get(arch) or max(table.values())
    return None

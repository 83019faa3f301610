"""Turn the plan into doit tasks. Freshness is ours (records + fingerprints), not doit's."""
from __future__ import annotations

import sys

from buildplan import toolchains
from buildplan.plan import Plan
from buildplan.state import Store

STAGE_DOCS = {
    "checkpoint": "synthetic checkpoint", "onnx": "raw split ONNX graphs (one load)", "simplify": "onnxsim per batch size",
    "transform": "TPU-MLIR top MLIR", "calibrate": "TPU-MLIR INT8 calibration table", "bmodel": "SOPHGO bmodel",
    "om": "Ascend OM",
}


def _fresh(store: Store, node_id: str) -> bool:
    return store.is_fresh(store.plan.nodes[node_id])


# The runner (subprocess, socket, datetime...) is imported only when a task really runs:
# a no-op `doit` never needs it.
def _run(config_path: str, node_id: str):
    from buildplan.runner import run_task

    return run_task(config_path, node_id)


def _clean(config_path: str, node_id: str):
    from buildplan.runner import clean_task

    return clean_task(config_path, node_id)


def _check_toolchain(name: str, config):
    from doit.exceptions import TaskFailed

    tc = toolchains.get(name, config)
    return None if tc.available else TaskFailed(tc.problem)


def available_targets(plan: Plan) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for target, backend in plan.target_backend.items():
        tc = toolchains.get(backend, plan.config)
        if tc.available:
            ok.append(target)
        else:
            skipped[target] = tc.problem
    return ok, skipped


def _report_default(skipped: dict[str, str]):
    for target, why in skipped.items():
        print(f"skipped compile:{target}: {why}", file=sys.stderr)


def generate(plan: Plan, config_path: str):
    store = Store(plan)
    for backend in sorted(set(plan.target_backend.values())):
        tc = toolchains.get(backend, plan.config)
        yield {"basename": f"toolchain:{backend}", "actions": [(_check_toolchain, [backend, plan.config])],
               "uptodate": [tc.available], "doc": f"check that {backend} is installed ({tc.label})", "verbosity": 2}
    for node in plan.nodes.values():
        basename, name = node.id.split(":", 1)
        task_dep = list(node.deps)
        if node.toolchain in ("tpu_mlir", "atc"):
            task_dep.insert(0, f"toolchain:{node.toolchain}")
        yield {
            "basename": basename, "name": name,
            "actions": [(_run, [config_path, node.id])],
            "task_dep": task_dep,
            # (function, args), not a partial: doit inspects each uptodate's signature, twice as
            # slow for a partial
            "uptodate": [(_fresh, [store, node.id])],
            "targets": [f"{plan.root}/{o}" for o in node.outputs],
            "clean": [(_clean, [config_path, node.id])],
            "doc": f"{STAGE_DOCS[node.stage]}: {', '.join(node.outputs[:1])}{' ...' if len(node.outputs) > 1 else ''}",
        }
    for group, members in sorted(plan.groups.items()):
        deps = list(members)
        target = group.split(":", 1)[1]
        if group.startswith("compile:"):
            deps.insert(0, f"toolchain:{plan.target_backend[target]}")
        what = "every artifact for" if group.startswith("compile:") else "checkpoint, raw and per-batch ONNX of"
        yield {"basename": group, "actions": None, "task_dep": deps, "doc": f"{what} {target}"}
    ok, skipped = available_targets(plan)
    yield {"basename": "default",
           "actions": [(_report_default, [skipped])] if skipped else None,
           "task_dep": [g for g in plan.groups if g.startswith("export:")] + [f"compile:{t}" for t in ok],
           "doc": "everything this machine can build (skipped targets are listed)", "verbosity": 2}

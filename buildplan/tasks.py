"""Turn the plan into doit tasks. Freshness is ours (records + fingerprints), not doit's.

Imports here stay light: on the no-op fast path (buildplan/snapshot.py) tasks are made from data
and the plan, the state and the toolchains are loaded only if doit asks about a task.
"""
from __future__ import annotations

import sys

def available_targets(plan) -> tuple[list[str], dict[str, str]]:
    from buildplan import backends

    ok, skipped = [], {}
    for target, backend in plan.target_backend.items():
        tc = backends.toolchain(backend, plan.config)
        if tc.available:
            ok.append(target)
        else:
            skipped[target] = tc.problem
    return ok, skipped


def _report_default(skipped: dict[str, str]):
    for target, why in skipped.items():
        print(f"skipped compile:{target}: {why}", file=sys.stderr)


def _check_toolchain(problem: str):
    from doit.exceptions import TaskFailed

    return TaskFailed(problem)


def task_specs(plan) -> list[dict]:
    """The doit tasks as plain data (JSON-able), so the no-op snapshot can keep them."""
    from buildplan import backends

    docs = backends.stage_docs()
    specs = []
    for backend in sorted(set(plan.target_backend.values())):
        tc = backends.toolchain(backend, plan.config)
        specs.append({"basename": f"toolchain:{backend}", "problem": None if tc.available else tc.problem,
                      "doc": f"check that {backend} is installed ({tc.label})"})
    for node in plan.nodes.values():
        basename, name = node.id.split(":", 1)
        task_dep = list(node.deps)
        if node.toolchain in plan.target_backend.values():  # a backend's, which may be missing
            task_dep.insert(0, f"toolchain:{node.toolchain}")
        specs.append({
            "basename": basename, "name": name, "task_dep": task_dep,
            "targets": [f"{plan.root}/{o}" for o in node.paths],
            "doc": f"{docs[node.stage]}: {node.main_output}{' ...' if len(node.outputs) > 1 else ''}",
        })
    for group, members in sorted(plan.groups.items()):
        deps = list(members)
        target = group.split(":", 1)[1]
        if group.startswith("compile:"):
            deps.insert(0, f"toolchain:{plan.target_backend[target]}")
        what = "every artifact for" if group.startswith("compile:") else "checkpoint, raw and per-batch ONNX of"
        specs.append({"basename": group, "task_dep": deps, "doc": f"{what} {target}"})
    ok, skipped = available_targets(plan)
    specs.append({"basename": "default", "skipped": skipped,
                  "task_dep": [g for g in plan.groups if g.startswith("export:")] + [f"compile:{t}" for t in ok],
                  "doc": "everything this machine can build (skipped targets are listed)"})
    return specs


def to_doit(specs: list[dict], config_path: str, actions, fresh=frozenset()):
    """doit task dicts. Nodes in `fresh` are known up to date (the no-op snapshot); the others are
    checked when doit asks, against records and fingerprints. `actions` has the functions doit
    calls with (config_path, node_id): run, clean, fresh (the session's)."""
    for spec in specs:
        basename = spec["basename"]
        if "name" in spec:
            node_id = f"{basename}:{spec['name']}"
            yield {
                **spec, "actions": [(actions.run, [config_path, node_id])],
                # (function, args), not a partial: doit inspects each uptodate's signature, twice as
                # slow for a partial
                "uptodate": [True] if node_id in fresh else [(actions.fresh, [config_path, node_id])],
                "clean": [(actions.clean, [config_path, node_id])],
            }
        elif basename.startswith("toolchain:"):
            problem = spec["problem"]
            yield {"basename": basename, "actions": [(_check_toolchain, [problem])] if problem else None,
                   "uptodate": [problem is None], "doc": spec["doc"], "verbosity": 2}
        elif basename == "default":
            skipped = spec["skipped"]
            yield {"basename": basename, "actions": [(_report_default, [skipped])] if skipped else None,
                   "task_dep": spec["task_dep"], "doc": spec["doc"], "verbosity": 2}
        else:
            yield {**spec, "actions": None}

"""Expand a validated Config into the build graph: concrete artifact nodes, as data.

Pure and fast: no torch/onnx import, no file reads beyond the stage modules' own imports and
the stat-keyed code memo. dodo.py, the stale report, nightly and the tests all share this one
expansion. The core names no stage and no backend: it loops over their registries.
"""
from __future__ import annotations

from buildplan import codedeps
from buildplan.backends import export_stages, registry
from buildplan.config import Config, Model
from buildplan.core import Node
from export.presets import resolve_dims


class Plan:
    def __init__(self, config: Config):
        self.config = config
        self.nodes: dict[str, Node] = {}
        self.groups: dict[str, list[str]] = {}  # "compile:bm1684x" -> node ids
        self.target_backend: dict[str, str] = {}  # target name -> backend (toolchain) name

    @property
    def root(self) -> str:
        return self.config.artifacts

    def add(self, node: Node, *groups: str) -> Node:
        """Add a node; its code is the import closure of its action's module."""
        node = node._replace(code=codedeps.closure(node.action.split(":")[0]))
        existing = self.nodes.get(node.id)
        if existing is not None and existing != node:
            raise ValueError(f"two different nodes share the id {node.id}")
        self.nodes[node.id] = node
        for g in groups:
            members = self.groups.setdefault(g, [])
            if node.id not in members:
                members.append(node.id)
        return node

    def closure(self, ids) -> list[str]:
        """ids plus everything upstream of them, dependencies first."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(i):
            if i in seen:
                return
            seen.add(i)
            for d in self.nodes[i].deps:
                visit(d)
            order.append(i)

        for i in ids:
            visit(i)
        return order


def build_plan(config: Config) -> Plan:
    plan = Plan(config)
    backends = registry()
    for model in config.models:
        dims = model_dims(model)
        exported = None  # each export stage declares its nodes from what the previous one made
        for stage in export_stages():
            exported = stage.declare(plan, model, dims, exported)
        for target in model.targets:
            plan.target_backend[target.name] = target.backend
            backends[target.backend].declare(plan, model, dims, target, exported)
    return plan


def model_dims(model: Model) -> dict:
    return resolve_dims(model.arch, model.task, model.image_size)

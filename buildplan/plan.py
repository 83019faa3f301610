"""Expand a validated Config into the build graph: concrete artifact nodes, as data.

Pure and fast: no torch/onnx import, no file reads beyond the stage modules' own imports.
dodo.py, the stale report, nightly and the tests all share this one expansion.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

from buildplan.config import Config, Model
from export.presets import resolve_dims


class Node(NamedTuple):  # a NamedTuple, not a dataclass: cheaper to define (no-op speed)
    id: str  # also the doit task name, e.g. "bmodel:itm.blip_itm.bm1684x.F32.1b"
    stage: str  # checkpoint | onnx | simplify | transform | calibrate | bmodel | om
    model: str
    outputs: tuple[str, ...]  # paths relative to the artifacts root
    action: str  # "module:function" that builds it
    code: tuple[str, ...]  # repo-relative source files whose content is part of the fingerprint
    deps: tuple[str, ...] = ()  # upstream node ids
    sources: tuple[str, ...] = ()  # absolute paths of external inputs (a user's checkpoint)
    params: dict = {}  # never mutated; everything else the output depends on (JSON-able)
    toolchain: str | None = None  # "python" | "tpu_mlir" | "atc"
    labels: dict = {}  # never mutated; graph / batch / target / precision, for reports

    def __hash__(self):
        return hash(self.id)


class Plan:
    def __init__(self, config: Config):
        self.config = config
        self.nodes: dict[str, Node] = {}
        self.groups: dict[str, list[str]] = {}  # "compile:bm1684x" -> node ids
        self.target_backend: dict[str, str] = {}

    @property
    def root(self) -> str:
        return self.config.artifacts

    def add(self, node: Node, *groups: str) -> Node:
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


# The stage modules, in build order. Each exposes declare(plan, model, dims, ...).
STAGES = ("export.synthetic", "export.stage", "export.simplify", "compile.tpu_mlir", "compile.atc")


def build_plan(config: Config) -> Plan:
    plan = Plan(config)
    checkpoint_stage, export_stage, simplify_stage, tpu_stage, atc_stage = (importlib.import_module(m) for m in STAGES)
    for model in config.models:
        dims = model_dims(model)
        ckpt = checkpoint_stage.declare(plan, model)
        onnx = export_stage.declare(plan, model, dims, ckpt)
        for target in model.targets:
            plan.target_backend[target.name] = target.backend
            stage = tpu_stage if target.backend == "tpu_mlir" else atc_stage
            stage.declare(plan, model, dims, target, onnx, simplify_stage)
    return plan


def model_dims(model: Model) -> dict:
    return resolve_dims(model.arch, model.task, model.image_size)


def graph_batch_sizes(model: Model) -> dict[str, list[int]]:
    """Every batch size any target wants of each graph, sorted."""
    wanted: dict[str, set[int]] = {g: set() for g in model.graphs}
    for t in model.targets:
        for g in t.graphs:
            wanted[g].update(t.batch_sizes)
    return {g: sorted(b) for g, b in wanted.items()}

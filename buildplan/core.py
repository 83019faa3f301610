"""What the build core and every stage share: the build graph's node, the error hierarchy and
the vocabulary a backend declares its settings in.

Stages and backends import this module (and buildplan.files), never the runner or the plan:
layers point one way. It imports nothing of the project.
"""
from __future__ import annotations

from typing import Any, NamedTuple

PYTHON = "python"  # the export stages' toolchain: the Python libraries they run on


class Node(NamedTuple):  # a NamedTuple, not a dataclass: cheaper to define (no-op speed)
    id: str  # also the doit task name, e.g. "bmodel:itm.blip_itm.bm1684x.F32.1b"
    stage: str  # what kind of step: checkpoint, onnx, simplify, or a backend's own stage names
    model: str
    outputs: dict  # role -> path relative to the artifacts root ("onnx", "reference", "bmodel"...); never mutated
    action: str  # "module:function" that builds it
    deps: tuple[str, ...] = ()  # upstream node ids
    sources: tuple[str, ...] = ()  # absolute paths of external inputs (a user's checkpoint)
    params: dict = {}  # never mutated; everything else the output depends on (JSON-able)
    toolchain: str | None = None  # "python" (the export stages' libraries) or a backend's toolchain
    labels: dict = {}  # never mutated; graph / batch / target / precision, for reports
    code: tuple[str, ...] = ()  # repo-relative files the action runs: filled in by the plan, derived

    def __hash__(self):
        return hash(self.id)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.outputs.values())

    @property
    def main_output(self) -> str:
        """The output a report shows for the node: its first."""
        return next(iter(self.outputs.values()))


# --- errors -------------------------------------------------------------------------------
class BuildError(Exception):
    """A failure the build explains itself: its message is shown as is, without a traceback."""


class ConfigError(BuildError):
    """A mistake in models.yaml, found before any work starts."""

    def __init__(self, file: str, field: str, problem: str, fix: str = ""):
        self.file, self.field, self.problem, self.fix = file, field, problem, fix
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        msg = f"{where}: {self.problem}"
        return msg + (f"\n  fix: {self.fix}" if self.fix else "")


class StageError(BuildError):
    """A stage could not make its artifact (a toolchain command failed, an output is missing).
    `finding`: what the stage found out about the failure (e.g. the layer where a quantized model
    parts from its float one), kept in the failure marker for reports."""

    def __init__(self, message: str = "", finding: dict | None = None):
        super().__init__(message)
        self.finding = finding


class GateError(StageError):
    """An artifact was made but its numbers are not those of its reference."""


class CheckpointError(StageError):
    """A checkpoint cannot be read as the model it is declared to be."""


# --- what a backend declares ------------------------------------------------------------------
FLAG_PATTERN = r"--[a-z_0-9]+=\S.*"  # one extra tool flag, as written in models.yaml (a "flags" setting)

class Setting(NamedTuple):
    """One key a backend's target block accepts in models.yaml. The validator and the JSON Schema
    are both made from these."""
    key: str
    kind: str  # "bool" | "int" | "str" | "choices" (a list of distinct allowed strings) | "flags" (graph -> ["--f=v"])
    help: str
    default: Any = None  # a value, or a function of the target name
    allowed: Any = None  # "str" / "choices": a tuple, or a function of the target name giving one
    minimum: int | None = None  # "int"
    maximum: int | None = None
    unit: str = ""  # "int": shown in messages ("MiB")
    axis: bool = False  # "choices": each value is a separate artifact (precisions)
    check: Any = None  # "flags": function(flag) -> (problem, fix) or None

    def default_for(self, target: str):
        return self.default(target) if callable(self.default) else self.default

    def allowed_for(self, target: str | None):
        if callable(self.allowed):
            return self.allowed(target) if target is not None else None
        return self.allowed

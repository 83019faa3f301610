"""models.schema.json: a JSON Schema of models.yaml, made from what the core and the backends
declare, for editors (the YAML language server completes and checks as one types).

The validator in buildplan/config.py stays the authority (its errors name the field and the
fix); this is documentation and editor help. Regenerate with `python -m buildplan.schema`; a
test keeps the committed file current.
"""
from __future__ import annotations

import json
import sys

from buildplan import files
from buildplan.backends import registry
from buildplan.cache import MODES
from buildplan.config import (BATCH_SIZES, CALIBRATION_FIELDS, CHANNEL_PATTERN, DEFAULT_ARTIFACTS, DEFAULT_BATCH_SIZES,
                              DEFAULT_CHANNEL, DEFAULT_SAMPLES, NAME_PATTERN, SAMPLES)
from buildplan.core import FLAG_PATTERN, Setting
from buildplan.files import LAYOUT_DIRS
from export.presets import ARCHS, TASKS
from export.specs import graphs_for_task

SCHEMA_FILE = "models.schema.json"


def _setting(s: Setting, target: str | None) -> dict:
    default = s.default_for(target) if target else (None if callable(s.default) else s.default)
    allowed = s.allowed_for(target)
    if s.kind == "bool":
        out = {"type": "boolean"}
    elif s.kind == "int":
        out = {"type": "integer", **({"minimum": s.minimum} if s.minimum is not None else {}),
               **({"maximum": s.maximum} if s.maximum is not None else {})}
    elif s.kind == "str":
        out = {"type": "string", **({"enum": list(allowed)} if allowed else {})}
    elif s.kind == "path":
        out = {"type": "string"}
    elif s.kind == "choices":
        out = {"type": "array", "minItems": 1, "uniqueItems": True,
               "items": {"type": "string", **({"enum": list(allowed)} if allowed else {})}}
    elif s.kind == "flags":
        out = {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string",
                                                                                   "pattern": f"^{FLAG_PATTERN}$"}}}
    else:
        raise ValueError(f"setting {s.key}: unknown kind {s.kind!r}")
    out["description"] = s.help
    if default is not None and not callable(default):
        out["default"] = list(default) if isinstance(default, tuple) else default
    return out


def _target_block(backend, target: str, graph_names: list[str]) -> dict:
    block = {
        "type": "object", "additionalProperties": False,
        "description": f"{target}: built by {backend.LABEL}",
        "properties": {
            "graphs": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": graph_names},
                       "description": "which of the model's graphs (default: all)"},
            "batch_sizes": {"type": "array", "minItems": 1, "uniqueItems": True,
                            "items": {"type": "integer", "minimum": BATCH_SIZES[0], "maximum": BATCH_SIZES[1]},
                            "default": list(DEFAULT_BATCH_SIZES)},
            **{s.key: _setting(s, target) for s in backend.SETTINGS},
        },
    }
    return {"anyOf": [block, {"type": "array", "minItems": 1, "items": block}, {"type": "null"}]}


def schema() -> dict:
    graph_names = sorted({g for task in TASKS for g in graphs_for_task(task)})
    targets = {t: _target_block(b, t, graph_names) for b in registry().values() for t in b.TARGETS}
    toolchains = {name: {"type": "object", "additionalProperties": False,
                         "properties": {s.key: _setting(s, None) for s in b.TOOLCHAIN_SETTINGS}}
                  for name, b in registry().items() if getattr(b, "TOOLCHAIN_SETTINGS", ())}
    model = {
        "type": "object", "additionalProperties": False, "required": ["name", "task", "checkpoint", "targets"],
        "properties": {
            "name": {"type": "string", "pattern": f"^{NAME_PATTERN}$", "not": {"enum": list(LAYOUT_DIRS)},
                     "description": "names the artifacts' folder"},
            "task": {"enum": list(TASKS)},
            "checkpoint": {
                "description": "a .pth path, a transformers save_pretrained() folder, or a synthetic one",
                "anyOf": [
                    {"type": "string"},
                    {"type": "object", "additionalProperties": False, "required": ["path"],
                     "properties": {"path": {"type": "string"}}},
                    {"type": "object", "additionalProperties": False, "required": ["synthetic"],
                     "properties": {"synthetic": {"enum": list(ARCHS)}, "seed": {"type": "integer"}}},
                ]},
            "arch": {"enum": list(ARCHS)},
            "image_size": {"type": "integer", "minimum": 1},
            "graphs": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"enum": graph_names}},
            "calibration": {"type": "object", "additionalProperties": False, "properties": {
                field: {"description": what, **({"type": "integer", "minimum": SAMPLES[0], "maximum": SAMPLES[1],
                                                 "default": DEFAULT_SAMPLES} if field == "samples" else {"type": "string"})}
                for field, what in CALIBRATION_FIELDS.items()}},
            "targets": {"type": "object", "minProperties": 1, "additionalProperties": False, "properties": targets},
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "models.yaml of the BLIP compile build",
        "description": "Generated by `python -m buildplan.schema` from the core's and the backends' declared settings.",
        "type": "object", "additionalProperties": False, "required": ["models"],
        "properties": {
            "artifacts": {"type": "string", "default": DEFAULT_ARTIFACTS, "minLength": 1,
                          "description": "a folder of its own (a leading ~ is your home folder; $VARIABLES are not expanded)"},
            "toolchains": {"type": "object", "additionalProperties": False, "properties": toolchains},
            "cache": {"type": "object", "additionalProperties": False,
                      "description": "the shared artifact cache (BLIPC_CACHE_URL / BLIPC_CACHE_MODE override)",
                      "properties": {
                          "url": {"type": "string", "description": "s3://bucket/prefix, or a directory"},
                          "mode": {"enum": list(MODES), "description": "write: CI and nightly machines; read: developers"},
                          "required": {"type": "boolean", "description": "fail instead of building locally when unreachable"}}},
            "releases": {"type": "object", "additionalProperties": False,
                         "description": "where `doit publish` writes releases and `doit fetch` reads them "
                                        "(BLIPC_RELEASES_URL overrides the url)",
                         "properties": {
                             "url": {"type": "string", "description": "s3://bucket/prefix, or a directory"},
                             "channel": {"type": "string", "pattern": f"^{CHANNEL_PATTERN}$", "default": DEFAULT_CHANNEL,
                                         "description": "the channel a publish goes to (its `latest` moves)"},
                             "keep": {"type": "integer", "minimum": 1,
                                      "description": "after a publish, keep this many versions of the channel"}}},
            "models": {"type": "array", "minItems": 1, "items": model},
        },
    }


def render() -> str:
    return json.dumps(schema(), indent=1) + "\n"


if __name__ == "__main__":
    out = files.REPO / SCHEMA_FILE
    out.write_text(render())
    print(f"wrote {out}", file=sys.stderr)

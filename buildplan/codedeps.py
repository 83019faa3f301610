"""Which project source files an action runs: the code part of every fingerprint, derived.

From the action's module, follow every import of a project module (top-level or inside a
function: stages import their heavy helpers lazily) and every sibling `*.py` file the module
names as a string (a script it runs in a toolchain's Python, e.g. compile/cmodel_runs.py).
Package `__init__.py` files count only when the package itself is imported: they hold the stage
and backend registries, which change what is built, not how.

Each file's direct references are memoised by its stat key (on disk, shared by processes), the
closures once per process: a full plan stats the project's files and parses only edited ones.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

from buildplan import files
from buildplan.files import CODE_DIRS, cache_dir, read_memo, stat_key, write_memo

_MEMO_FORMAT = 1
_direct: dict[str, list[str]] = {}  # repo-relative file -> the project files it references
_memo: dict | None = None
_memo_dirty = False


def _module_file(module: str) -> str | None:
    """'export.gates' -> 'export/gates.py' (or the package's __init__.py); None outside the project."""
    parts = module.split(".")
    if parts[0] not in CODE_DIRS:
        return None
    base = "/".join(parts)
    for rel in (f"{base}.py", f"{base}/__init__.py"):
        if (files.REPO / rel).is_file():
            return rel
    return None


def _references(rel: str, source: str) -> list[str]:
    tree = ast.parse(source, filename=rel)
    package = rel.rsplit("/", 1)[0].replace("/", ".")
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [m for a in node.names if (m := _module_file(a.name))]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # `from compile import cmodel_runs` imports a module
                m = _module_file(f"{base}.{a.name}") or _module_file(base)
                if m:
                    found.append(m)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py") \
                and "/" not in node.value and (files.REPO / rel).with_name(node.value).is_file():
            found.append(str(Path(rel).with_name(node.value)))
    return sorted(set(found) - {rel})


def _load_memo() -> dict:
    global _memo
    if _memo is None:
        memo = read_memo(cache_dir() / "code-deps.json") or {}
        _memo = memo if memo.get("format") == _MEMO_FORMAT and isinstance(memo.get("files"), dict) else \
            {"format": _MEMO_FORMAT, "files": {}}
    return _memo


def direct(rel: str) -> list[str]:
    global _memo_dirty
    if rel not in _direct:
        key = stat_key(files.REPO / rel)
        hit = _load_memo()["files"].get(rel)
        if isinstance(hit, dict) and hit.get("stat") == (list(key) if key else None) and isinstance(hit.get("refs"), list):
            _direct[rel] = hit["refs"]
        else:
            _direct[rel] = _references(rel, (files.REPO / rel).read_text())
            _load_memo()["files"][rel] = {"stat": list(key) if key else None, "refs": _direct[rel]}
            _memo_dirty = True
    return _direct[rel]


@functools.cache
def closure(module: str) -> tuple[str, ...]:
    """The repo-relative files module `module` runs, itself included, sorted."""
    start = _module_file(module)
    if start is None:
        raise ValueError(f"{module} is not a project module")
    seen, todo = {start}, [start]
    while todo:
        for ref in direct(todo.pop()):
            if ref not in seen:
                seen.add(ref)
                todo.append(ref)
    _save_memo()
    return tuple(sorted(seen))


def _save_memo() -> None:
    global _memo_dirty
    if _memo_dirty:
        try:
            write_memo(cache_dir() / "code-deps.json", _memo)
        except OSError:
            pass  # a read-only cache: parse again next time
        _memo_dirty = False


def reset() -> None:
    """Forget what this process learnt (the snapshot re-derives everything after a run)."""
    _direct.clear()
    closure.cache_clear()

"""How the pieces are wired (issue 22): one checkout's environment never runs another checkout's
build; the layers point one way, with no import cycle."""
import pytest
import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO, repo_copy

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent


def test_another_checkouts_environment_is_refused(tmp_path):
    """A .venv made in checkout A (an editable install) silently built A's models.yaml with A's
    code when run in checkout B."""
    other = repo_copy(tmp_path / "other-checkout")
    proc = subprocess.run([str(BIN / "doit"), "list"], cwd=other, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert str(other) in proc.stderr and str(REPO) in proc.stderr and "./bootstrap.sh" in proc.stderr
    assert proc.stdout == ""


PACKAGES = ("buildplan", "export", "compile")
# What a stage (export/*, compile/*) may use of the core: its primitives and toolchain detection,
# never the engine (plan, state, runner, ...), which loops over the stages.
CORE_API = {"buildplan", "buildplan.core", "buildplan.env", "buildplan.files", "buildplan.toolchains"}
# What the engine may import of export/ and compile/: the model declarations (pure data) and, in
# the registry alone, the packages that list the stages and backends.
DECLARATIONS = {"export.presets", "export.specs", "export.datasets"}
REGISTRY = ("buildplan.backends", {"export", "compile"})


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1]) if rel.name == "__init__" else ".".join(rel.parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, lazy (function-level) imports included."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from buildplan import runner` imports the module buildplan.runner
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t.split(".")[0] in PACKAGES and t in modules}
        graph[name] = found - {name}
    return graph


def test_import_graph_has_no_cycle_and_no_layer_points_up():
    graph = import_graph()
    assert "buildplan.executor" in graph["buildplan.session"] and "buildplan.runner" in graph["buildplan.executor"]
    # cycles: a depth-first search that reports the first back edge as a path
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    wrong = []
    for m, deps in graph.items():
        if m.split(".")[0] in ("export", "compile"):
            wrong += [f"{m} -> {d} (a stage uses the engine)" for d in deps
                      if d.startswith("buildplan") and d not in CORE_API]
        else:
            allowed = DECLARATIONS | (REGISTRY[1] if m == REGISTRY[0] else set())
            wrong += [f"{m} -> {d} (the engine names a stage)" for d in deps
                      if d.split(".")[0] in ("export", "compile") and d not in allowed]
    assert not wrong, "\n".join(wrong)


def test_the_import_graph_test_can_fail(monkeypatch):
    """The check above sees a cycle and a layer pointing up when there is one."""
    graph = import_graph()
    graph["buildplan.core"] = {"buildplan.runner"}
    graph["compile.atc"] = graph["compile.atc"] | {"buildplan.state"}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    try:
        test_import_graph_has_no_cycle_and_no_layer_points_up()
    except AssertionError as e:
        assert "import cycle" in str(e) and "buildplan.core" in str(e)
    else:
        raise AssertionError("a cycle went unseen")
    graph["buildplan.core"] = set()
    try:
        test_import_graph_has_no_cycle_and_no_layer_points_up()
    except AssertionError as e:
        assert "compile.atc -> buildplan.state" in str(e)
    else:
        raise AssertionError("a stage using the engine went unseen")


def test_the_old_cache_variable_still_works_and_says_so_once(tmp_path):
    """BLIPC_CACHE moved the memo folder and the toolchain at once; BLIPC_MEMO_DIR and
    BLIPC_TOOLCHAIN_DIR now say which, and the shared cache is BLIPC_CACHE_URL."""
    import os

    import yaml

    cfg = tmp_path / "models.yaml"
    cfg.write_text(yaml.safe_dump({"artifacts": str(tmp_path / "artifacts"), "models": [
        {"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny"}, "graphs": ["BLIP_text"],
         "targets": {"ascend310p3": {"batch_sizes": [1]}}}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIPC_")}
    proc = subprocess.run([str(BIN / "doit"), "list", f"config={cfg}"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "BLIPC_CACHE": str(tmp_path / "old")}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("BLIPC_CACHE is deprecated") == 1 and "BLIPC_MEMO_DIR" in proc.stderr
    assert list((tmp_path / "old").glob("parsed-yaml/*.json"))  # still where the memos go
    proc = subprocess.run([str(BIN / "doit"), "list", f"config={cfg}"], cwd=REPO, capture_output=True, text=True,
                          env={**env, "BLIPC_MEMO_DIR": str(tmp_path / "new")}, timeout=120)
    assert proc.returncode == 0 and "deprecated" not in proc.stderr and list((tmp_path / "new").glob("parsed-yaml/*"))

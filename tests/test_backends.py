"""Backends as plug-ins: the core names none of them, a node's code is derived from what its action
imports, one plan per process, the ONNX Runtime backend's artifacts, the models.yaml schema."""
import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from buildplan import backends, codedeps, config, files, report, session, state
from buildplan.plan import build_plan
from conftest import REPO, STANDIN_BIN, doit, executed, repo_copy, write_config

# Backend and toolchain names, as whole words (`batch` is not `atc`, `ascending` not `ascend`).
BACKEND_WORD = re.compile(r"(?<![a-z])(tpu_mlir|tpu-mlir|atc|bm168\w*|ascend|onnxruntime|ort)(?![a-z])", re.I)


def _code_words(path):
    """Identifiers and string literals of a module, without its docstrings (comments are not in the AST)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            yield n.lineno, n.value
        for field in ("id", "attr", "name", "arg", "asname", "module"):
            value = getattr(n, field, None)
            if isinstance(value, str):
                yield getattr(n, "lineno", 0), value


def test_the_core_names_no_backend_or_toolchain():
    found = [f"{p.name}:{line}: {word!r}" for p in sorted((REPO / "buildplan").glob("*.py"))
             for line, word in _code_words(p) if BACKEND_WORD.search(word)]
    assert not found, "backend names in buildplan/:\n" + "\n".join(found)


def test_the_check_itself_finds_backend_names(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text('"""tpu_mlir in a docstring is fine"""\n# atc in a comment too\n'
                      'def f(batch):\n    return run_atc(batch, "bm1684x") + ascending\n')
    assert sorted(w for _, w in _code_words(sample) if BACKEND_WORD.search(w)) == ["bm1684x", "run_atc"]


def test_every_target_comes_from_a_backend_module():
    table = backends.by_target()
    assert {b.__name__ for b in table.values()} == {"compile.tpu_mlir", "compile.atc", "compile.ort"}
    for b in backends.registry().values():  # what the registry documents, each backend declares
        for attr in ("NAME", "LABEL", "TARGETS", "SETTINGS", "STAGE_DOCS", "detect", "declare"):
            assert hasattr(b, attr), f"{b.__name__} lacks {attr}"


def test_code_is_the_import_closure_of_the_action():
    plan = build_plan(config.load(REPO / "models.yaml"))
    by_stage = {}
    for node in plan.nodes.values():
        by_stage.setdefault(node.stage, set()).add(node.code)
    # the acceptance (gates, reference, acceptance) is code of every artifact accepted with it
    for stage in ("transform", "bmodel", "calibrate", "ort", "simplify", "onnx"):
        for code in by_stage[stage]:
            assert "export/gates.py" in code, (stage, code)
    for code in by_stage["bmodel"]:
        assert {"compile/tpu_mlir.py", "compile/acceptance.py", "compile/cmodel_runs.py", "export/reference.py",
                "export/decoding.py", "buildplan/core.py"} <= set(code)
        assert "export/graphs.py" not in code  # compiling does not run the exporter
    for code in by_stage["simplify"]:
        assert "export/stage.py" in code
    # nothing of the runner, the reports or the registries
    for code in {c for codes in by_stage.values() for c in codes}:
        assert not {"buildplan/runner.py", "buildplan/nightly.py", "buildplan/plan.py", "compile/__init__.py"} & set(code)


def test_lazy_imports_and_named_scripts_are_followed(tmp_path, monkeypatch):
    repo = repo_copy(tmp_path / "repo")
    (repo / "compile" / "helper_script.py").write_text("from export import presets\n")
    (repo / "compile" / "probe.py").write_text(
        "import os\n\ndef run(node, ctx):\n    from compile.acceptance import accept\n"
        "    return os.path.join(os.path.dirname(__file__), 'helper_script.py')\n")
    monkeypatch.setattr(files, "REPO", repo)
    codedeps.reset()
    try:
        code = codedeps.closure("compile.probe")
    finally:
        monkeypatch.undo()
        codedeps.reset()
    assert {"compile/probe.py", "compile/acceptance.py", "compile/helper_script.py", "export/presets.py",
            "export/gates.py"} <= set(code)


@pytest.fixture(scope="module")
def cpu_build(tmp_path_factory):
    """A small ONNX Runtime + ATC (stand-in) matrix, with the user's own calibration samples."""
    tmp = tmp_path_factory.mktemp("cpu")
    cal = tmp / "calibration"
    cal.mkdir()
    from export.presets import resolve_dims
    from export.samples import make_inputs
    from export.specs import GRAPHS

    dims = resolve_dims("tiny", "retrieval", None)
    for i in range(3):
        np.savez(cal / f"s{i}.npz", **make_inputs(GRAPHS["BLIP_image"], dims, 1, seed=50 + i))
    models = [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 0},
               "graphs": ["BLIP_image", "BLIP_text"], "calibration": {"data": str(cal)},
               "targets": {"cpu": [{"graphs": ["BLIP_image"], "precisions": ["F32", "INT8"]},
                                   {"graphs": ["BLIP_text"], "precisions": ["F32"], "batch_sizes": [2]}],
                           "ascend310p3": {"graphs": ["BLIP_text"]}}}]
    cfg = write_config(tmp / "models.yaml", models, tmp / "artifacts")
    proc = doit(cfg, atc=True)
    return {"cfg": cfg, "root": tmp / "artifacts", "proc": proc, "cal": cal}


def test_cpu_target_builds_ort_format_artifacts_accepted_against_the_reference(cpu_build):
    import onnxruntime as ort

    from export.reference import read_io

    ran = executed(cpu_build["proc"])
    ort_ids = ["ort:r.BLIP_image.cpu.F32.1b", "ort:r.BLIP_image.cpu.INT8.1b", "ort:r.BLIP_text.cpu.F32.2b"]
    assert set(ort_ids) <= set(ran)
    root = cpu_build["root"]
    for node_id in ort_ids:
        rec = json.loads((root / ".state" / f"{files.safe_name(node_id)}.json").read_text())
        path = root / rec["roles"]["ort"]
        assert path.suffix == ".ort" and path.read_bytes()[4:8] == b"ORTM"  # the ORT format's file identifier
        fig = rec["figures"]["ort_vs_onnx"]
        assert fig["cosine"] >= (0.95 if "INT8" in node_id else 0.999), fig
        # the artifact answers as the reference does, loaded as a user would
        graph, batch = ("BLIP_text", 2) if "BLIP_text" in node_id else ("BLIP_image", 1)
        inputs, reference = read_io(root / f"r/onnx/{graph}_bs{batch}.io.npz")
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
        want = next(iter(reference.values()))
        assert got.shape == want.shape and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
    int8 = json.loads((root / ".state" / "ort__r.BLIP_image.cpu.INT8.1b.json").read_text())
    assert int8["calibration"] == {"samples": 3, "synthetic": False, "from_images": False}  # calibration.data
    assert sorted(int8["parts"]["sources"]) == sorted(str(p) for p in cpu_build["cal"].glob("*.npz"))
    assert int8["ort_bytes"] < (root / "r/CPU/BLIP_image_cpu_f32_1b.ort").stat().st_size
    assert "peak_rss_mb" in int8


def test_editing_shared_code_stales_exactly_its_users(cpu_build, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}")
    backends.reset_toolchains()
    plan = build_plan(config.load(cpu_build["cfg"]))
    assert not report.stale_nodes(plan)
    edited = repo_copy(tmp_path / "repo")
    monkeypatch.setattr(files, "REPO", edited)
    codedeps.reset()
    state.code_hash.cache_clear()
    try:
        with open(edited / "export/gates.py", "a") as f:
            f.write("\nTHRESHOLD_NOTE = 1\n")
        stale = report.stale_nodes(build_plan(config.load(cpu_build["cfg"])))
        users = {n.id for n in plan.nodes.values() if "export/gates.py" in n.code}
        assert any(i.startswith("ort:") for i in users) and not any(i.startswith(("om:", "checkpoint:")) for i in users)
        for node_id, reasons in stale.items():
            texts = [r["text"] for r in reasons]
            if node_id in users:
                assert "build code changed: export/gates.py" in texts, texts
            else:  # the OM does not run it: stale only as its simplified graph is
                assert node_id.startswith("om:") and [r["kind"] for r in reasons] == ["upstream_stale"], reasons
        assert users <= set(stale) and "checkpoint:r" not in stale
        # an unrelated module of the core: nothing
        (edited / "export/gates.py").write_text((REPO / "export/gates.py").read_text())
        with open(edited / "buildplan/nightly.py", "a") as f:
            f.write("\nUNRELATED = 1\n")
        state.code_hash.cache_clear()
        assert report.stale_nodes(build_plan(config.load(cpu_build["cfg"]))) == {}
    finally:
        monkeypatch.undo()
        codedeps.reset()
        backends.reset_toolchains()
        state.code_hash.cache_clear()


def test_a_task_runs_on_the_plan_its_process_already_has(tmp_path, monkeypatch):
    from buildplan import plan as plan_module
    from buildplan import runner

    cfg = write_config(tmp_path / "models.yaml", [
        {"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny"}, "graphs": ["BLIP_image"],
         "targets": {"cpu": {}}}], tmp_path / "artifacts")
    cfg_path = str(cfg.resolve())
    session.store_for(cfg_path)  # the plan, expanded once

    def second_plan(*a, **k):
        raise AssertionError("a second plan was expanded in this process")
    monkeypatch.setattr(plan_module, "build_plan", second_plan)
    monkeypatch.setattr(config, "load", second_plan)
    assert runner.run_task(session.store_for(cfg_path), "checkpoint:m") is None
    assert (tmp_path / "artifacts/checkpoints/m.pth").is_file()


def test_schema_is_current_and_the_shipped_configs_follow_it(tmp_path):
    import jsonschema
    import yaml

    from buildplan.schema import SCHEMA_FILE, render

    assert (REPO / SCHEMA_FILE).read_text() == render(), "run: python -m buildplan.schema"
    schema = json.loads(render())
    for shipped in sorted(REPO.glob("models*.yaml")):
        text = shipped.read_text()
        assert text.startswith("# yaml-language-server: $schema=models.schema.json"), shipped.name
        jsonschema.validate(yaml.safe_load(text), schema)
    # every key the config loader takes is in the schema: calibration from images and texts too
    real = yaml.safe_load((REPO / "models.yaml").read_text())
    real["models"][0]["calibration"] = {"samples": 4, "images": "images", "texts": "captions.txt", "tokenizer": "tok"}
    jsonschema.validate(real, schema)
    bad = yaml.safe_load((REPO / "models.yaml").read_text())
    bad["models"][0]["targets"]["cpu"][0]["precisions"] = ["F16"]  # a precision ONNX Runtime has no path for
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_tpu_mlir_tests_say_why_they_skip_when_it_is_absent(tmp_path):
    env = {**os.environ, "BLIPC_TPU_MLIR": str(tmp_path / "nowhere")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_decoders.py",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "skipped" in proc.stdout and "TPU-MLIR not found" in proc.stdout, proc.stdout[-2000:]

"""In-process unit tests of the core (the fast tier with test_config*, test_plan and test_wiring):
records, memos, state, the cache's directory store, the runner and the console reporter."""
import io
import json
import os
from types import SimpleNamespace

import pytest

from buildplan import files, records, session
from buildplan.core import StageError
from conftest import write_config

pytestmark = pytest.mark.unit

MODEL = [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3}, "graphs": ["BLIP_text"],
          "targets": {"ascend310p3": {"batch_sizes": [1]}}}]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "memos"))
    cfg = write_config(tmp_path / "models.yaml", MODEL, tmp_path / "artifacts")
    session.reset()
    yield session.store_for(str(cfg.resolve()))
    session.reset()


# --- records -------------------------------------------------------------------------------
def test_a_stage_result_cannot_set_a_record_field():
    """The runner merged a stage's dict flat into the record: a key such as `outputs` silently
    replaced the list of outputs."""
    for key in ("outputs", "fingerprint", "node", "digest", "log", "from_cache"):
        with pytest.raises(StageError, match=key):
            records.StageResult.of({"figures": {}, key: "clobbered"}, "onnx:m")
    kept = records.StageResult.of({"figures": {"a": {"cosine": 1.0}}, "nodes": [3, 2]})
    assert kept.extra == {"nodes": [3, 2]} and kept.acceptance_figure() == {"cosine": 1.0}


def test_record_round_trip_and_damaged_records_read_as_absent():
    result = records.StageResult(figures={"gate": {"match": 1.0}, "vs": {"cosine": 0.99}}, acceptance="vs",
                                 extra={"ort_bytes": 5})
    rec = records.Record(node="n:x", stage="onnx", model="m", fingerprint="f", parts={}, digest="d",
                         outputs={"a.onnx": {"size": 1, "mtime_ns": 2, "sha256": "s"}}, result=result)
    data = json.loads(json.dumps(rec.to_json()))
    assert data["ort_bytes"] == 5 and data["outputs"] == rec.outputs  # flat, as readers expect
    again = records.Record.from_json(data, "n:x")
    assert again == rec and again.result.acceptance_figure() == {"cosine": 0.99}
    assert records.Record.from_json(data, "other:node") is None
    for damaged in ({}, [], None, {**data, "outputs": {"a": {"size": "1"}}}, {**data, "fingerprint": 3},
                    {**data, "figures": []}):
        assert records.Record.from_json(damaged, "n:x") is None


# --- memos ---------------------------------------------------------------------------------
def test_memos_are_signed_and_anything_else_reads_as_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "memos"))
    memo = tmp_path / "memos" / "x.json"
    files.write_memo(memo, {"answer": 42})
    assert files.read_memo(memo) == {"answer": 42}
    head, _, payload = memo.read_bytes().partition(b"\n")
    memo.write_bytes(head + b"\n" + payload.replace(b"42", b"43"))
    assert files.read_memo(memo) is None  # edited
    memo.write_bytes(payload)
    assert files.read_memo(memo) is None  # unsigned (the old format)
    files.write_memo(memo, {"answer": 42})
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "elsewhere"))
    assert files.read_memo(memo) is None  # another key: a memo copied from another machine
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "memos"))
    (tmp_path / "memos" / "memo.key").write_bytes(b"short")
    files._memo_keys.clear()
    assert files.read_memo(memo) is None and len((tmp_path / "memos" / "memo.key").read_bytes()) == 32


# --- state ---------------------------------------------------------------------------------
def test_state_reads_verifies_and_keeps_the_manifest(store):
    from buildplan.runner import run_task

    assert store.read("checkpoint:m") is None and store.manifest_problem() is None
    assert run_task(store, "checkpoint:m") is None
    rec = store.record("checkpoint:m")
    assert rec and rec.stage == "checkpoint" and store.is_fresh(store.plan.nodes["checkpoint:m"])
    assert store.verify(store.plan.nodes["checkpoint:m"]) == [] and store.manifest_problem() is None
    manifest = store.root / files.MANIFEST
    manifest.write_text("[]")
    assert "damaged" in store.manifest_problem()
    manifest.unlink()
    assert "missing" in store.manifest_problem()
    store.write_manifest()
    assert store.manifest_problem() is None
    path = store.record_path("checkpoint:m")
    path.write_text("{")
    assert store.read("checkpoint:m") is None and not store.is_fresh(store.plan.nodes["checkpoint:m"])
    assert "unreadable" in store.verify(store.plan.nodes["checkpoint:m"])[0]


# --- the runner ----------------------------------------------------------------------------
def test_runner_refuses_a_result_that_would_clobber_the_record(store, monkeypatch):
    import export.synthetic

    real = export.synthetic.run
    monkeypatch.setattr(export.synthetic, "run", lambda node, ctx: {**(real(node, ctx) or {}), "outputs": {}})
    from buildplan.runner import run_task

    failed = run_task(store, "checkpoint:m")
    assert failed is not None and "outputs" in str(failed.message)
    assert store.read("checkpoint:m") is None  # nothing committed
    monkeypatch.setattr(export.synthetic, "run", lambda node, ctx: {**(real(node, ctx) or {}), "tensors": 7})
    assert run_task(store, "checkpoint:m") is None
    rec = store.record("checkpoint:m")
    assert rec.result.extra["tensors"] == 7 and list(rec.outputs) == ["checkpoints/m.pth"]


def test_runner_leaves_nothing_fresh_when_the_stage_fails(store, monkeypatch):
    import export.synthetic

    def broken(node, ctx):
        ctx.tmp("checkpoint").write_bytes(b"half")
        raise RuntimeError("the stage broke")
    monkeypatch.setattr(export.synthetic, "run", broken)
    from buildplan.runner import run_task

    failed = run_task(store, "checkpoint:m")
    assert "the stage broke" in failed.message and "log:" in failed.message
    assert store.read("checkpoint:m") is None and not (store.root / "checkpoints" / "m.pth").exists()
    assert store.read_failure("checkpoint:m")["error"].endswith("the stage broke")


# --- the cache's directory store -----------------------------------------------------------
def test_directory_store_entries_are_create_only_and_blobs_verified(tmp_path):
    from buildplan.cache import open_store

    s = open_store(str(tmp_path / "cache"))
    s.check(writing=True)
    assert s.put_entry("k", b"first") and not s.put_entry("k", b"second")  # first writer wins
    assert s.get_entry("k") == b"first" and s.get_entry("absent") is None
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 100)
    sha = files.sha256_file(blob)
    s.put_blob(sha, blob)
    assert s.has_blob(sha, 100) and not s.has_blob(sha, 99)
    with s.open_blob(sha) as f:
        assert f.read() == b"x" * 100
    assert list(s.entries()) == ["k"] and list(s.blobs()) == [(sha, 100)]


# --- the console reporter ------------------------------------------------------------------
def test_reporter_prints_a_line_per_task_and_a_summary(store, monkeypatch):
    from buildplan import console
    from buildplan.runner import run_task

    assert run_task(store, "checkpoint:m") is None
    monkeypatch.setattr(session, "_current", SimpleNamespace(root=str(store.root), skipped_targets=lambda: {
        "ascend310p3": "ATC not found"}))
    out = io.StringIO()
    reporter = console.BuildReporter(out, {})
    task = SimpleNamespace(name="checkpoint:m", actions=[object()], task_dep=[])
    failing = SimpleNamespace(name="onnx:m", actions=[object()], task_dep=["checkpoint:m"])
    reporter.initialize({"checkpoint:m": task, "onnx:m": failing}, ["onnx:m"])
    reporter.execute_task(task)
    reporter.add_success(task)
    reporter.execute_task(failing)
    failure = SimpleNamespace(report=True, get_name=lambda: "TaskFailed",
                              get_msg=lambda: "onnx:m: the gate failed\n  log: artifacts/logs/onnx__m.log")
    reporter.add_failure(failing, failure)
    reporter.complete_run()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith(".  checkpoint:m") and "MiB" in lines[0]
    assert lines[1].startswith("F  onnx:m") and "the gate failed" in lines[1]
    summary = next(line for line in lines if line.startswith("summary:"))
    assert "built 1" in summary and "failed 1" in summary and str(store.root) in summary
    assert any("failed onnx:m: log artifacts/logs/onnx__m.log" in line for line in lines)
    assert any("skipped compile:ascend310p3: ATC not found" in line for line in lines)
    assert os.environ.get("BLIPC_VERBOSE") != "1"


def test_coverage_counts_cells_and_names_each_hole():
    from buildplan.nightly import coverage

    def row(node, status, graph="g", target="cpu", precision="INT8", reason=None):
        return {"node": node, "model": "m", "status": status, "reason": reason,
                "labels": {"graph": graph, "batch": 1, "target": target, "precision": precision}}

    rows = [row("float_layers:a", "built"), row("ort:a", "up to date"),  # one cell, two nodes
            row("ort:b", "failed", graph="h", reason="h INT8: cosine 0.9; first layer off in INT8: L2 (MatMul)\nlog"),
            row("bmodel:c", "skipped", target="bm1684x", precision="F16", reason="an upstream artifact failed"),
            {"node": "transform:g", "model": "m", "status": "failed", "labels": {"graph": "g", "batch": 1}}]
    cov = coverage(rows)
    assert (cov["cells"], cov["accepted"], cov["share"]) == (3, 1, round(1 / 3, 4))
    assert [h["cell"] for h in cov["holes"]] == ["m g bm1684x F16 bs1", "m h cpu INT8 bs1"]
    assert cov["holes"][1]["reason"].endswith("L2 (MatMul)") and cov["holes"][1]["status"] == "failed"

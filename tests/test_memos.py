"""The no-op shortcuts never hide a change: the no-op snapshot, the freshness-verdict memo and the
toolchain identity memo answer from the cache only while everything they depend on is as it
was, and each is shown to really answer from the cache."""
import json
import os
import shutil

import pytest

from buildplan import backends, config, files, snapshot, state, toolchains
from buildplan.files import keep_newest, read_memo
from buildplan.plan import build_plan
from buildplan.state import Store
from compile import tpu_mlir
from conftest import REPO, STANDIN_BIN, doit, executed, repo_copy, write_config


def _model(batch_sizes=(1,), seed=3):
    return [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": seed}, "graphs": ["BLIP_text"],
             "targets": {"ascend310p3": {"graphs": ["BLIP_text"], "batch_sizes": list(batch_sizes)},
                         "bm1684x": {"graphs": ["BLIP_text"], "precisions": ["F32"]}}}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("memo")
    cfg = write_config(d / "models.yaml", _model(), d / "artifacts")
    doit(cfg, "onnx:m")  # on exit it checks every node again and remembers the fresh ones
    return cfg


def _store(cfg):
    backends.reset_toolchains()
    return Store(build_plan(config.load(cfg)))


def _no_full_check(monkeypatch):
    def refuse(self, node):
        raise AssertionError(f"{node.id} was fully checked")
    monkeypatch.setattr(Store, "_check", refuse)


def test_fresh_verdicts_are_remembered_and_used(exported, monkeypatch):
    store = _store(exported)
    remembered = read_memo(store.state_dir / Store.VERDICTS)
    assert set(remembered) == {"checkpoint:m", "onnx:m"}
    _no_full_check(monkeypatch)
    assert store.check(store.plan.nodes["onnx:m"]) == []


def test_output_edited_in_place_is_caught(exported, tmp_path):
    store = _store(exported)
    onnx_node = store.plan.nodes["onnx:m"]
    out = store.root / onnx_node.main_output
    original = out.read_bytes()
    try:
        out.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, new content
        assert [r["kind"] for r in _store(exported).check(onnx_node)] == ["output_modified"]
    finally:
        out.write_bytes(original)
    assert _store(exported).check(onnx_node) == []  # sizes, mtimes differ; the hashes match again


def test_changed_upstream_record_is_caught(exported):
    store = _store(exported)
    rec_path = store.record_path("checkpoint:m")
    original = rec_path.read_text()
    try:
        rec = json.loads(original)
        rec["digest"] = "0" * 64
        rec_path.write_text(json.dumps(rec))
        reasons = _store(exported).check(store.plan.nodes["onnx:m"])
        assert [r["kind"] for r in reasons] == ["upstream"], reasons
    finally:
        rec_path.write_text(original)


def test_edited_build_code_and_other_toolchain_are_caught(exported, tmp_path, monkeypatch):
    node = _store(exported).plan.nodes["onnx:m"]
    monkeypatch.setattr(files, "REPO", repo_copy(tmp_path / "repo", edited="export/stage.py"))
    state.code_hash.cache_clear()
    try:
        assert "code" in {r["kind"] for r in _store(exported).check(node)}
    finally:
        monkeypatch.setattr(files, "REPO", REPO)
        state.code_hash.cache_clear()
    real = backends.toolchain(toolchains.PYTHON)
    other = real._replace(identity={**real.identity, "libs": {**real.identity["libs"], "onnx": "0.0.1"}})
    store = _store(exported)
    monkeypatch.setattr(backends, "_python", lambda: other)
    assert "toolchain" in {r["kind"] for r in store.check(node)}


def _fake_tpu_mlir(root, version, record):
    (root / "bin").mkdir(parents=True, exist_ok=True)
    (root / "bin/model_deploy.py").write_text("# stand-in\n")
    site = root / "lib/python3.10/site-packages"
    for old in site.glob("tpu_mlir-*.dist-info") if site.exists() else ():
        shutil.rmtree(old)
    dist = site / f"tpu_mlir-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "RECORD").write_text(record)


def _detect(root):
    return tpu_mlir.detect({"root": str(root)})[0]


def test_toolchain_identity_memo_follows_reinstalls(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))
    root = tmp_path / "tpu"
    _fake_tpu_mlir(root, "1.2.3", "a,sha256=1,1\n")
    backends.reset_toolchains()
    first = _detect(root)
    assert first.identity["version"] == "1.2.3" and (tmp_path / "cache/toolchains.json").is_file()

    monkeypatch.setattr(tpu_mlir, "identify", lambda *a: pytest.fail("identified again"))
    backends.reset_toolchains()
    assert _detect(root) == first  # from the memo
    monkeypatch.undo()
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "cache"))

    _fake_tpu_mlir(root, "1.2.3", "a,sha256=2,1\n")  # same version, another build (pip reinstall)
    backends.reset_toolchains()
    rebuilt = _detect(root)
    assert rebuilt.identity["version"] == "1.2.3" and rebuilt.identity["build"] != first.identity["build"]
    _fake_tpu_mlir(root, "1.2.4", "a,sha256=2,1\n")
    backends.reset_toolchains()
    assert _detect(root).identity["version"] == "1.2.4"
    backends.reset_toolchains()


def test_cache_folders_keep_only_the_newest(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.json").write_text("{}")
        os.utime(tmp_path / f"{i}.json", ns=(i * 10**9, i * 10**9))
    (tmp_path / ".3.json.x.tmp").write_text("")  # another process's write in flight
    keep_newest(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".3.json.x.tmp", "3.json", "4.json"]


# --- the no-op snapshot ---------------------------------------------------------------------

def _taken(cfg) -> dict:
    backends.reset_toolchains()
    snapshot.take(str(cfg), build_plan(config.load(cfg)))
    snap = snapshot.load(str(cfg))
    assert snap is not None
    return snap


def test_noop_runs_from_the_snapshot_until_something_changes(tmp_path):
    cfg = write_config(tmp_path / "models.yaml", _model(), tmp_path / "artifacts")
    doit(cfg, "onnx:m")
    # the next run replays the snapshot: it does not even import the config module
    replay = doit(cfg, "onnx:m", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert executed(replay) == [] and "nothing to do: 2 artifacts up to date" in replay.stdout
    assert "buildplan.snapshot" in replay.stderr and "buildplan.config" not in replay.stderr
    # a new seed: the full path, which rebuilds exactly the checkpoint and its export
    write_config(cfg, _model(seed=4), tmp_path / "artifacts")
    rebuilt = doit(cfg, "onnx:m", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert "buildplan.config" in rebuilt.stderr
    assert executed(rebuilt) == ["checkpoint:m", "onnx:m"]
    assert executed(doit(cfg, "onnx:m")) == []


def test_snapshot_lists_fresh_artifacts_and_tasks(exported):
    snap = _taken(exported)
    assert {"checkpoint:m", "onnx:m"} <= set(snap["fresh"])
    assert not any(n.startswith(("om:", "bmodel:", "simplify:")) for n in snap["fresh"])
    names = {t["basename"] + (":" + t["name"] if "name" in t else "") for t in snap["tasks"]}
    assert {"onnx:m", "compile:bm1684x", "toolchain:tpu_mlir", "default"} <= names


@pytest.mark.parametrize("change", ["config", "record", "output", "checkpoint_record_replaced", "path_env"])
def test_snapshot_is_void_after_any_change(exported, tmp_path, monkeypatch, change):
    _taken(exported)
    store = _store(exported)
    if change == "config":
        write_config(exported, _model(batch_sizes=(1, 2)), exported.parent / "artifacts")
    elif change == "record":
        path = store.record_path("onnx:m")
        path.write_text(path.read_text())  # same content, rewritten
    elif change == "output":
        out = store.root / store.plan.nodes["onnx:m"].main_output
        out.write_bytes(out.read_bytes())
    elif change == "checkpoint_record_replaced":
        store.commit(store.read("checkpoint:m"))
    elif change == "path_env":
        monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    try:
        assert snapshot.load(str(exported)) is None
    finally:
        write_config(exported, _model(), exported.parent / "artifacts")


def test_snapshot_is_void_when_code_changes(exported, tmp_path, monkeypatch):
    fake_repo = repo_copy(tmp_path / "repo")
    monkeypatch.setattr(files, "REPO", fake_repo)
    _taken(exported)
    with open(fake_repo / "compile/tpu_mlir.py", "a") as f:
        f.write("\n# edited\n")
    assert snapshot.load(str(exported)) is None


def test_snapshot_is_void_when_a_toolchain_appears_or_changes(exported, tmp_path, monkeypatch):
    path_dir = tmp_path / "bin"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", f"{path_dir}{os.pathsep}{os.environ['PATH']}")
    tpu_root = tmp_path / "tpu"
    _fake_tpu_mlir(tpu_root, "1.2.3", "a,sha256=1,1\n")
    monkeypatch.setenv("BLIPC_TPU_MLIR", str(tpu_root))
    _taken(exported)
    shutil.copy(STANDIN_BIN / "atc", path_dir / "atc")  # CANN installed into a folder on PATH
    assert snapshot.load(str(exported)) is None
    _taken(exported)
    _fake_tpu_mlir(tpu_root, "1.2.4", "a,sha256=1,1\n")  # TPU-MLIR upgraded in place
    assert snapshot.load(str(exported)) is None
    backends.reset_toolchains()


def test_snapshot_not_written_when_files_change_while_it_is_taken(exported, monkeypatch):
    _taken(exported)
    snapshot._file(str(exported)).unlink()
    store = _store(exported)
    out = store.root / store.plan.nodes["onnx:m"].main_output
    real = Store.is_fresh

    def racing(self, node):  # a parallel build replaces an output mid-way
        out.write_bytes(out.read_bytes())
        return real(self, node)

    monkeypatch.setattr(Store, "is_fresh", racing)
    snapshot.take(str(exported), store.plan)
    assert not snapshot._file(str(exported)).exists()


def test_transformers_folder_checkpoint_is_fingerprinted_file_by_file(tmp_path):
    from buildplan import report
    from export.loading import new_model
    from export.presets import resolve_dims

    hf = tmp_path / "hf"
    new_model("retrieval", resolve_dims("tiny", "retrieval", None)).save_pretrained(hf)
    model = {"name": "m", "task": "retrieval", "checkpoint": {"path": str(hf)}, "arch": "tiny", "graphs": ["BLIP_text"],
             "targets": {"ascend310p3": {"graphs": ["BLIP_text"], "batch_sizes": [1]}}}
    cfg = write_config(tmp_path / "models.yaml", [model], tmp_path / "artifacts")
    assert executed(doit(cfg, "onnx:m")) == ["onnx:m"]
    assert executed(doit(cfg, "onnx:m")) == []
    weights = next(hf.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one weight changed in place: the folder's own stat key does not move
    weights.write_bytes(bytes(data))
    backends.reset_toolchains()
    reasons = report.stale_nodes(build_plan(config.load(cfg)))["onnx:m"]
    assert [r["kind"] for r in reasons] == ["checkpoint"]
    assert executed(doit(cfg, "onnx:m")) == ["onnx:m"]


def test_pth_checkpoint_run_is_replayed_without_traceback(tmp_path):
    """A model given as a real .pth file: the snapshot stats '<ckpt>.pth/config.json', which raised
    NotADirectoryError at exit, so every run ended in a traceback and none was ever replayed."""
    from export.synthetic import save, synthetic_state_dict

    ckpt = tmp_path / "model_base_retrieval_coco.pth"
    save(synthetic_state_dict("retrieval", "tiny", 5), ckpt)
    model = {"name": "p", "task": "retrieval", "checkpoint": str(ckpt), "arch": "tiny", "graphs": ["BLIP_text"],
             "targets": {"ascend310p3": {"batch_sizes": [1]}}}
    cfg = write_config(tmp_path / "models.yaml", [model], tmp_path / "artifacts")
    first = doit(cfg, "onnx:p")
    assert executed(first) == ["onnx:p"] and "Traceback" not in first.stderr, first.stderr
    replay = doit(cfg, "onnx:p", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert executed(replay) == [] and "Traceback" not in replay.stderr, replay.stderr
    assert "buildplan.snapshot" in replay.stderr and "buildplan.config" not in replay.stderr


@pytest.mark.tpu_mlir
def test_stale_upstream_is_never_replayed_as_fresh(tmp_path):
    """Seed changed, then `doit stale` (which writes the snapshot), then `doit`: every artifact
    downstream of the checkpoint must be rebuilt in that one run. The snapshot recorded each node
    as fresh by its own record alone, so `doit` ran only checkpoint:m and exited 0 with the rest stale."""
    def sophgo_only(seed):
        return [{**_model(seed=seed)[0], "targets": {"bm1684x": {"graphs": ["BLIP_text"], "precisions": ["F32"],
                                                                  "simulate": False}}}]
    cfg = write_config(tmp_path / "models.yaml", sophgo_only(3), tmp_path / "artifacts")
    doit(cfg)
    write_config(cfg, sophgo_only(9), tmp_path / "artifacts")
    assert doit(cfg, "stale", "--check", check=False).returncode == 1
    rebuilt = doit(cfg)
    assert executed(rebuilt) == ["checkpoint:m", "onnx:m", "simplify:m.BLIP_text.bs1", "transform:m.BLIP_text.1b",
                                 "bmodel:m.BLIP_text.bm1684x.F32.1b"]
    assert doit(cfg, "stale", "--check", check=False).returncode == 0

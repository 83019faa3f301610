"""End to end on a small matrix: real export, real TPU-MLIR bmodels (cmodel-validated), the ATC
stand-in for OMs; fingerprints, stale reasons, failures, nightly, locking and kills."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from buildplan import backends, config, files, report, state
from buildplan.plan import build_plan
from conftest import REPO, STANDIN_BIN, doit, executed, repo_copy, write_config
from export.synthetic import save, synthetic_state_dict

pytestmark = pytest.mark.tpu_mlir
SOPHGO = ["bm1684", "bm1684x", "bm1688"]


def models(ckpt, precision_mode=None):
    asc = {"graphs": ["BLIP_text"], "batch_sizes": [1, 2]}
    if precision_mode:
        asc["precision_mode"] = precision_mode
    return [{"name": "r", "task": "retrieval", "checkpoint": str(ckpt), "arch": "tiny",
             "graphs": ["BLIP_text", "blip_itm"],
             "targets": {"ascend310p3": asc, **{c: {"graphs": ["blip_itm"], "precisions": ["F32"]} for c in SOPHGO}}}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("build")
    ckpt = d / "model_retrieval.pth"
    save(synthetic_state_dict("retrieval", "tiny", 0), ckpt)
    cfg = write_config(d / "models.yaml", models(ckpt), d / "artifacts")
    first = doit(cfg, *[f"compile:{t}" for t in ["ascend310p3"] + SOPHGO], atc=True)
    return {"dir": d, "cfg": cfg, "ckpt": ckpt, "first": first, "root": d / "artifacts"}


def plan_of(cfg):
    backends.reset_toolchains()
    return build_plan(config.load(cfg))


def test_builds_every_artifact_and_shares_transform(built):
    ran = executed(built["first"])
    assert ran.count("transform:r.blip_itm.1b") == 1
    assert sorted(t for t in ran if t.startswith("bmodel:")) == sorted(f"bmodel:r.blip_itm.{c}.F32.1b" for c in SOPHGO)
    root = built["root"]
    for c in SOPHGO:
        rec = json.loads((root / ".state" / f"bmodel__r.blip_itm.{c}.F32.1b.json").read_text())
        assert (root / f"r/{c.upper()}/blip_itm_{c}_f32_1b.bmodel").stat().st_size > 0
        sims = rec["figures"]["tpu_mlir"]
        assert rec["simulated"] and [s["compared"].split(" vs ")[0] for s in sims] == [f"blip_itm_{c}_f32_tpu_outputs.npz"]
        # TPU-MLIR pairs tensors by name. The top reference keeps each output under the name the top MLIR
        # returns it by (itm_score_Gather, not the intermediate itm_score_Gather_slice that a name
        # prefix picked before), so its TPU-vs-top check compares the output ...
        assert sims[0]["passed"] and sims[0]["tensors"] == 1
        top = np.load(root / "r/tpu_mlir/blip_itm_1b/blip_itm_top_outputs.npz")
        assert top.files == ["itm_score_Gather"]
        # ... and our cmodel run of the bmodel, checked against the ONNX reference, is what counts.
        log = (root / rec["log"]).read_text(errors="replace")
        assert "model_runner.py --input" in log and f"--model blip_itm_{c}_f32_1b.bmodel" in log
        e2e = rec["figures"]["bmodel_vs_onnx"]
        assert e2e["cosine"] >= 0.999 and e2e["rel_max_abs"] <= 0.01


def test_atc_commands_and_standin_marking(built):
    plan = plan_of(built["cfg"])
    argv = plan.nodes["om:r.BLIP_text.ascend310p3.bs2"].params["argv"]
    assert argv == ["atc", "--framework=5", "--model={model}", "--output={output}", "--input_format=ND",
                    "--input_shape=text_ids:2,12;text_atten_mask:2,12", "--log=error",
                    "--soc_version=Ascend310P3", "--op_precision_mode={ini}"]
    om = built["root"] / "r/Ascend310P3/BLIP_text_bs2.om"
    assert om.read_bytes().startswith(b"BLIPC-ATC-STANDIN")
    rec = json.loads((built["root"] / ".state/om__r.BLIP_text.ascend310p3.bs2.json").read_text())
    assert rec["standin"] is True and "not a real compile" in rec["note"]


def test_second_run_does_nothing_and_manifest_matches_disk(built):
    again = doit(built["cfg"], *[f"compile:{t}" for t in ["ascend310p3"] + SOPHGO], atc=True)
    assert [t for t in executed(again) if ":" in t and not t.startswith("compile:")] == []
    manifest = json.loads((built["root"] / "manifest.json").read_text())
    assert len(manifest["artifacts"]) >= 10
    for entry in manifest["artifacts"]:
        assert state.sha256_file(built["root"] / entry["path"]) == entry["sha256"]


def _stale_ids(cfg, monkeypatch=None):
    return set(report.stale_nodes(plan_of(cfg)))


def test_fingerprint_changes_stale_exactly_the_downstream_closure(built, tmp_path, monkeypatch):
    cfg, plan = built["cfg"], plan_of(built["cfg"])
    monkeypatch.setenv("PATH", f"{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}")
    assert _stale_ids(cfg) == set()
    oms = {n for n in plan.nodes if n.startswith("om:")}
    # a parameter: ATC precision mode
    cfg2 = write_config(tmp_path / "m2.yaml", models(built["ckpt"], "force_fp32"), built["root"])
    stale = report.stale_nodes(plan_of(cfg2))
    assert set(stale) == oms
    assert any("parameter argv changed" in r["text"] for r in stale["om:r.BLIP_text.ascend310p3.bs1"])
    # the toolchain version: a CANN with another version.info
    other = tmp_path / "cann"
    shutil.copytree(STANDIN_BIN.parent.parent, other)
    (other / "compiler/version.info").write_text("Version=9.9.9\n")
    monkeypatch.setenv("PATH", f"{other / 'compiler/bin'}{os.pathsep}{os.environ['PATH']}")
    stale = report.stale_nodes(plan_of(cfg))
    assert set(stale) == oms
    assert any("0.0.0-standin" in r["text"] and "9.9.9" in r["text"] for r in stale["om:r.BLIP_text.ascend310p3.bs1"])
    monkeypatch.setenv("PATH", f"{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}")
    # a stage's source: TPU-MLIR stage code edited
    monkeypatch.setattr(files, "REPO", repo_copy(tmp_path / "repo", edited="compile/tpu_mlir.py"))
    state.code_hash.cache_clear()
    stale = report.stale_nodes(plan_of(cfg))
    assert set(stale) == {n for n in plan.nodes if n.startswith(("transform:", "bmodel:"))}
    assert any("compile/tpu_mlir.py" in r["text"] for r in stale["transform:r.blip_itm.1b"])
    monkeypatch.undo()
    state.code_hash.cache_clear()
    # the checkpoint: everything downstream of it
    original = built["ckpt"].read_bytes()
    try:
        save(synthetic_state_dict("retrieval", "tiny", 5), built["ckpt"])
        monkeypatch.setenv("PATH", f"{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}")
        stale = report.stale_nodes(plan_of(cfg))
        assert set(stale) == set(plan.nodes)
        assert any(r["kind"] == "checkpoint" for r in stale["onnx:r"])
        assert any(r["kind"] == "upstream_stale" for r in stale["bmodel:r.blip_itm.bm1684.F32.1b"])
    finally:
        built["ckpt"].write_bytes(original)


def test_stale_command_json_and_check(built):
    proc = doit(built["cfg"], "stale", "--json", "--check", atc=True, check=False)
    assert proc.returncode == 0 and json.loads(proc.stdout)["stale"] == 0
    (built["root"] / "r/BM1688/blip_itm_bm1688_f32_1b.bmodel").write_bytes(b"corrupt")
    proc = doit(built["cfg"], "stale", "--check", atc=True, check=False)
    assert proc.returncode == 1 and "output modified on disk" in proc.stdout and "r / bm1688 / F32 / bs1" in proc.stdout
    doit(built["cfg"], "compile:bm1688", atc=True)


def test_missing_atc_stops_with_one_message_and_default_skips(built):
    proc = doit(built["cfg"], "compile:ascend310p3", check=False)
    assert proc.returncode != 0
    assert "ATC (Ascend CANN toolkit) not found" in proc.stdout + proc.stderr and "set_env.sh" in proc.stdout + proc.stderr
    assert not [t for t in executed(proc) if t.startswith(("om:", "onnx:", "simplify:"))]
    proc = doit(built["cfg"])
    assert proc.returncode == 0 and "skipped compile:ascend310p3" in proc.stderr


def test_failed_command_names_log_and_leaves_nothing_fresh(built):
    cfg, root = built["cfg"], built["root"]
    doit(cfg, "clean", "om:r.BLIP_text.ascend310p3.bs2", atc=True)
    proc = doit(cfg, "om:r.BLIP_text.ascend310p3.bs2", atc=True, env={"ATC_STANDIN_FAIL": "1"}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "atc failed (exit 1)" in out
    log = root / "logs/om__r.BLIP_text.ascend310p3.bs2.log"
    assert f"log: {log}" in out and "ATC stand-in: E10001" in log.read_text()
    assert not (root / ".state/om__r.BLIP_text.ascend310p3.bs2.json").exists()
    proc = doit(cfg, "om:r.BLIP_text.ascend310p3.bs2", atc=True, env={"ATC_STANDIN_NO_OUTPUT": "1"}, check=False)
    assert proc.returncode != 0 and "wrote no BLIP_text_bs2.om" in proc.stdout
    assert "om:r.BLIP_text.ascend310p3.bs2" in _stale_ids(cfg)


def test_nightly_continues_past_a_failure_and_reports_it(built):
    cfg, root = built["cfg"], built["root"]
    doit(cfg, "clean", "om:r.BLIP_text.ascend310p3.bs1", atc=True)
    proc = doit(cfg, "nightly", "-n", "2", atc=True, env={"ATC_STANDIN_FAIL_MATCH": "BLIP_text_bs1"}, check=False)
    assert proc.returncode == 1
    rep = json.loads(sorted((root / "reports").glob("nightly-*.json"))[-1].read_text())
    rows = {r["node"]: r for r in rep["artifacts"]}
    assert rows["om:r.BLIP_text.ascend310p3.bs1"]["status"] == "failed"
    assert (root / rows["om:r.BLIP_text.ascend310p3.bs1"]["log"]).exists()
    assert rows["om:r.BLIP_text.ascend310p3.bs2"]["status"] in ("built", "up to date")
    assert rows["bmodel:r.blip_itm.bm1684x.F32.1b"]["status"] == "up to date"
    html = sorted((root / "reports").glob("nightly-*.html"))[-1].read_text()
    assert "failed" in html and "ascend310p3" in html and "stand-in" in html
    doit(cfg, "compile:ascend310p3", atc=True)


def test_second_build_on_same_artifacts_stops_clearly(built):
    code = ("import sys, time; sys.path.insert(0, %r); from buildplan import lock;"
            "lock.hold(%r, []); print('held', flush=True); time.sleep(30)") % (str(REPO), str(built["root"]))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = doit(built["cfg"], "compile:bm1684x", check=False)
        assert proc.returncode == 3 and "another build is running" in proc.stderr and f"pid {holder.pid}" in proc.stderr
        assert doit(built["cfg"], "stale", check=False).returncode == 0  # read-only commands don't wait
    finally:
        holder.kill()
        holder.wait()


def test_failing_tpu_mlir_command_has_log_and_no_fresh_artifact(built, tmp_path):
    fake = tmp_path / "fake_tpu_mlir" / "bin"
    fake.mkdir(parents=True)
    for tool in ("model_transform.py", "model_deploy.py"):
        (fake / tool).write_text("#!/bin/sh\necho 'fake TPU-MLIR: deliberate failure' >&2\nexit 7\n")
        (fake / tool).chmod(0o755)
    proc = doit(built["cfg"], "compile:bm1684x", env={"BLIPC_TPU_MLIR": str(fake.parent)}, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "model_transform.py failed (exit 7)" in out
    assert "log: " + str(built["root"] / "logs/transform__r.blip_itm.1b.log") in out
    assert not (built["root"] / ".state/transform__r.blip_itm.1b.json").exists()
    assert "transform:r.blip_itm.1b" in _stale_ids(built["cfg"])


def test_kill_at_random_points_never_leaves_a_corrupt_fresh_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{STANDIN_BIN}{os.pathsep}{os.environ['PATH']}")
    cfg = write_config(tmp_path / "k.yaml", [{
        "name": "k", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3},
        "graphs": ["BLIP_text", "BLIP_image"],
        "targets": {"ascend310p3": {"batch_sizes": [1, 2, 3, 4]}}}], tmp_path / "artifacts")
    rng = random.Random(1234)
    env = dict(os.environ, PATH=f"{STANDIN_BIN}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for _ in range(4):
        proc = subprocess.Popen([str(Path(sys.executable).parent / "doit"), "compile:ascend310p3", f"config={cfg}"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(1.0, 12.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        plan = plan_of(cfg)
        store = state.Store(plan)
        for node in plan.nodes.values():
            if store.is_fresh(node):
                rec = store.read(node.id)
                for rel, meta in rec["outputs"].items():
                    assert state.sha256_file(Path(plan.root) / rel) == meta["sha256"], rel
    fresh_before = {n for n, node in plan.nodes.items() if store.is_fresh(node)}
    final = doit(cfg, "compile:ascend310p3", atc=True)
    assert not fresh_before & set(executed(final))
    assert report.stale_nodes(plan_of(cfg)) == {}

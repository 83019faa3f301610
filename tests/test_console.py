"""The build as a person sees it: a quiet console (third-party output in the task logs), one line
per task, a summary; `doit stale` in reading order, a missing toolchain said once, no traceback
on a closed pipe."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, doit, executed, write_config

# What the libraries print when left alone (ONNX Runtime's C++ logger, its quantizer, onnxsim,
# torch's exporter, Python warnings, TPU-MLIR's tools).
THIRD_PARTY = ("W:onnxruntime", "Removing initializer", "WARNING:root", "pre-processing", "TracerWarning",
               "UserWarning", "DeprecationWarning", "onnxsim", "[Running]", "npz_tool", "Traceback")


@pytest.mark.tpu_mlir
def test_a_build_from_scratch_is_quiet_and_ends_with_a_summary(tmp_path):
    models = [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny"},
               "graphs": ["BLIP_text", "blip_itm"],
               "targets": {"cpu": [{"precisions": ["F32", "INT8"]}, {"precisions": ["F32"], "batch_sizes": [2]}],
                           "bm1684x": {"graphs": ["blip_itm"]}, "ascend310p3": {"graphs": ["BLIP_text"]}}}]
    cfg = write_config(tmp_path / "models.yaml", models, tmp_path / "artifacts")
    proc = doit(cfg)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) < 150, len(lines)
    for text in THIRD_PARTY:
        assert text not in proc.stdout + proc.stderr, f"{text!r} on the console:\n{proc.stdout}\n{proc.stderr}"
    ran = executed(proc)
    assert "ort:r.BLIP_text.cpu.INT8.1b" in ran and "bmodel:r.blip_itm.bm1684x.F32.1b" in ran
    line = next(x for x in proc.stdout.splitlines() if x.startswith(".  bmodel:r.blip_itm.bm1684x.F32.1b"))
    assert " s  cosine " in line  # time and the key figure
    summary = [x for x in proc.stdout.splitlines() if x.startswith("summary: ")]
    assert summary and f"built {len(ran)}" in summary[0] and str(tmp_path / "artifacts") in summary[0]
    assert proc.stderr.count("skipped compile:ascend310p3") == 1
    # the tools' output is in the logs
    logs = tmp_path / "artifacts" / "logs"
    assert "model_transform" in (logs / "transform__r.blip_itm.1b.log").read_text()
    assert "pre-processing" in (logs / "ort__r.BLIP_text.cpu.INT8.1b.log").read_text()
    # BLIPC_VERBOSE=1 brings it back
    (tmp_path / "artifacts" / ".state" / "ort__r.BLIP_text.cpu.INT8.1b.json").unlink()
    verbose = doit(cfg, "ort:r.BLIP_text.cpu.INT8.1b", env={"BLIPC_VERBOSE": "1"})
    assert "pre-processing" in verbose.stdout + verbose.stderr
    again = doit(cfg)
    assert executed(again) == [] and "nothing to do" in again.stdout


def test_stale_reads_in_order_says_a_missing_toolchain_once_and_survives_a_closed_pipe(tmp_path):
    models = [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny"}, "graphs": ["BLIP_image"],
               "targets": {"cpu": {"batch_sizes": [32, 4, 16, 1]},
                           "ascend310p3": {"batch_sizes": [1, 4, 8, 16, 32, 64]}}}]
    cfg = write_config(tmp_path / "models.yaml", models, tmp_path / "artifacts")
    text = doit(cfg, "stale").stdout
    groups = [line for line in text.splitlines() if line.startswith("r / cpu")]
    assert groups == [f"r / cpu / F32 / bs{b}" for b in (1, 4, 16, 32)]
    assert text.count("not found") == 1 and "ascend310p3: 6 artifacts not buildable on this machine" in text
    assert "om:" not in text  # said once for the target, not per artifact
    report = json.loads(doit(cfg, "stale", "--json").stdout)
    assert report["skipped_targets"]["ascend310p3"]["artifacts"] == 6
    assert "not found" in report["skipped_targets"]["ascend310p3"]["reason"]
    assert not any(a["node"].startswith("om:") for a in report["artifacts"])
    assert report["stale"] == len(report["artifacts"]) + 6
    ort = next(a for a in report["artifacts"] if a["node"].startswith("ort:"))
    assert ort["reasons"][0] == "not built yet" and not any("output missing" in r for r in ort["reasons"])
    # a reader that stops early
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(f"doit stale --json config={cfg} | head -1", shell=True, cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "{" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_thread_parallelism_is_refused_before_any_work(tmp_path):
    """With -P thread, console lines and the summary landed in one task's log (the fd-level
    redirect is process-wide); it is refused with the fix instead."""
    root = tmp_path / "artifacts"
    model = [{"name": "m", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 3}, "graphs": ["BLIP_text"],
              "targets": {"ascend310p3": {"batch_sizes": [1]}}}]
    cfg = write_config(tmp_path / "models.yaml", model, root)
    proc = doit(cfg, "-n", "2", "-P", "thread", check=False)
    assert proc.returncode != 0 and "-P thread is not supported" in proc.stdout + proc.stderr
    assert "-P process" in proc.stdout + proc.stderr and not list(root.glob("**/*.onnx"))

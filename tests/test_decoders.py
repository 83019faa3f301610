"""Decoders on the chip, built for real (tiny): a step decoder's bmodel loops to the ONNX loop's
tokens on the cmodel, and a bmodel that needs more device memory than its chip's budget is
refused with a message saying what it needs and what to do."""
import json

import pytest

from conftest import doit, executed, write_config

pytestmark = pytest.mark.tpu_mlir


def test_device_memory_budget_refuses_the_unrolled_decoder_and_keeps_the_step_one(tmp_path):
    models = [{"name": "vqa", "task": "vqa", "checkpoint": {"synthetic": "tiny", "seed": 2},
               "graphs": ["blip_vqa_tdec", "blip_vqa_tdec_step"],
               "targets": {"bm1684x": {"precisions": ["F32"], "device_memory_mb": 40}}}]
    root = tmp_path / "artifacts"
    proc = doit(write_config(tmp_path / "models.yaml", models, root), "--continue", check=False, timeout=1200)
    assert proc.returncode != 0
    assert "bmodel:vqa.blip_vqa_tdec_step.bm1684x.F32.1b" in executed(proc)
    step = json.loads((root / ".state" / "bmodel__vqa.blip_vqa_tdec_step.bm1684x.F32.1b.json").read_text())
    assert step["device_memory"]["device_bytes"] <= 40 * 2**20 and step["device_memory"]["bmodel_bytes"] > 0
    assert step["figures"]["cmodel_loop_vs_onnx_loop"]["match"] == 1.0  # the whole greedy loop on the cmodel
    # the unrolled graph holds a weight copy per decoding step: over budget, refused, nothing kept
    assert not (root / ".state" / "bmodel__vqa.blip_vqa_tdec.bm1684x.F32.1b.json").exists()
    assert not (root / "vqa/BM1684X/blip_vqa_tdec_bm1684x_f32_1b.bmodel").exists()
    out = proc.stdout + proc.stderr
    assert "blip_vqa_tdec_bm1684x_f32_1b.bmodel needs" in out and "budget of 40 MiB" in out
    assert "step decoder" in out

"""Deliverables (issue 24): one bmodel per graph and precision holding every declared batch size,
the weights stored once, every batch size validated from that one file."""
import json

import pytest

from conftest import doit, executed, write_config

pytestmark = pytest.mark.tpu_mlir


def test_batch_sizes_combine_into_one_bmodel_validated_batch_by_batch(tmp_path):
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "vqa", "task": "vqa", "checkpoint": {"synthetic": "tiny", "seed": 2}, "graphs": ["blip_vqa_venc"],
        "targets": {"bm1684x": {"batch_sizes": [1, 2], "precisions": ["F16"], "combine_batch_sizes": True}}}], root)
    proc = doit(cfg, timeout=1200)
    assert "combine:vqa.blip_vqa_venc.bm1684x.F16" in executed(proc)
    combined = root / "vqa/BM1684X/blip_vqa_venc_bm1684x_f16_2-1b.bmodel"
    singles = [root / f"vqa/BM1684X/blip_vqa_venc_bm1684x_f16_{bs}b.bmodel" for bs in (1, 2)]
    assert combined.is_file() and all(f.is_file() for f in singles)  # the per-batch files stay
    assert combined.stat().st_size <= 1.15 * max(f.stat().st_size for f in singles)
    rec = json.loads((root / ".state/combine__vqa.blip_vqa_venc.bm1684x.F16.json").read_text())
    for bs in (1, 2):  # each batch size run from the combined file and accepted against its reference
        assert rec["figures"][f"bs{bs}_bmodel_vs_onnx"]["cosine"] >= 0.99
    assert rec["sizes"]["combined_bytes"] < rec["sizes"]["separate_bytes"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith(".  combine:vqa.blip_vqa_venc.bm1684x.F16"))
    assert "2 batch sizes" in line and "the largest single file" in line
    assert executed(doit(cfg)) == []


def test_one_file_per_task_runs_the_whole_task_on_the_cmodel(tmp_path):
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "cap", "task": "captioning", "checkpoint": {"synthetic": "tiny", "seed": 1},
        "graphs": ["blip_cap_venc", "blip_cap_step"],
        "targets": {"bm1684x": {"precisions": ["F32"], "task_bundle": True}}}], root)
    proc = doit(cfg, timeout=1200)
    assert "bundle:cap.bm1684x.F32.1b" in executed(proc)
    bundle = root / "cap/BM1684X/blip_captioning_bm1684x_f32_1b.bmodel"
    rec = json.loads((root / ".state/bundle__cap.bm1684x.F32.1b.json").read_text())
    assert rec["nets"] == ["blip_cap_venc", "blip_cap_step"] and bundle.is_file()
    # the image encoder, then the greedy loop of the step decoder, from that one file: the ONNX loop's tokens
    assert rec["figures"]["task_vs_onnx"] == {"samples": 1, "identical_sequences": 1.0, "min_share": 1.0}
    assert rec["sizes"]["bundle_bytes"] < rec["sizes"]["separate_bytes"]  # one kernel module, not two
    assert executed(doit(cfg)) == []
    # a bundle needs every net of its task on the target: refused before any work
    write_config(cfg, [{"name": "cap", "task": "captioning", "checkpoint": {"synthetic": "tiny", "seed": 1},
                        "graphs": ["blip_cap_venc", "blip_cap_step"],
                        "targets": {"bm1684x": {"graphs": ["blip_cap_step"], "task_bundle": True}}}], root)
    refused = doit(cfg, "list", check=False)
    assert refused.returncode == 2 and "task_bundle" in refused.stderr and "add blip_cap_venc" in refused.stderr

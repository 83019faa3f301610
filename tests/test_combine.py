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

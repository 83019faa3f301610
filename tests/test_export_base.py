"""Full-size export (slow, on demand: pytest -m slow): the `base` preset's retrieval graphs at
BLIP-base dimensions, checked against the Ascend seed's shapes written out literally here."""
import json

import numpy as np
import onnx
import pytest

from conftest import doit, write_config
from export.specs import GRAPHS as GRAPH_SPECS

pytestmark = pytest.mark.slow

GRAPHS = ["BLIP_text", "BLIP_image", "BLIP_image_feat", "BLIP_itm"]
# The seed's I/O (reference.md section 1) plus our BLIP_itm head; batch is the dynamic axis.
SEED_IO = {
    "BLIP_text": ([("text_ids", "int64", [35]), ("text_atten_mask", "int64", [35])], [("text_embed", "float32", [256])]),
    "BLIP_image": ([("input_image", "float32", [3, 384, 384])], [("image_embed", "float32", [256])]),
    "BLIP_image_feat": ([("input_image", "float32", [3, 384, 384])], [("image_feat", "float32", [577, 768])]),
    "BLIP_itm": ([("image_feat", "float32", [577, 768]), ("text_ids", "int64", [35]), ("text_atten_mask", "int64", [35])],
                 [("itm_logits", "float32", [2])]),
}


def io_of(path):
    m = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
    return describe(m.graph.input), describe(m.graph.output)


def test_base_retrieval_graphs_export_at_full_size(tmp_path):
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "rbase", "task": "retrieval", "checkpoint": {"synthetic": "base", "seed": 0}, "graphs": GRAPHS,
        "targets": {"ascend310p3": {"batch_sizes": [1, 4]}}}], tmp_path / "artifacts")
    doit(cfg, "export:rbase", timeout=3600)
    root = tmp_path / "artifacts"
    record = json.loads((root / ".state" / "onnx__rbase.json").read_text())
    for graph in GRAPHS:
        inputs, outputs = SEED_IO[graph]
        raw_in, raw_out = io_of(root / f"rbase/onnx/{graph}.onnx")
        assert [(n, t, s[1:]) for n, t, s in raw_in] == inputs and [(n, t, s[1:]) for n, t, s in raw_out] == outputs
        assert all(isinstance(s[0], str) for _, _, s in raw_in + raw_out)  # batch stays symbolic
        for bs in (1, 4):
            fixed_in, fixed_out = io_of(root / f"rbase/onnx/{graph}_bs{bs}.onnx")
            assert fixed_in == [(n, t, [bs] + s) for n, t, s in inputs]
            assert fixed_out == [(n, t, [bs] + s) for n, t, s in outputs]
            with np.load(root / f"rbase/onnx/{graph}_bs{bs}.io.npz") as io:
                assert sorted(io) == sorted([f"input:{n}" for n, _, _ in inputs] + [f"output:{n}" for n, _, _ in outputs])
                assert all(io[f"input:{n}"].shape == (bs, *s) for n, _, s in inputs)
        gates = record["figures"][graph]["onnx_vs_torch"]  # the task fails when a gate fails; figures kept
        assert set(gates) == {"bs1", "bs3"}
        assert all(g["max_abs"] <= GRAPH_SPECS[graph].atol and g["cosine"] > 0.999 for g in gates.values()), gates

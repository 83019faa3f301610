"""BLIP-base captioning and VQA, end to end through model_transform (slow, on demand:
pytest -m slow). Checkpoints are synthetic BLIP-base .pth files in the original layout, as a
user's would be; the decoders' tokens are checked against transformers' generate() on the same
weights, and a second `doit` is a replayed no-op (it ended in a traceback with a .pth path)."""
import json

import numpy as np
import pytest

from conftest import doit, executed, write_config

pytestmark = [pytest.mark.slow, pytest.mark.tpu_mlir]

STEP_AND_ENCODERS = {"captioning": ["blip_cap_venc", "blip_cap_step"],
                     "vqa": ["blip_vqa_venc", "blip_vqa_tenc", "blip_vqa_tdec_step"]}
UNROLLED = {"captioning": "blip_cap", "vqa": "blip_vqa_tdec"}
GB = 2**30


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from export.synthetic import BASE_RELEASE_FILES, save, synthetic_state_dict

    d = tmp_path_factory.mktemp("base")
    models = []
    for seed, task in ((1, "captioning"), (2, "vqa")):
        ckpt = d / BASE_RELEASE_FILES[task]
        save(synthetic_state_dict(task, "base", seed), ckpt)
        models.append({"name": task, "task": task, "checkpoint": str(ckpt), "arch": "base",
                       "graphs": STEP_AND_ENCODERS[task] + [UNROLLED[task]],
                       "targets": {"bm1684x": {"graphs": STEP_AND_ENCODERS[task], "simulate": False}}})
    cfg = write_config(d / "models.yaml", models, d / "artifacts")
    transforms = [f"transform:{m}.{g}.1b" for m, graphs in STEP_AND_ENCODERS.items() for g in graphs]
    first = doit(cfg, *transforms, "onnx:captioning", "onnx:vqa", timeout=3 * 3600)
    return cfg, d / "artifacts", transforms, first


def _record(root, node):
    return json.loads((root / ".state" / f"{node.replace(':', '__')}.json").read_text())


def test_every_graph_exports_and_decoders_answer_as_generate(built):
    _, root, _, first = built
    assert "Traceback" not in first.stderr
    for task, graphs in STEP_AND_ENCODERS.items():
        rec = _record(root, f"onnx:{task}")
        assert rec["peak_rss_mb"] * 2**20 < 12 * GB, rec["peak_rss_mb"]  # fits beside another task
        for graph in graphs + [UNROLLED[task]]:
            gates = rec["figures"][graph]["onnx_vs_torch"]
            assert set(gates) == {"bs1", "bs3"}
        for graph in graphs:
            if graph.endswith("_step"):  # the runtime's loop on ONNX Runtime == transformers' generate()
                assert all(g["match"] == 1.0 for g in rec["figures"][graph]["loop_vs_generate"].values())
        unrolled = rec["figures"][UNROLLED[task]]["onnx_vs_torch"]
        assert all(g["match"] == 1.0 for g in unrolled.values())
        # one copy of each weight: the raw unrolled graph is not steps x decoder
        size = (root / task / "onnx" / f"{UNROLLED[task]}.onnx").stat().st_size
        assert size < 1.5 * GB, size


def test_simplify_and_transform_at_base_size(built):
    _, root, transforms, _ = built
    for node in transforms:
        model, graph = node.split(":")[1].split(".")[:2]
        simplified = _record(root, f"simplify:{model}.{graph}.bs1")
        assert simplified["peak_rss_mb"] * 2**20 < 12 * GB
        if graph.endswith("_step"):
            assert simplified["figures"]["loop_simplified_vs_raw"]["match"] == 1.0
            with np.load(root / model / "onnx" / f"{graph}_bs1.io.npz") as io:
                assert any(k.startswith("loop:") for k in io.files)
        top = _record(root, node)
        assert top["figures"]["top_mlir_vs_onnx"]["cosine"] > 0.999
        assert top["tool_peak_rss_mb"] * 2**20 < 20 * GB


def test_second_run_with_pth_checkpoints_is_a_replayed_noop(built):
    cfg, _, transforms, _ = built
    again = doit(cfg, *transforms, "onnx:captioning", "onnx:vqa", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert executed(again) == [] and "Traceback" not in again.stderr
    assert "buildplan.snapshot" in again.stderr and "buildplan.config" not in again.stderr


def test_unrolled_vqa_decoder_simplifies_at_base_size(built):
    """The seed-compatible unrolled decoder at BLIP-base size: onnxsim makes it fully static with its
    weights at their raw size (it passed protobuf's 2 GB limit with Shape ops left), same tokens."""
    import onnx
    import onnxruntime as ort

    from export.presets import resolve_dims
    from export.samples import make_inputs
    from export.simplify import simplify_static, still_dynamic
    from export.specs import GRAPHS

    _, root, _, _ = built
    spec, dims = GRAPHS["blip_vqa_tdec"], resolve_dims("base", "vqa")
    raw_path = root / "vqa" / "onnx" / "blip_vqa_tdec.onnx"
    raw = onnx.load(str(raw_path))
    raw_bytes = sum(len(i.raw_data) for i in raw.graph.initializer)
    simplified, _ = simplify_static(raw, spec.shapes(dims, 1))
    assert not still_dynamic(simplified)
    assert sum(len(i.raw_data) for i in simplified.graph.initializer) < 1.05 * raw_bytes
    feeds = make_inputs(spec, dims, 1, seed=7)
    want = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(simplified.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)

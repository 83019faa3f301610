"""ATC commands as built for the (strict, labelled) test stand-in: each OM is compiled from its own
graph's ONNX, and extra_flags reach the command line exactly as written."""
from conftest import doit, write_config


def test_dynamic_batch_om_uses_its_own_graph_and_extra_flags_verbatim(tmp_path):
    # BLIP_image_feat first: picking the model file by substring gave BLIP_image's OM BLIP_image_feat.onnx
    models = [{"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 0},
               "graphs": ["BLIP_image_feat", "BLIP_image"],
               "targets": {"ascend310p3": {"batch_sizes": [1, 4], "dynamic_batch": True,
                                           "extra_flags": {"BLIP_image": ["--fusion_switch_file={output}{0}.cfg"]}}}}]
    cfg = write_config(tmp_path / "models.yaml", models, tmp_path / "artifacts")
    doit(cfg, "compile:ascend310p3", atc=True)
    logs = tmp_path / "artifacts" / "logs"
    image = (logs / "om__r.BLIP_image.ascend310p3.dyn.log").read_text()
    feat = (logs / "om__r.BLIP_image_feat.ascend310p3.dyn.log").read_text()
    assert "/r/onnx/BLIP_image.onnx " in image and "BLIP_image_feat.onnx" not in image
    assert "/r/onnx/BLIP_image_feat.onnx " in feat
    assert "--fusion_switch_file={output}{0}.cfg" in image  # not run through str.format
    assert "--dynamic_batch_size=1,4" in image and "input_image:-1,3,64,64" in image

"""Calibration from real data (issue 21): a folder of images and a file of questions, preprocessed
as BLIP does, the features of later graphs computed by the earlier graphs; one set of samples
per graph and batch size, shared by every chip, precision and backend."""
import json

import numpy as np
import pytest
import yaml

from buildplan import config
from conftest import doit, executed, write_config

WORDS = ["what", "is", "the", "color", "of", "a", "dog", "cat", "red", "blue", "on", "grass", "sitting", "?"]


def _data(tmp_path):
    """Three images of different sizes and modes, questions with answers, a tiny BERT vocabulary."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i, (size, mode) in enumerate([((50, 70), "RGB"), ((120, 90), "RGBA"), ((64, 64), "L")]):
        pixels = rng.integers(0, 256, size=(size[1], size[0], len(mode) if mode != "L" else 1), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(images / f"img{i}.png")
    (images / "notes.txt").write_text("not an image")
    texts = tmp_path / "questions.txt"
    texts.write_text("what is the color of the dog?\tred\n\nwhat is sitting on the grass?\ta cat\n")
    vocab = tmp_path / "tokenizer"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return images, texts, vocab


def _model(images, texts, vocab, targets, graphs=("blip_vqa_venc", "blip_vqa_tenc", "blip_vqa_tdec_step")):
    return {"name": "vqa", "task": "vqa", "checkpoint": {"synthetic": "tiny", "seed": 2}, "graphs": list(graphs),
            "calibration": {"images": str(images), "texts": str(texts), "tokenizer": str(vocab), "samples": 2},
            "targets": targets}


@pytest.mark.unit
def test_real_calibration_data_is_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIPC_MEMO_DIR", str(tmp_path / "memo"))
    images, texts, vocab = _data(tmp_path)
    path = tmp_path / "models.yaml"

    def refused(model, field, fix):
        path.write_text(yaml.safe_dump({"artifacts": str(tmp_path / "a"), "models": [model]}))
        with pytest.raises(config.ConfigError) as err:
            config.load(path)
        assert f"models[0].calibration.{field}" in str(err.value) and fix in str(err.value), str(err.value)

    int8 = {"cpu": {"precisions": ["INT8"]}}
    good = _model(images, texts, vocab, int8)
    assert config.load(write_config(path, [good], tmp_path / "a")).models[0].calibration["texts"] == str(texts)
    no_texts = _model(images, texts, vocab, int8)
    del no_texts["calibration"]["texts"]
    refused(no_texts, "texts", "one caption or question per line")
    refused(_model(tmp_path / "nowhere", texts, vocab, int8), "images", "folder of calibration images")
    refused(_model(images, texts, tmp_path, int8), "tokenizer", "vocab.txt")
    both = _model(images, texts, vocab, int8)
    both["calibration"]["data"] = str(images)
    refused(both, "images", "not both")
    # the answer decoder is calibrated on question states, which the question encoder computes
    refused(_model(images, texts, vocab, int8, graphs=("blip_vqa_venc", "blip_vqa_tdec_step")), "images",
            "add blip_vqa_tenc to the model's graphs")
    stray = _model(images, texts, vocab, int8)
    del stray["calibration"]["images"]
    refused(stray, "texts", "add `images: <folder>`")


@pytest.mark.tpu_mlir
def test_samples_are_made_as_blip_preprocesses_and_shared_by_every_chip(tmp_path):
    from transformers import BertTokenizer, BlipImageProcessorPil

    images, texts, vocab = _data(tmp_path)
    root = tmp_path / "artifacts"
    targets = {"bm1684x": {"graphs": ["blip_vqa_venc", "blip_vqa_tdec_step"], "precisions": ["INT8"],
                           "decoder_gate": "exact"},
               "bm1688": {"graphs": ["blip_vqa_venc"], "precisions": ["INT8"]},
               "cpu": {"graphs": ["blip_vqa_venc"], "precisions": ["INT8"]}}
    cfg = write_config(tmp_path / "models.yaml", [_model(images, texts, vocab, targets)], root)
    proc = doit(cfg, "--continue", check=False, timeout=1500)
    ran = executed(proc)
    # one calibration set for both chips and the CPU, one calibration table for both chips
    assert ran.count("calibration_set:vqa.blip_vqa_venc.1b") == 1 and ran.count("calibrate:vqa.blip_vqa_venc.1b") == 1
    assert {"bmodel:vqa.blip_vqa_venc.bm1684x.INT8.1b", "bmodel:vqa.blip_vqa_venc.bm1688.INT8.1b",
            "calibration_set:vqa.blip_vqa_tdec_step.1b", "calibrate:vqa.blip_vqa_tdec_step.1b"} <= set(ran), ran
    with np.load(root / "vqa/calibration/blip_vqa_venc_1b.npz") as z:
        venc = {k: z[k] for k in z.files}
    assert sorted(venc) == ["0/pixel_values", "1/pixel_values"]
    # pixels: BLIP loads with PIL's convert("RGB") (alpha dropped, where transformers would composite
    # on white), then resizes (bicubic) and normalizes: transformers' BLIP image processor does those
    from PIL import Image

    processor = BlipImageProcessorPil(size={"height": 80, "width": 80})
    for i, name in enumerate(["img0.png", "img1.png"]):
        want = processor(Image.open(images / name).convert("RGB"), return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(venc[f"{i}/pixel_values"], want, atol=1e-5)
    # the answer decoder's samples: questions tokenized, question states from the two encoders' ONNX
    with np.load(root / "vqa/calibration/blip_vqa_tdec_step_1b.npz") as z:
        step = {k: z[k] for k in z.files}
    tokenizer = BertTokenizer.from_pretrained(str(vocab))
    assert tokenizer.tokenize("the dog?") == ["the", "dog", "?"]
    mask = step["1/question_mask"][0]
    assert mask.sum() == len(tokenizer.encode("what is sitting on the grass?"))
    red = tokenizer.encode("red", add_special_tokens=False)
    assert step["0/input_ids"][0][:len(red) + 2].tolist() == [30522, *red, tokenizer.sep_token_id]
    import onnxruntime as ort

    def run(graph, feeds):
        session = ort.InferenceSession(str(root / f"vqa/onnx/{graph}_bs1.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    embeds = run("blip_vqa_venc", {"pixel_values": venc["1/pixel_values"]})
    ids = np.array([tokenizer.encode("what is sitting on the grass?", padding="max_length", max_length=12)])
    states = run("blip_vqa_tenc", {"image_embeds": embeds, "input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})
    np.testing.assert_allclose(step["1/question_states"], states, atol=1e-5)
    record = json.loads((root / ".state/calibrate__vqa.blip_vqa_venc.1b.json").read_text())
    assert record["calibration"]["from_images"] and not record["calibration"]["synthetic"]
    assert "on 2 calibration samples (made from images)" in (root / "logs/ort__vqa.blip_vqa_venc.cpu.INT8.1b.log").read_text()
    # a second build calibrates nothing again. An edited question makes new samples for the decoder
    # and a new table; the image encoder's samples come out the same, so its table is kept.
    assert not [t for t in executed(doit(cfg, "--continue", check=False)) if t.startswith("calibrat")]
    texts.write_text(texts.read_text().replace("dog", "cat"))
    again = executed(doit(cfg, "--continue", check=False, timeout=1500))
    assert {"calibration_set:vqa.blip_vqa_tdec_step.1b", "calibrate:vqa.blip_vqa_tdec_step.1b"} <= set(again), again
    assert "calibrate:vqa.blip_vqa_venc.1b" not in again


@pytest.mark.unit
def test_synthetic_calibration_and_gate_samples_have_padded_text_at_batch_size_1():
    """At batch size 1 a reference sample fills the whole text window. Calibration samples made
    the same way would never show a padded position: the INT8 table would give the attention
    mask's -10000 a range of 0 and clip it away on every real, shorter question."""
    from types import SimpleNamespace

    from compile.acceptance import calibration_samples, gate_inputs, token_gate
    from export.presets import resolve_dims
    from export.samples import make_inputs
    from export.specs import GRAPHS

    dims = resolve_dims("tiny", "vqa")
    spec = GRAPHS["blip_vqa_tdec_step"]
    mask = next(t.name for t in spec.inputs if t.sample == "text_mask")
    assert make_inputs(spec, dims, 1, seed=0)[mask].all()  # the reference sample: the whole window
    node = SimpleNamespace(params={"samples": 8}, sources=())
    calibration = [s[mask] for s in calibration_samples(node, None, spec, dims, 1)]
    assert len(calibration) == 8 and sum(not m.all() for m in calibration) >= 4
    assert all(m[0, 0] == 1 for m in calibration)  # padding at the end, as the tokenizer pads
    gate, _ = token_gate(spec, "INT8", "agreement", dims)
    padded = [not s[mask].all() for s in gate_inputs(spec, gate, 1, make_inputs(spec, dims, 1, seed=0), None)[1:]]
    assert sum(padded) >= len(padded) // 2


def test_decoder_gates_run_on_the_real_samples(tmp_path):
    """With images and texts, a decoder's agreement gate (below F32) runs on the samples made from
    them, as BLIP makes its inputs, not on random features; a decoder whose feature inputs the
    model cannot compute from images keeps synthetic ones."""
    from buildplan.plan import build_plan

    images, texts, vocab = _data(tmp_path)
    root = tmp_path / "artifacts"
    targets = {"cpu": {"graphs": ["blip_vqa_venc", "blip_vqa_tenc", "blip_vqa_tdec_step"], "precisions": ["INT8"]},
               "bm1684x": {"graphs": ["blip_vqa_tdec_step"], "precisions": ["F16"], "batch_sizes": [1, 2],
                           "combine_batch_sizes": True}}
    cfg = write_config(tmp_path / "models.yaml", [_model(images, texts, vocab, targets)], root)
    plan = build_plan(config.load(cfg))
    real = "calibration_set:vqa.blip_vqa_tdec_step.1b"
    for node in ("ort:vqa.blip_vqa_tdec_step.cpu.INT8.1b", "bmodel:vqa.blip_vqa_tdec_step.bm1684x.F16.1b"):
        assert plan.nodes[node].params["token_gate"]["real_data"] and real in plan.nodes[node].deps, node
    combined = plan.nodes["combine:vqa.blip_vqa_tdec_step.bm1684x.F16"]
    assert {real, "calibration_set:vqa.blip_vqa_tdec_step.2b"} <= set(combined.deps)
    assert not plan.nodes["ort:vqa.blip_vqa_venc.cpu.INT8.1b"].params.get("token_gate")
    doit(cfg, "ort:vqa.blip_vqa_tdec_step.cpu.INT8.1b", check=False, timeout=900)
    done = root / ".state/ort__vqa.blip_vqa_tdec_step.cpu.INT8.1b.json"
    if done.exists():
        figures = json.loads(done.read_text())["figures"]["tokens_vs_onnx"]
        assert figures["samples"] == 2 and figures["sequences"] == 2  # the two real samples, both looped
    else:
        marker = json.loads((root / ".state/failed/ort__vqa.blip_vqa_tdec_step.cpu.INT8.1b.json").read_text())
        assert "over 2 inputs" in marker["error"], marker
    # without the encoders, the answer decoder's question states cannot be made from the images
    alone = _model(images, texts, vocab, {"cpu": {"graphs": ["blip_vqa_tdec_step"], "precisions": ["F32"]},
                                          "bm1684x": {"precisions": ["F16"]}}, graphs=("blip_vqa_tdec_step",))
    plan = build_plan(config.load(write_config(tmp_path / "alone.yaml", [alone], root)))
    gate = plan.nodes["bmodel:vqa.blip_vqa_tdec_step.bm1684x.F16.1b"].params["token_gate"]
    assert "real_data" not in gate and not [n for n in plan.nodes if n.startswith("calibration_set:")]


@pytest.mark.tpu_mlir
def test_a_task_bundle_is_checked_on_the_real_samples(tmp_path):
    """With images and texts, the whole task run from one bundle file starts from the model's own
    images and questions (each net's samples give its raw inputs), not from the reference sample:
    in F32 every token of both declared samples' answers equals the ONNX graphs' (on synthetic
    data, one input)."""
    from buildplan.plan import build_plan

    images, texts, vocab = _data(tmp_path)
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [_model(images, texts, vocab, {"bm1684x": {"task_bundle": True}})], root)
    bundle = build_plan(config.load(cfg)).nodes["bundle:vqa.bm1684x.F32.1b"]
    assert {f"calibration_set:vqa.{g}.1b" for g in ("blip_vqa_venc", "blip_vqa_tenc", "blip_vqa_tdec_step")} <= set(bundle.deps)
    doit(cfg, "bundle:vqa.bm1684x.F32.1b", timeout=1500)
    figures = json.loads((root / ".state/bundle__vqa.bm1684x.F32.1b.json").read_text())["figures"]["task_vs_onnx"]
    assert figures == {"samples": 2, "identical_sequences": 1.0, "min_share": 1.0, "real_data": True}

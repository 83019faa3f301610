"""Export stage: loading, key mapping, refusals, decoding equivalence, graph specs."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from export import loading
from export.graphs import build, decoder_for_export
from export.presets import CLS_ID, SEP_ID, resolve_dims
from export.samples import make_inputs
from export.specs import GRAPHS
from export.synthetic import save, synthetic_state_dict


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for task, seed in (("retrieval", 0), ("captioning", 1), ("vqa", 2)):
        p = d / f"{task}.pth"
        save(synthetic_state_dict(task, "tiny", seed), p)
        out[task] = p
    return out


def test_synthetic_checkpoint_is_original_layout_and_deterministic(tmp_path, checkpoints):
    sd = torch.load(checkpoints["retrieval"], weights_only=True)["model"]
    assert "visual_encoder.blocks.0.attn.qkv.weight" in sd and "visual_encoder.pos_embed" in sd
    assert "visual_encoder_m.cls_token" in sd and "image_queue" in sd and "text_encoder.encoder.layer.0.crossattention.self.query.weight" in sd
    again = tmp_path / "again.pth"
    save(synthetic_state_dict("retrieval", "tiny", 0), again)
    assert again.read_bytes() == checkpoints["retrieval"].read_bytes()


@pytest.mark.parametrize("task", ["retrieval", "captioning", "vqa"])
def test_key_mapping_round_trip(task, checkpoints):
    dims = resolve_dims("tiny", task)
    loaded, report = loading.load_model(str(checkpoints[task]), "pth", task, dims)
    direct = loading.new_model(task, dims)
    sd = torch.load(checkpoints[task], weights_only=True)["model"]
    direct.load_state_dict({loading.original_to_hf(k): v for k, v in sd.items() if not loading.is_training_state(k)}, strict=False)
    if task == "retrieval":
        assert any(k.startswith("visual_encoder_m.") for k in report["ignored"]) and "image_queue" in report["ignored"]
    for name in (g for g, s in GRAPHS.items() if s.task == task and not s.discrete_outputs):
        spec = GRAPHS[name]
        x = [torch.from_numpy(v) for v in make_inputs(spec, dims, 2).values()]
        with torch.no_grad():
            torch.testing.assert_close(build(spec, loaded, dims)(*x), build(spec, direct, dims)(*x), rtol=0, atol=0)


def test_unexpected_and_missing_keys_are_named(tmp_path, checkpoints):
    sd = torch.load(checkpoints["retrieval"], weights_only=True)["model"]
    sd["text_encoder.bogus.weight"] = torch.zeros(1)
    del sd["itm_head.weight"]
    p = tmp_path / "bad.pth"
    torch.save(sd, p)  # bare state_dict is accepted too
    with pytest.raises(loading.CheckpointError) as err:
        loading.load_model(str(p), "pth", "retrieval", resolve_dims("tiny", "retrieval"))
    assert "itm_head.weight" in str(err.value) and "text_encoder.bogus.weight" in str(err.value)


def test_pos_embed_interpolated_for_another_image_size(checkpoints):
    dims = resolve_dims("tiny", "retrieval", image_size=96)
    model, report = loading.load_model(str(checkpoints["retrieval"]), "pth", "retrieval", dims)
    assert report["interpolated_pos_embed"] == [[1, 17, 32], [1, 37, 32]]
    assert model.vision_model.embeddings.position_embedding.shape == (1, 37, 32)


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/blipc_pwned",))


def test_malicious_pickle_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, p, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(loading.CheckpointError, match="refused to load") as err:
        loading.read_state_dict(p)
    # it names what the pickle wanted, and never relays torch's "retry with weights_only=False"
    assert ("GLOBAL" in str(err.value) or "Unsupported" in str(err.value)) and "weights_only" not in str(err.value)


def test_malicious_weights_in_a_transformers_folder_refused_by_name(tmp_path):
    """A save_pretrained folder whose pytorch_model.bin runs code: refused, naming the file, and
    without torch's advice to retry with weights_only=False."""
    from export.presets import resolve_dims

    folder = tmp_path / "hf"
    loading.new_model("retrieval", resolve_dims("tiny", "retrieval", None)).save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    torch.save({"x": torch.zeros(1), "payload": _Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(loading.CheckpointError, match="refused to load") as err:
        loading.load_model(str(folder), "hf_dir", "retrieval", resolve_dims("tiny", "retrieval", None))
    assert "pytorch_model.bin" in str(err.value) and "weights_only" not in str(err.value), str(err.value)
    assert not Path("/tmp/blipc_pwned").exists()


def test_truncated_and_foreign_files_named(tmp_path, checkpoints):
    data = checkpoints["captioning"].read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(loading.CheckpointError, match="cut.pth: not a readable PyTorch checkpoint"):
        loading.read_state_dict(cut)
    txt = tmp_path / "notes.pth"
    txt.write_text("hello")
    with pytest.raises(loading.CheckpointError, match="notes.pth"):
        loading.read_state_dict(txt)


def _model_with_sep_bias(checkpoints, task, sep_bias):
    dims = resolve_dims("tiny", task)
    model, _ = loading.load_model(str(checkpoints[task]), "pth", task, dims)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[SEP_ID] += sep_bias
    return model, dims


def _hf_ids(out, length):
    out = out.numpy()
    return np.pad(out, ((0, 0), (0, length - out.shape[1])), constant_values=0)


@pytest.mark.parametrize("sep_bias", [0.0, 8.0])
def test_caption_decoding_equals_generate(checkpoints, sep_bias):
    """Unrolled greedy == transformers' generate(); the biased run makes EOS fire mid-sequence."""
    model, dims = _model_with_sep_bias(checkpoints, "captioning", sep_bias)
    pixels = torch.from_numpy(make_inputs(GRAPHS["blip_cap"], dims, 4)["pixel_values"])
    with torch.no_grad():
        ours = build(GRAPHS["blip_cap"], model, dims)(pixels).numpy()
        prompt = torch.tensor([[CLS_ID, 1037, 3861, 1997, SEP_ID]] * 4)
        ref = model.generate(pixels, input_ids=prompt, max_length=20, min_length=5, num_beams=1, do_sample=False)
    np.testing.assert_array_equal(ours, _hf_ids(ref, 20))
    if sep_bias:
        assert (ours == SEP_ID).any() and (ours[:, -1] == 0).any()  # EOS reached, then padding


@pytest.mark.parametrize("sep_bias", [0.0, 6.0])
def test_vqa_answer_decoding_equals_generate(checkpoints, sep_bias):
    model, dims = _model_with_sep_bias(checkpoints, "vqa", sep_bias)
    x = make_inputs(GRAPHS["blip_vqa_tenc"], dims, 3)
    feeds = [torch.from_numpy(v) for v in x.values()]
    with torch.no_grad():
        states = build(GRAPHS["blip_vqa_tenc"], model, dims)(*feeds)
        ours = build(GRAPHS["blip_vqa_tdec"], model, dims)(states, feeds[2]).numpy()
        bos = torch.full((3, 1), model.decoder_start_token_id)
        ref = decoder_for_export(model.text_decoder, shared_matmuls=False).generate(input_ids=bos, eos_token_id=SEP_ID, pad_token_id=0,
                                          encoder_hidden_states=states, encoder_attention_mask=feeds[2],
                                          max_length=10, min_length=1, num_beams=1, do_sample=False)
    np.testing.assert_array_equal(ours, _hf_ids(ref, 10))


def test_fixed_batch_graph_states_its_output_dims(tmp_path):
    """onnxsim left BLIP-base's image_embed as ['batch', 256] at bs1: the stage states the spec's
    dims and checks them, so a per-batch graph never declares a symbolic output."""
    import onnx
    from onnx import TensorProto, helper

    from export.gates import GateError
    from export.stage import check_onnx_io, fix_output_dims

    spec, dims = GRAPHS["BLIP_image"], resolve_dims("tiny", "retrieval")
    x = helper.make_tensor_value_info("input_image", TensorProto.FLOAT, [4, 3, 64, 64])
    y = helper.make_tensor_value_info("image_embed", TensorProto.FLOAT, ["batch", 256])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_image"], ["image_embed"])], "g", [x], [y]))
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    with pytest.raises(GateError, match="outputs"):
        check_onnx_io(path, spec, dims, 4)
    fix_output_dims(model, spec, dims, 4)
    onnx.save(model, path)
    check_onnx_io(path, spec, dims, 4)
    assert [d.dim_value for d in onnx.load(path).graph.output[0].type.tensor_type.shape.dim] == [4, 256]


def test_unrolled_decoder_simplifies_to_a_fully_static_graph(tmp_path, checkpoints):
    """One onnxsim pass leaves Shape ops in the later decoding steps; simplify_static repeats
    until none are left (TPU-MLIR failed on the leftovers)."""
    import onnx

    from export.simplify import simplify_static, still_dynamic
    from export.stage import share_initializers

    dims = resolve_dims("tiny", "vqa")
    model, _ = loading.load_model(str(checkpoints["vqa"]), "pth", "vqa", dims)
    spec = GRAPHS["blip_vqa_tdec"]
    example = make_inputs(spec, dims, 2)
    path = tmp_path / "tdec.onnx"
    with torch.no_grad():
        torch.onnx.export(build(spec, model, dims), tuple(torch.from_numpy(v) for v in example.values()), str(path),
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_axes={t.name: {0: spec.batch_axis_name} for t in spec.inputs + spec.outputs},
                          opset_version=spec.opset, dynamo=False)  # batch dynamic, as the onnx stage exports
    raw = onnx.load(str(path))
    assert share_initializers(raw) == 0  # the unrolled steps share one MatMul weight each, no Identity aliases
    weight_bytes = sum(t.numel() * t.element_size() for t in model.text_decoder.parameters())
    raw_bytes = sum(len(i.raw_data) for i in raw.graph.initializer)
    simplified, passes = simplify_static(raw, spec.shapes(dims, 1))
    assert not still_dynamic(simplified)
    assert not any(n.op_type == "Gemm" for n in simplified.graph.node)  # no onnxsim fusions (see simplify.py)
    # weights once, not once per decoding step (it held 9 copies: 8.9 MB raw -> 40.7 MB simplified)
    # (the LM head's transposed copy of the tied word embeddings is the one weight held twice)
    simplified_bytes = sum(len(i.raw_data) for i in simplified.graph.initializer)
    embedding_bytes = model.text_decoder.bert.embeddings.word_embeddings.weight.numel() * 4
    assert raw_bytes < 1.1 * (weight_bytes + embedding_bytes), (weight_bytes, raw_bytes)
    assert simplified_bytes < 1.05 * raw_bytes, (raw_bytes, simplified_bytes)


def test_share_initializers_rewires_identity_aliases():
    from onnx import TensorProto, helper, numpy_helper

    from export.stage import share_initializers

    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    nodes = [helper.make_node("Identity", ["w"], ["w_step2"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w_step2"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [w]))
    assert share_initializers(model) == 1
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [("MatMul", ["x", "w"]), ("MatMul", ["h", "w"])]


def _step_loop(model, spec, dims, feeds):
    from export.decoding import greedy_loop, loop_settings

    step = build(spec, model, dims)

    def call(f):
        with torch.no_grad():
            return step(*(torch.from_numpy(f[t.name]) for t in spec.inputs)).numpy()
    return greedy_loop(call, feeds, **loop_settings(spec, dims))


@pytest.mark.parametrize("task,graph,sep_bias", [("captioning", "blip_cap_step", 0.0), ("captioning", "blip_cap_step", 8.0),
                                                  ("vqa", "blip_vqa_tdec_step", 0.0), ("vqa", "blip_vqa_tdec_step", 9.0)])
def test_step_decoder_loop_equals_generate(checkpoints, task, graph, sep_bias):
    """The one-step decoder called in the runtime's loop gives generate()'s tokens, EOS and padding included."""
    from export.graphs import reference_generate

    model, dims = _model_with_sep_bias(checkpoints, task, sep_bias)
    spec = GRAPHS[graph]
    feeds = make_inputs(spec, dims, 3, seed=4)
    ours = _step_loop(model, spec, dims, feeds)
    np.testing.assert_array_equal(ours, reference_generate(model, spec, feeds, dims))
    if sep_bias:
        assert (ours == SEP_ID).any() and (ours[:, -1] == 0).any()


def test_vqa_graphs_answer_as_blip_does_for_an_unpadded_question(checkpoints):
    """BLIP encodes one question without padding. Our graphs take it padded to L plus its mask and
    must give transformers' BlipForQuestionAnswering.generate() answer for the unpadded question."""

    model, dims = _model_with_sep_bias(checkpoints, "vqa", 0.0)
    pixels = make_inputs(GRAPHS["blip_vqa_venc"], dims, 1, seed=3)["pixel_values"]
    question = [30523, 2129, 2116, 8870, 2024, 2045, 1029, SEP_ID]  # [ENC] how many cats are there ? [SEP]
    padded = np.zeros((1, dims["text_len"]), np.int64)
    padded[0, :len(question)] = question
    mask = (padded != 0).astype(np.int64)
    with torch.no_grad():
        blip = model.generate(input_ids=torch.tensor([question]), pixel_values=torch.from_numpy(pixels),
                              max_length=10, min_length=1, num_beams=1, do_sample=False).numpy()
        embeds = build(GRAPHS["blip_vqa_venc"], model, dims)(torch.from_numpy(pixels))
        states = build(GRAPHS["blip_vqa_tenc"], model, dims)(embeds, torch.from_numpy(padded), torch.from_numpy(mask))
        unrolled = build(GRAPHS["blip_vqa_tdec"], model, dims)(states, torch.from_numpy(mask)).numpy()
    feeds = {"question_states": states.numpy(), "question_mask": mask}
    stepped = _step_loop(model, GRAPHS["blip_vqa_tdec_step"], dims, feeds)
    want = _hf_ids(torch.from_numpy(blip), 10)
    np.testing.assert_array_equal(unrolled, want)
    np.testing.assert_array_equal(stepped, want)

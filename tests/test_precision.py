"""Precision work on the ONNX Runtime backend (issue 21): a failing INT8 cell names the layer
where the quantized model parts from its float model, and `mixed_precision: auto` keeps the
fewest layers in float that make it pass, as an artifact of its own."""
import json

import numpy as np
import pytest

from compile import acceptance, localization, ort_precision
from export.specs import GRAPHS
from conftest import doit, executed, write_config


def _chain(weights: dict):
    """x[1,16] -> L1 MatMul -> R1 Relu -> L2 MatMul -> R2 Relu -> L3 MatMul -> y."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, prev = [], "x"
    for i in (1, 2, 3):
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"l{i}"], name=f"L{i}"))
        prev = f"l{i}"
        if i < 3:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"], name=f"R{i}"))
            prev = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 16])],
                              [numpy_helper.from_array(w, f"W{i}") for i, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.unit
def test_localization_names_exactly_the_perturbed_layer():
    rng = np.random.default_rng(0)
    weights = {i: rng.normal(size=(16, 16)).astype(np.float32) for i in (1, 2, 3)}
    float_model = _chain(weights)
    perturbed = dict(weights)
    perturbed[2] = weights[2] + rng.normal(size=(16, 16)).astype(np.float32)  # layer L2 alone is off
    feeds = {"x": rng.normal(size=(1, 16)).astype(np.float32)}
    entries = ort_precision.profile(float_model, _chain(perturbed), feeds, "INT8")
    assert [e["node"] for e in entries] == ["L1", "R1", "L2", "R2", "L3"]
    found = localization.findings(entries, "INT8", {"x"})
    first = found["first_off"]
    assert first["node"] == "L2" and first["op"] == "MatMul" and first["starts_here"]
    assert first["cosine"] < 0.95 and first["inputs"] == {"r1": pytest.approx(1.0)}
    text = localization.describe(found, "INT8")
    assert "L2 (MatMul)" in text and "the error starts there" in text
    # were L2 within the rule, the first one off would be R2, whose input (L2's output) already
    # differs: the error accumulated before it
    lenient = [{**e, "severity": 0.5} if e["node"] == "L2" else e for e in entries]
    late = localization.findings(lenient, "INT8", {"x"})["first_off"]
    assert late["node"] == "R2" and not late["starts_here"]
    assert "accumulated before it" in localization.describe({"first_off": late, "input_match": 0.99}, "INT8")


@pytest.mark.unit
def test_the_search_finds_an_irreducible_set_within_the_budget():
    """Keeps the k worst activations in float, bisecting k, then drops the unneeded: here C and E
    must stay float; the worst (A) need not."""
    sev = {"A": 9.0, "B": 0.5, "C": 5.0, "D": 3.0, "E": 4.0, "F": 0.1}
    entries = [{"node": n, "op": "MatMul", "tensor": n.lower(), "consumers": [], "severity": s} for n, s in sev.items()]
    calls = []

    def passes(nodes):
        calls.append(list(nodes))
        return {"C", "E"} <= set(nodes)

    found = localization.search_float_layers(entries, passes, budget=6, log=lambda _: None)
    assert sorted(found["float_layers"]) == ["C", "E"] and found["tries"] == len(calls)
    assert len(calls) <= 3 + 1 + 4  # log2(6) + 1 to find k, then one per kept activation
    with pytest.raises(Exception, match="budget of 1"):
        localization.search_float_layers(entries, passes, budget=1, log=lambda _: None)


def _runs(sequences, next_ids):
    """A step decoder's runs: one greedy loop and one teacher-forced call per sample."""
    return [{"loop": np.array([seq]), "next_ids": np.array([nxt])} for seq, nxt in zip(sequences, next_ids, strict=True)]


@pytest.mark.unit
def test_the_token_agreement_rule_counts_identical_sequences_and_next_token_choices():
    step, unrolled = GRAPHS["blip_cap_step"], GRAPHS["blip_cap"]
    assert acceptance.token_gate(step, "F32", "agreement", {})[0] is None  # F32 keeps exact equality
    assert acceptance.token_gate(step, "INT8", "exact", {})[0] is None  # selectable below F32
    assert acceptance.token_gate(GRAPHS["blip_cap_venc"], "INT8", "agreement", {})[0] is None  # not a decoder
    assert acceptance.token_gate(step, "BF16", "agreement", {})[0]["min_share"] == acceptance.TOKEN_AGREEMENT["BF16"]
    rng = np.random.default_rng(0)
    want = [list(rng.integers(1000, 2000, size=12)) for _ in range(10)]
    nxt = [list(rng.integers(1000, 2000, size=12)) for _ in range(10)]
    same = acceptance.accept_tokens(step, _runs(want, nxt), _runs(want, nxt), "F16", 0.9)
    assert same["identical_sequences"] == 1.0 and same["next_token_agreement"] == 1.0
    assert same["first_divergence"] is None and same["sequences"] == 10
    # one sequence of ten parts at position 6 (a flipped near tie): 0.9 identical, the F16 share
    flipped = [list(w) for w in want]
    flipped[3][6:] = [7] * 6
    one = acceptance.accept_tokens(step, _runs(want, nxt), _runs(flipped, nxt), "F16", 0.9)
    assert one["identical_sequences"] == pytest.approx(0.9) and one["first_divergence"] == 6
    flipped[8][9:] = [7] * 3
    with pytest.raises(Exception, match=r"identical sequences 0\.800 \(min 0\.9\), the earliest divergence at "
                                        "position 6"):
        acceptance.accept_tokens(step, _runs(want, nxt), _runs(flipped, nxt), "F16", 0.9)
    # the teacher-forced choices are counted one by one: 3 of 120 wrong is 0.975
    wrong = [list(n) for n in nxt]
    for row in (0, 4, 7):
        wrong[row][2] = 7
    forced = acceptance.accept_tokens(step, _runs(want, nxt), _runs(want, wrong), "BF16", 0.8)
    assert forced["next_token_agreement"] == pytest.approx(117 / 120)
    with pytest.raises(Exception, match="next-token agreement 0.975"):
        acceptance.accept_tokens(step, _runs(want, nxt), _runs(want, wrong), "BF16", 0.98)
    # an unrolled decoder's rows are whole sequences; no teacher forcing there
    rows = [{"caption_ids": np.array([w])} for w in want]
    assert "next_token_agreement" not in acceptance.accept_tokens(unrolled, rows, rows, "INT8", 0.7)


IMAGE_FEAT = {"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 0},
              "graphs": ["BLIP_image_feat"], "calibration": {"samples": 4}}


def test_a_failing_int8_cell_names_its_layer_and_mixed_precision_makes_it_pass(tmp_path):
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{**IMAGE_FEAT, "targets": {"cpu": {"precisions": ["INT8"]}}}], root)
    failed = doit(cfg, check=False)
    assert failed.returncode != 0
    line = next(x for x in failed.stdout.splitlines() if x.startswith("F  ort:r.BLIP_image_feat.cpu.INT8.1b"))
    assert "first layer off in INT8:" in line and "(MatMul)" in line and "the error starts there" in line
    marker = json.loads((root / ".state/failed/ort__r.BLIP_image_feat.cpu.INT8.1b.json").read_text())
    assert marker["finding"]["first_off"]["op"] == "MatMul" and marker["finding"]["worst"]["node"]
    stale = doit(cfg, "stale", check=False).stdout
    assert "last build failed:" in stale and marker["finding"]["first_off"]["node"] in stale

    def mixed(budget: int):
        write_config(cfg, [{**IMAGE_FEAT, "targets": {"cpu": {"precisions": ["INT8"], "mixed_precision": "auto",
                                                                "max_float_layers": budget}}}], root)
    mixed(8)
    proc = doit(cfg)
    assert executed(proc) == ["float_layers:r.BLIP_image_feat.cpu.INT8.1b", "ort:r.BLIP_image_feat.cpu.INT8.1b"]
    rec = json.loads((root / ".state/ort__r.BLIP_image_feat.cpu.INT8.1b.json").read_text())
    table = json.loads((root / "r/CPU/BLIP_image_feat_cpu_int8_1b.ort.float_layers.json").read_text())
    assert rec["float_layers"] == table["float_layers"] and 0 < len(rec["float_layers"]) <= 8
    assert rec["figures"]["ort_vs_onnx"]["cosine"] >= 0.95 and rec["figures"]["ort_vs_onnx"]["rel_max_abs"] <= 0.2
    assert not table["pure"]["passes"] and table["quantizations"] <= 12
    assert executed(doit(cfg)) == []  # the search is an artifact: not run again
    mixed(1)
    proc = doit(cfg, check=False)  # a new budget searches again; one node is not enough here
    assert "float_layers:r.BLIP_image_feat.cpu.INT8.1b" in proc.stdout and "budget of 1" in proc.stdout


@pytest.mark.tpu_mlir
def test_a_toolchain_crash_names_its_op_and_mixed_precision_compiles_around_it(tmp_path):
    """blip_itm in INT8 on bm1684x: tpuc-opt fails without a message. The build bisects with
    quantize tables to the op whose INT8 lowering crashes, and `mixed_precision: auto` keeps it in F32."""
    root = tmp_path / "artifacts"
    itm = {"name": "r", "task": "retrieval", "checkpoint": {"synthetic": "tiny", "seed": 0}, "graphs": ["blip_itm"],
           "calibration": {"samples": 4}}
    cfg = write_config(tmp_path / "models.yaml", [{**itm, "targets": {"bm1684x": {"precisions": ["INT8"]}}}], root)
    failed = doit(cfg, check=False)
    line = next(x for x in failed.stdout.splitlines() if x.startswith("F  bmodel:r.blip_itm.bm1684x.INT8.1b"))
    marker = json.loads((root / ".state/failed/bmodel__r.blip_itm.bm1684x.INT8.1b.json").read_text())
    crash = marker["finding"]["crash"]
    assert crash["op"] and crash["type"] and f"{crash['op']} ({crash['type']})" in line, line
    assert crash["compiles"] <= 12  # about log2(ops) + 2, not one per op
    write_config(cfg, [{**itm, "targets": {"bm1684x": {"precisions": ["INT8"], "mixed_precision": "auto"}}}], root)
    proc = doit(cfg)
    assert executed(proc) == ["float_ops:r.blip_itm.bm1684x.INT8.1b", "bmodel:r.blip_itm.bm1684x.INT8.1b"]
    rec = json.loads((root / ".state/bmodel__r.blip_itm.bm1684x.INT8.1b.json").read_text())
    table = json.loads((root / "r/BM1684X/blip_itm_bm1684x_int8_1b.bmodel.float_ops.json").read_text())
    # the crashing op, besides what INT8 cannot carry, kept outright: ids and positions beyond 127,
    # the text encoder's attention mask (-10000) and the ops reading it
    outright = table["integer_path"] + table["mask_path"]
    assert rec["float_ops"] == outright + [crash["op"]] and crash["op"] not in outright
    assert any("attention/self/Add" in op for op in table["mask_path"])
    assert rec["figures"]["bmodel_vs_onnx"]["cosine"] >= 0.95
    _assert_takes_the_searched_build(root, "r.blip_itm.bm1684x.INT8.1b", table)
    assert executed(doit(cfg)) == []


@pytest.mark.tpu_mlir
def test_int8_keeps_an_unrolled_decoders_ids_and_finished_flags_in_f32_outright(tmp_path):
    """blip_vqa_tdec in INT8 on bm1684: every decoding step compares the new id with [SEP] and
    updates the finished flags (whole numbers, 0 or 1, and ids within 127 such as [SEP] itself).
    INT8 scales them by calibrated ranges; lowered, model_deploy crashed at the first step's
    comparison, and once that was in F32 at the next one's. Kept in F32 outright, as token ids
    are, the decoder compiles at once: no crash to search."""
    from compile.tpu_mlir import top_ops

    root = tmp_path / "artifacts"
    target = {"precisions": ["INT8"], "mixed_precision": "auto", "max_float_layers": 1, "simulate": False,
              "check_lowering": False}
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "v", "task": "vqa", "checkpoint": {"synthetic": "tiny", "seed": 2}, "graphs": ["blip_vqa_tdec"],
        "calibration": {"samples": 4}, "targets": {"bm1684": target}}], root)
    doit(cfg, timeout=2400)
    table = json.loads((root / "v/BM1684/blip_vqa_tdec_bm1684_int8_1b.bmodel.float_ops.json").read_text())
    assert table["steps"] == [] and table["compiles"] == 1, table["steps"]
    ops = top_ops((root / "v/tpu_mlir/blip_vqa_tdec_1b/blip_vqa_tdec_1b.mlir").read_text())
    compares = [name for name, kind in ops if kind == "CompareConst"]
    assert len(compares) > 1 and set(compares) <= set(table["integer_path"])
    assert executed(doit(cfg)) == []


def _assert_takes_the_searched_build(root, cell: str, table: dict):
    """The search's last passing try built and checked the final table: the bmodel stage takes that
    file instead of compiling and validating it again."""
    from buildplan.files import sha256_file

    bmodel = json.loads((root / f".state/bmodel__{cell}.json").read_text())
    built = root / json.loads((root / f".state/float_ops__{cell}.json").read_text())["roles"]["searched_bmodel"]
    assert sha256_file(built) == table["bmodel"]["sha256"] == bmodel["outputs"][bmodel["roles"]["bmodel"]]["sha256"]
    assert bmodel["figures"] == table["bmodel"]["figures"]
    assert "model_deploy.py" not in (root / bmodel["log"]).read_text()


def _overflowing_checkpoint(tmp_path):
    """One layer of a tiny caption checkpoint scaled past F16's range (65504): harmless in F32,
    where the next LayerNorm rescales it; in F16 that layer's output overflows."""
    from export.synthetic import save, synthetic_state_dict

    state = synthetic_state_dict("captioning", "tiny", 1)
    for key in ("visual_encoder.blocks.1.mlp.fc2.weight", "visual_encoder.blocks.1.mlp.fc2.bias"):
        state[key] = state[key] * 1e6
    save(state, tmp_path / "model_caption.pth")
    return tmp_path / "model_caption.pth"


@pytest.mark.tpu_mlir
def test_a_layer_that_overflows_in_f16_is_named_by_comparing_every_tensor(tmp_path):
    """The overflowing layer is named exactly, with and without the cmodel."""
    _overflowing_checkpoint(tmp_path)
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "c", "task": "captioning", "checkpoint": str(tmp_path / "model_caption.pth"), "arch": "tiny",
        "graphs": ["blip_cap_venc"], "targets": {"bm1684x": {"precisions": ["F32", "F16"]}}}], root)
    proc = doit(cfg, "--continue", check=False, timeout=1200)
    assert proc.returncode != 0
    assert "bmodel:c.blip_cap_venc.bm1684x.F32.1b" in executed(proc)  # F32 builds and passes
    marker = json.loads((root / ".state/failed/bmodel__c.blip_cap_venc.bm1684x.F16.1b.json").read_text())
    first = marker["finding"]["first_off"]
    assert "/encoder/layers.1/mlp/fc2/" in first["node"] and first["starts_here"], first
    assert first["cosine"] < 0.99 or first["rel_max_abs"] > 0.05
    line = next(x for x in proc.stdout.splitlines() if x.startswith("F  bmodel:c.blip_cap_venc.bm1684x.F16.1b"))
    assert f"first layer off in F16: {first['node']} ({first['op']})" in line and "the error starts there" in line
    assert "last build failed:" in doit(cfg, "stale", check=False).stdout
    # without the cmodel (BLIP-base image graphs take hours on it) the F16 bmodel is not checked at
    # all; check_lowering compares its TPU dialect in TPU-MLIR's interpreter, and names the layer again
    target = {"precisions": ["F16"], "simulate": False}
    model = {"name": "c", "task": "captioning", "checkpoint": str(tmp_path / "model_caption.pth"), "arch": "tiny",
             "graphs": ["blip_cap_venc"]}
    write_config(cfg, [{**model, "targets": {"bm1684x": target}}], root)
    doit(cfg, timeout=1200)
    unchecked = json.loads((root / ".state/bmodel__c.blip_cap_venc.bm1684x.F16.1b.json").read_text())
    assert not unchecked["simulated"] and unchecked["figures"]["tpu_mlir"] == []
    write_config(cfg, [{**model, "targets": {"bm1684x": {**target, "check_lowering": True}}}], root)
    proc = doit(cfg, check=False, timeout=1200)
    marker = json.loads((root / ".state/failed/bmodel__c.blip_cap_venc.bm1684x.F16.1b.json").read_text())
    assert proc.returncode != 0 and marker["finding"]["first_off"]["node"] == first["node"]


@pytest.mark.tpu_mlir
def test_an_f16_accuracy_miss_passes_with_the_layers_it_localizes_kept_in_f32(tmp_path):
    """The overflowing checkpoint compiles in F16 and misses its acceptance. mixed_precision: auto
    localizes the miss, searches the fewest of the worst ops to keep in F32, and the bmodel built
    with that table passes on the cmodel; the table is an artifact: no second search, and a new
    budget searches again."""
    model = {"name": "c", "task": "captioning", "checkpoint": str(_overflowing_checkpoint(tmp_path)), "arch": "tiny",
             "graphs": ["blip_cap_venc"]}
    root = tmp_path / "artifacts"

    def budget(n: int):
        return write_config(tmp_path / "models.yaml", [{**model, "targets": {"bm1684x": {
            "precisions": ["F16"], "mixed_precision": "auto", "max_float_layers": n}}}], root)
    cfg = budget(8)
    proc = doit(cfg, timeout=1800)
    assert executed(proc)[-2:] == ["float_ops:c.blip_cap_venc.bm1684x.F16.1b", "bmodel:c.blip_cap_venc.bm1684x.F16.1b"]
    table = json.loads((root / "c/BM1684X/blip_cap_venc_bm1684x_f16_1b.bmodel.float_ops.json").read_text())
    first = table["accuracy"]["localized"]["first_off"]  # pure F16, as localized
    assert "/encoder/layers.1/mlp/fc2/" in first["node"] and first["starts_here"], first
    searched = table["accuracy"]["ops"]
    assert first["node"] in searched and 0 < len(searched) <= 8 and table["float_ops"][-len(searched):] == searched
    rec = json.loads((root / ".state/bmodel__c.blip_cap_venc.bm1684x.F16.1b.json").read_text())
    assert rec["float_ops"] == table["float_ops"]
    figures = rec["figures"]["bmodel_vs_onnx"]  # on the cmodel, under F16's unchanged rule
    assert figures["cosine"] >= acceptance.ACCEPT["F16"][0] and figures["rel_max_abs"] <= acceptance.ACCEPT["F16"][1]
    _assert_takes_the_searched_build(root, "c.blip_cap_venc.bm1684x.F16.1b", table)
    assert executed(doit(cfg)) == []
    proc = doit(budget(len(searched) - 1), check=False, timeout=1800) if len(searched) > 1 else None
    if proc is not None:  # one op fewer than the search kept cannot pass: it says so
        assert proc.returncode != 0 and "budget of" in proc.stdout and "float_ops:c.blip_cap_venc" in proc.stdout


def _int8_step_table(tmp_path, task: str, graph: str, seed: int) -> tuple[dict, dict]:
    """A tiny step decoder in INT8 on bm1684x, mixed precision with a budget of one op: its
    float_ops table (or, when the search fails, the failure's finding, which holds the same
    paths), and what the pure lowering missed: {"as_is", "first_off"} (empty when it passed)."""
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "m", "task": task, "checkpoint": {"synthetic": "tiny", "seed": seed}, "graphs": [graph],
        "calibration": {"samples": 4},
        "targets": {"bm1684x": {"precisions": ["INT8"], "mixed_precision": "auto", "max_float_layers": 1}}}], root)
    doit(cfg, check=False, timeout=1800)
    table_file = root / f"m/BM1684X/{graph}_bm1684x_int8_1b.bmodel.float_ops.json"
    if table_file.exists():
        table = json.loads(table_file.read_text())
        return table, {"as_is": table["accuracy"].get("as_is", ""),
                       "first_off": table["accuracy"].get("localized", {}).get("first_off")}
    finding = json.loads((root / f".state/failed/float_ops__m.{graph}.bm1684x.INT8.1b.json").read_text())["finding"]
    return finding, {"as_is": finding["as_is"], "first_off": finding["first_off"]}


@pytest.mark.tpu_mlir
def test_int8_keeps_the_additive_masks_in_f32(tmp_path):
    """The caption step decoder adds -1e9 to the end token's logit before the minimum length. One
    INT8 scale over that and logits of about 15 makes every logit 0, and ArgMax chose token 0 at
    every position (next-token agreement 0.00). The op adding it, and its reader, stay in F32
    outright; what the cell then misses or passes is measured on real logits."""
    import re

    table, localized = _int8_step_table(tmp_path, "captioning", "blip_cap_step", 1)
    as_is = localized["as_is"]
    penalty = "/Add_output_0_Add"  # logits + the end-token penalty, read by the ArgMax
    assert penalty in table["mask_path"] and "next_ids_ArgMax" in table["integer_path"] + table["mask_path"]
    assert set(table["integer_path"] + table["mask_path"]) <= set(table["float_ops"])
    share = re.search(r"next-token agreement (\d\.\d+)", as_is)
    assert share is None or float(share.group(1)) > 0.1, as_is  # tokens from the logits, not from a scale of 1e9


@pytest.mark.tpu_mlir
def test_int8_keeps_a_fused_masked_attention_whole_in_f32(tmp_path):
    """On bm1684x TPU-MLIR fuses an attention into one op named after its output projection, which
    the quantize table's mask Add and Softmax entries then miss: the answer decoder's INT8
    cross-attention parted from the float one on the question's mask. Keeping the projection keeps
    the fused op in F32, so the lowering's first op off is no longer inside an attention."""
    table, localized = _int8_step_table(tmp_path, "vqa", "blip_vqa_tdec_step", 2)
    first_off = localized["first_off"]
    layers = "/text_decoder/bert/encoder/layer."
    assert {f"{layers}{i}/{block}/output/dense/Add_output_0_Add" for i in (0, 1)
            for block in ("attention", "crossattention")} <= set(table["mask_path"])
    assert first_off is None or "attention" not in first_off["node"], first_off


@pytest.mark.tpu_mlir
def test_step_decoders_below_f32_are_held_to_token_agreement_over_many_inputs(tmp_path):
    """F16 keeps every decision of the tiny caption decoder within the agreement rule; BF16 flips
    near ties (every tensor still within its rule) and misses it, saying so."""
    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "c", "task": "captioning", "checkpoint": {"synthetic": "tiny", "seed": 1}, "graphs": ["blip_cap_step"],
        "targets": {"bm1684x": {"precisions": ["F16", "BF16"]}}}], root)
    proc = doit(cfg, "--continue", check=False, timeout=1200)
    rec = json.loads((root / ".state/bmodel__c.blip_cap_step.bm1684x.F16.1b.json").read_text())
    tokens = rec["figures"]["tokens_vs_onnx"]
    assert rec["acceptance"] == "tokens_vs_onnx" and tokens["samples"] == 10 and tokens["sequences"] == 4
    assert tokens["identical_sequences"] >= 0.9 and tokens["next_token_agreement"] >= 0.9
    line = next(x for x in proc.stdout.splitlines() if x.startswith(".  bmodel:c.blip_cap_step.bm1684x.F16.1b"))
    assert "of sequences identical" in line
    failed = next(x for x in proc.stdout.splitlines() if x.startswith("F  bmodel:c.blip_cap_step.bm1684x.BF16.1b"))
    assert "token agreement with the ONNX reference over 10 inputs: identical sequences" in failed
    assert "the tokens that differ are near ties" in failed


@pytest.mark.tpu_mlir
def test_token_ids_stay_in_f32_where_the_precision_cannot_hold_them(tmp_path):
    """The unrolled caption decoder carries its token ids (up to 30522) through ArgMax and Concat.
    F16 holds whole numbers exactly only up to 2048: lowered as they are, the ids round and the
    word-embedding lookup takes another word from the first token on. Mixed precision keeps that
    path in F32 outright (without spending the budget); what may remain are near ties later on."""
    import re

    root = tmp_path / "artifacts"
    cfg = write_config(tmp_path / "models.yaml", [{
        "name": "c", "task": "captioning", "checkpoint": {"synthetic": "tiny", "seed": 1}, "graphs": ["blip_cap"],
        "targets": {"bm1684x": {"precisions": ["F16"], "mixed_precision": "auto", "max_float_layers": 1}}}], root)
    doit(cfg, check=False, timeout=1800)
    table_file = root / "c/BM1684X/blip_cap_bm1684x_f16_1b.bmodel.float_ops.json"
    search_failed = root / ".state/failed/float_ops__c.blip_cap.bm1684x.F16.1b.json"
    if table_file.exists():
        table = json.loads(table_file.read_text())
        assert table["float_ops"] == table["integer_path"] and table["compiles"] == 1  # nothing else kept
        assert not table["accuracy"].get("ops")
    else:  # synthetic weights: near ties may still flip a late token, and one op more does not help
        marker = json.loads(search_failed.read_text())
        table, error = marker["finding"], marker["error"]
        assert "budget of 1" in error and "near ties" in error, error
        assert int(re.search(r"earliest divergence at position (\d+)", error).group(1)) > 0, error
    assert {"/ArgMax_output_0_ArgMax", "caption_ids_Concat"} <= set(table["integer_path"])
    assert table["float_ops"][:len(table["integer_path"])] == table["integer_path"]


@pytest.mark.unit
def test_onnx_runtime_int8_keeps_an_additive_attention_mask_float(tmp_path):
    """scores + (1 - mask) * -10000 -> Softmax. With padded calibration samples, one uint8 scale
    over that Add spans -10000 and the scores round to nothing: the attention becomes uniform.
    The mask path stays float, and the INT8 model's attention equals the float one's."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from compile.ort import quantize

    nodes = [helper.make_node("MatMul", ["x", "W"], ["scores"], name="Scores"),
             helper.make_node("Sub", ["one", "mask"], ["inverted"], name="Invert"),
             helper.make_node("Mul", ["inverted", "big"], ["additive"], name="MaskValue"),
             helper.make_node("Add", ["scores", "additive"], ["masked"], name="ApplyMask"),
             helper.make_node("Softmax", ["masked"], ["attention"], name="Attention", axis=-1)]
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
            numpy_helper.from_array(np.array(1.0, np.float32), "one"),
            numpy_helper.from_array(np.array(-10000.0, np.float32), "big")]
    graph = helper.make_graph(nodes, "masked_attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                               helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("attention", TensorProto.FLOAT, [1, 8])], init)
    onnx_file = tmp_path / "attention.onnx"
    onnx_file.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                            ir_version=8).SerializeToString())

    def sample(length: int) -> dict:
        return {"x": rng.standard_normal((1, 8)).astype(np.float32),
                "mask": (np.arange(8) < length).astype(np.float32)[None]}
    calibration = [sample(n) for n in (8, 5, 3, 6)]
    masks = quantize(onnx_file, tmp_path / "int8.onnx", calibration, per_channel=True)
    assert {"MaskValue", "ApplyMask", "Attention"} <= set(masks) and "Scores" not in masks
    test = sample(4)
    want = ort.InferenceSession(str(onnx_file)).run(None, test)[0]
    got = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, test)[0]
    assert np.abs(got - want).max() < 0.05, (got, want)  # quantized over the mask: uniform over 4

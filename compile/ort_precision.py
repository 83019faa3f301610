"""Precision work for the ONNX Runtime backend: say where a quantized model parts from its float
model, and find the few layers to keep in float so that INT8 passes its acceptance.

Localization runs the float graph and the quantized (QDQ) graph side by side on the reference
inputs, every float activation made a graph output, and compares each node's output as its
consumers read it (after the quantizer's QuantizeLinear/DequantizeLinear pair: a tensor's
quantization error is its producer's) with the float one, under the precision's rule
(acceptance.ACCEPT: cosine, and largest error relative to the reference's largest magnitude).
It names the first node, in graph order, that misses the rule, with its op type and figures, and
whether its inputs still match (the error starts there) or already differ (it accumulated); and
the worst one. It costs two inference runs per chunk of tensors and no extra quantization.

The findings and the mixed-precision search are compile/localization.py's; here a float layer
is the producing node and every consumer (ORT's nodes_to_exclude: only then does the quantizer
leave the tensor alone), and each try of the search is one quantization.
"""
from __future__ import annotations

import numpy as np

from compile.localization import tensor_figures

CHUNK = 256  # tensors per inference run: bounds the memory the extra outputs take at BLIP-base size


def _float_tensors(model) -> dict[str, int]:
    """Activation name -> ONNX element type, for every tensor whose type is known and float."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return {n: t for n, t in types.items() if t in floats}


def _run_with_outputs(model, feeds: dict, names: list[str], types: dict[str, int]) -> dict[str, np.ndarray]:
    session, wanted = _session_with_outputs(model, names, types)
    return dict(zip(wanted, session.run(wanted, feeds), strict=True))


def _session_with_outputs(model, names: list[str], types: dict[str, int]):
    """A session of `model` with the activations `names` made outputs, and those it can give."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in names if n not in existing)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every node as named
    options.log_severity_level = 3
    session = ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
    available = {o.name for o in session.get_outputs()}
    return session, [n for n in names if n in available]


def mask_path(onnx_file, samples) -> list[str]:
    """The nodes that produce or read an additive mask: a float activation reaching MASK_MAGNITUDE
    on a calibration sample (BERT's -10000 on padded positions, a decoder's -1e9 on a blocked
    token). Quantized, one uint8 scale would span the mask and the scores added to it, and the
    scores would round to a few steps; they stay float in every INT8 model."""
    import onnx

    from compile.localization import MASK_MAGNITUDE

    model = onnx.load(str(onnx_file))
    types = _float_tensors(model)
    names = [o for node in model.graph.node for o in node.output if o in types]
    carrying: set[str] = set()
    for start in range(0, len(names), CHUNK):
        session, wanted = _session_with_outputs(model, names[start:start + CHUNK], types)  # one per chunk, every sample
        for feeds in samples:
            got = zip(wanted, session.run(wanted, feeds), strict=True)
            carrying |= {k for k, v in got if v.size and float(np.abs(v).max()) >= MASK_MAGNITUDE}
    return [n.name for n in model.graph.node if carrying.intersection([*n.output, *n.input])]


def as_consumed(quantized_model) -> dict[str, str]:
    """Activation -> what its consumers read in a QDQ graph: X -> DequantizeLinear(QuantizeLinear(X))
    wherever the quantizer put a pair on it."""
    producer = {o: n for n in quantized_model.graph.node for o in n.output}
    found = {}
    for n in quantized_model.graph.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                found[q.input[0]] = n.output[0]
    return found


def profile(float_model, quantized_model, feeds: dict, precision: str) -> list[dict]:
    """Per activation, in graph order: the producing node, its op, its consumers, and the figures
    of the quantized graph's tensor against the float graph's."""
    f_types, q_types = _float_tensors(float_model), _float_tensors(quantized_model)
    consumed = as_consumed(quantized_model)
    consumers: dict[str, list[str]] = {}
    for n in float_model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    order = [(node, out) for node in float_model.graph.node if node.name for out in node.output[:1]
             if out in f_types and consumed.get(out, out) in q_types]
    entries = []
    for start in range(0, len(order), CHUNK):
        part = order[start:start + CHUNK]
        ref = _run_with_outputs(float_model, feeds, [out for _, out in part], f_types)
        got = _run_with_outputs(quantized_model, feeds, [consumed.get(out, out) for _, out in part], q_types)
        for node, out in part:
            seen = consumed.get(out, out)
            if out in ref and seen in got:
                entries.append({"node": node.name, "op": node.op_type, "tensor": out, "inputs": list(node.input),
                                "consumers": consumers.get(out, []), **tensor_figures(ref[out], got[seen], precision)})
    return entries



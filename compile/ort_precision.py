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

The mixed-precision search ranks the activations by how far they miss the rule (severity: the
larger of (1 - cosine) / (1 - min cosine) and relative error / max relative error), keeps the k
worst in float (the producing node and every consumer, ORT's nodes_to_exclude: only then does the
quantizer leave the tensor alone), and bisects k between 1 and what the budget allows; then it
tries dropping kept tensors, least severe first, in halving groups, keeping every drop that still
passes. Its cost: about log2(budget) + 1 quantizations to find k, and at most PRUNE_TRIES to prune
(with one kept tensor or a few, every single drop is tried: the set is then irreducible).
"""
from __future__ import annotations

import numpy as np

from buildplan.core import GateError
from compile.acceptance import ACCEPT

CHUNK = 256  # tensors per inference run: bounds the memory the extra outputs take at BLIP-base size
PRUNE_TRIES = 24  # quantizations spent dropping unneeded float layers after the bisection


def input_match(precision: str) -> float:
    """How close an input must be for the error to start at its consumer: a fifth of the
    precision's allowed 1 - cosine (INT8: 0.99)."""
    return 1.0 - (1.0 - ACCEPT[precision][0]) / 5


def tensor_figures(ref: np.ndarray, got: np.ndarray, precision: str) -> dict:
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cosine = float(r @ g / denom) if denom > 0 else float(np.allclose(r, g))
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    rel = float(np.max(np.abs(r - g)) / scale) if scale > 0 else float(np.max(np.abs(g), initial=0.0) > 0)
    min_cos, max_rel = ACCEPT[precision]
    return {"cosine": cosine, "rel_max_abs": rel,
            "severity": max((1.0 - cosine) / (1.0 - min_cos), rel / max_rel)}


def _float_tensors(model) -> dict[str, int]:
    """Activation name -> ONNX element type, for every tensor whose type is known and float."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return {n: t for n, t in types.items() if t in floats}


def _run_with_outputs(model, feeds: dict, names: list[str], types: dict[str, int]) -> dict[str, np.ndarray]:
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
    wanted = [n for n in names if n in available]
    return dict(zip(wanted, session.run(wanted, feeds), strict=True))


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


def findings(entries: list[dict], precision: str, graph_inputs=()) -> dict:
    """The first activation off (severity > 1), whether its error starts there, and the worst."""
    by_tensor = {e["tensor"]: e for e in entries}
    match = input_match(precision)
    out = {"compared": len(entries), "input_match": match}
    first = next((e for e in entries if e["severity"] > 1.0), None)
    if first is not None:
        inputs = {i: by_tensor[i]["cosine"] for i in first["inputs"] if i in by_tensor}
        inputs.update({i: 1.0 for i in first["inputs"] if i in graph_inputs})
        out["first_off"] = {**_short(first), "inputs": inputs,
                            "starts_here": all(c >= match for c in inputs.values())}
    if entries:
        out["worst"] = _short(max(entries, key=lambda e: e["severity"]))
    return out


def _short(e: dict) -> dict:
    return {k: e[k] for k in ("node", "op", "tensor", "cosine", "rel_max_abs", "severity")}


def describe(found: dict, precision: str) -> str:
    """One line for a failure message, the console and the dashboard."""
    first = found.get("first_off")
    if first is None:
        return f"every intermediate tensor meets the {precision} rule; only the outputs miss it"
    worst_input = min(first["inputs"].values(), default=1.0)
    where = (f"its inputs still match (cosine >= {found['input_match']:.3g}): the error starts there"
             if first["starts_here"] else
             f"its inputs already differ (cosine {worst_input:.4f}): the error accumulated before it")
    text = (f"first layer off in {precision}: {first['node']} ({first['op']}), cosine {first['cosine']:.4f}, "
            f"relative max error {first['rel_max_abs']:.3f}; {where}")
    worst = found.get("worst")
    if worst and worst["node"] != first["node"]:
        text += (f"; worst: {worst['node']} ({worst['op']}), cosine {worst['cosine']:.4f}, "
                 f"relative max error {worst['rel_max_abs']:.3f}")
    return text


def float_nodes(entries: list[dict]) -> list[str]:
    """The nodes to exclude from quantization so that these activations stay float."""
    nodes: list[str] = []
    for e in entries:
        nodes += [n for n in [e["node"], *e["consumers"]] if n and n not in nodes]
    return nodes


def search_float_layers(entries: list[dict], passes, budget: int, log) -> dict:
    """The fewest activations (and so nodes) to keep in float for `passes(nodes)` to be true,
    within `budget` nodes. `entries`: profile() of the pure quantization that failed."""
    ranked = sorted((e for e in entries if e["severity"] > 0.0), key=lambda e: -e["severity"])
    most = 0
    while most < len(ranked) and len(float_nodes(ranked[:most + 1])) <= budget:
        most += 1
    quantizations = 0

    def tried(k: int) -> bool:
        nonlocal quantizations
        quantizations += 1
        ok = passes(float_nodes(ranked[:k]))
        log(f"mixed precision: the {k} worst activations in float ({len(float_nodes(ranked[:k]))} nodes): "
            f"{'passes' if ok else 'misses'}")
        return ok

    if most == 0 or not tried(most):
        raise GateError(f"mixed precision: even the {most} worst activations in float "
                        f"({len(float_nodes(ranked[:most]))} of a budget of {budget} nodes) do not make it pass; "
                        f"worst: {ranked[0]['node'] if ranked else '-'}. Raise max_float_layers or keep F32")
    low, high = 0, most  # low fails (k=0 is the pure quantization), high passes
    while high - low > 1:
        mid = (low + high) // 2
        if tried(mid):
            high = mid
        else:
            low = mid
    kept = ranked[:high]
    # With the others in float some may be unneeded: try dropping them, least severe first, in
    # halving groups (one try can drop many), within PRUNE_TRIES quantizations.
    size, tries = max(1, len(kept) // 2), 0
    while size >= 1 and tries < PRUNE_TRIES and len(kept) > 1:
        start = len(kept)
        while start > 0 and tries < PRUNE_TRIES:
            group = kept[max(0, start - size):start]
            trial = [k for k in kept if all(k is not g for g in group)]
            start -= size
            if not trial:
                continue
            tries += 1
            quantizations += 1
            if passes(float_nodes(trial)):
                log(f"mixed precision: {len(group)} activations need not stay float ({group[0]['node']} ...)")
                kept = trial
        size //= 2
    return {"float_layers": float_nodes(kept), "tensors": [e["tensor"] for e in kept], "quantizations": quantizations}

"""Stage `onnx`: one checkpoint load per model -> every declared split graph as raw ONNX.

Raw graphs keep batch as their only dynamic axis. Each is gated against PyTorch with
ONNX Runtime at two batch sizes other than the traced one, which also proves the batch
axis really is dynamic.
"""
from __future__ import annotations

import warnings

from buildplan.core import PYTHON, Node
from export.specs import GRAPHS

STAGE_DOCS = {"onnx": "raw split ONNX graphs (one checkpoint load)"}
MEMORY_MB = {"onnx": {"tiny": 1000, "base": 6500}}  # peak RSS, measured (README: base exports 3.4-5.7 GB)

TRACE_BATCH = 2
GATE_BATCHES = (1, 3)


def onnx_path(model: str, graph: str) -> str:
    return f"{model}/onnx/{graph}.onnx"


def raw_role(graph: str) -> str:
    """The role of a graph's raw ONNX among the outputs of the model's `onnx` node."""
    return f"onnx:{graph}"


def declare(plan, model, dims: dict, ckpt: dict) -> str:
    """The second export stage: one node for all of a model's raw graphs (one checkpoint load)."""
    node = plan.add(Node(
        id=f"onnx:{model.name}", stage="onnx", model=model.name,
        outputs={raw_role(g): onnx_path(model.name, g) for g in model.graphs},
        action="export.stage:run", toolchain=PYTHON,
        deps=(ckpt["node"],) if ckpt["node"] else (),
        sources=() if ckpt["node"] else (ckpt["path"],),
        params={"task": model.task, "arch": model.arch, "dims": dims, "checkpoint_kind": ckpt["kind"],
                "graphs": {g: GRAPHS[g].as_dict() for g in model.graphs}},
        labels={"graphs": list(model.graphs)},
    ), f"export:{model.name}")
    return node.id


def signature(spec, dims, batch) -> dict:
    return {
        "inputs": [{"name": t.name, "shape": s, "dtype": t.dtype} for t, s in
                   zip(spec.inputs, spec.shapes(dims, batch).values(), strict=True)],
        "outputs": [{"name": t.name, "shape": s, "dtype": t.dtype} for t, s in
                    zip(spec.outputs, spec.output_shapes(dims, batch).values(), strict=True)],
    }


def fix_output_dims(model, spec, dims, batch: int | None = None) -> None:
    """Shape inference (the tracer's, and onnxsim's on large graphs) can leave output dims
    symbolic; the spec knows them, so state them. batch=None keeps the batch axis dynamic."""
    shapes = spec.output_shapes(dims, 1)
    for v in model.graph.output:
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            if i == 0 and batch is None:
                d.dim_param = spec.batch_axis_name
            else:
                d.dim_value = batch if i == 0 else shapes[v.name][i]


def check_onnx_io(path, spec, dims, batch: int | None = None) -> None:
    """The file must carry the spec's names, dtypes and shapes: a dynamic batch axis when
    batch is None, else exactly that batch."""
    import onnx

    from buildplan.core import GateError

    m = onnx.load(str(path), load_external_data=False)
    first = spec.batch_axis_name if batch is None else batch
    for kind, declared, actual in (("input", spec.inputs, m.graph.input), ("output", spec.outputs, m.graph.output)):
        got = [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in actual]
        want = [(t.name, t.dtype, [first] + s[1:]) for t, s in
                zip(declared, [list(x) for x in (spec.shapes(dims, 1) if kind == "input" else spec.output_shapes(dims, 1)).values()], strict=True)]
        if got != want:
            raise GateError(f"{spec.name}: ONNX {kind}s {got} do not match the spec {want}")


def share_initializers(model) -> int:
    """Point every consumer of an `Identity(initializer)` at the initializer itself and drop the
    Identity. The exporter reaches a weight used in several places through such Identities; with
    onnxsim's optimisations off they survive, and constant folding then copies the weight once per
    Identity. Returns how many were removed."""
    inits = {i.name for i in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    alias = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in graph_outputs}
    if not alias:
        return 0
    kept = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in kept:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(alias)


def ort_step(session):
    """A step decoder's ONNX Runtime session as the step function of export.decoding.greedy_loop."""
    return lambda feeds: session.run(None, feeds)[0]


def run(node: Node, ctx) -> dict:
    import onnx
    import onnxruntime as ort
    import torch

    from export.decoding import greedy_loop, loop_settings
    from export.gates import compare, worst
    from export.graphs import build, reference_generate
    from export.loading import load_model
    from export.samples import make_inputs

    p = node.params
    dims = p["dims"]
    ckpt = str(ctx.input("checkpoint")) if node.deps else node.sources[0]
    model, report = load_model(ckpt, p["checkpoint_kind"], p["task"], dims)
    ctx.log(f"loaded {ckpt}: ignored {len(report['ignored'])} training-state keys"
            + (f", interpolated pos_embed {report['interpolated_pos_embed']}" if report["interpolated_pos_embed"] else ""))
    figures, signatures = {}, {}
    for name in p["graphs"]:
        spec = GRAPHS[name]
        module = build(spec, model, dims)
        out = ctx.tmp(raw_role(name))
        example = make_inputs(spec, dims, TRACE_BATCH)
        axes = {t.name: {0: spec.batch_axis_name} for t in spec.inputs + spec.outputs}
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(module, tuple(torch.from_numpy(v) for v in example.values()), str(out),
                              input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                              dynamic_axes=axes, opset_version=spec.opset, do_constant_folding=True, dynamo=False)
        for w in {str(w.message).splitlines()[0] for w in caught}:
            ctx.log(f"{name}: exporter warning: {w}")
        exported = onnx.load(str(out))
        shared = share_initializers(exported)
        fix_output_dims(exported, spec, dims)
        onnx.save(exported, str(out))
        check_onnx_io(out, spec, dims)
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        per_batch = {}
        for bs in GATE_BATCHES:
            feeds = make_inputs(spec, dims, bs, seed=1)
            with torch.no_grad():
                ref = module(*(torch.from_numpy(v) for v in feeds.values()))
            ref = {spec.outputs[0].name: ref.numpy()} if isinstance(ref, torch.Tensor) else \
                {t.name: r.numpy() for t, r in zip(spec.outputs, ref, strict=True)}
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
            per_batch[f"bs{bs}"] = worst(compare(ref, got, spec.atol, spec.discrete_outputs))
        figures[name] = {"onnx_vs_torch": per_batch}
        if spec.decoding:
            # The loop a runtime runs around this step graph, on ONNX Runtime, against generate().
            loops = {}
            for bs in GATE_BATCHES:
                feeds = make_inputs(spec, dims, bs, seed=1)
                got = greedy_loop(ort_step(session), feeds, **loop_settings(spec, dims))
                loops[f"bs{bs}"] = worst(compare({"ids": reference_generate(model, spec, feeds, dims)}, {"ids": got},
                                                 0.0, discrete=True))
            figures[name]["loop_vs_generate"] = loops
        signatures[name] = signature(spec, dims, "B")
        ctx.log(f"{name}: exported ({shared} weight aliases folded into their initializers), "
                f"gate vs PyTorch {figures[name]}")
        del session
    return {"figures": figures, "signature": signatures,
            "checkpoint": {"ignored_keys": len(report["ignored"]), "ignored_sample": report["ignored"][:8],
                           "interpolated_pos_embed": report["interpolated_pos_embed"]}}

"""Stage `simplify`: one fixed-shape onnxsim graph per (graph, batch size), gated vs the raw one.

Also writes the sample inputs and reference outputs at that batch size (`.io.npz`): the
compile stages validate their artifacts against exactly these.
"""
from __future__ import annotations

from buildplan.plan import Node
from export.specs import GRAPHS
from export.stage import check_onnx_io, fix_output_dims, onnx_path, signature

CODE = ("export/simplify.py", "export/samples.py", "export/gates.py", "export/specs.py", "export/stage.py",
        "export/decoding.py", "export/presets.py")
SAMPLE_SEED = 7
# onnxsim stops after a bounded number of folding rounds; the unrolled decoders need more (Shape
# ops survived from the 6th decoding step on). So simplify again until nothing dynamic is left.
MAX_SIMPLIFY_PASSES = 5
# onnxsim's folding rounds per pass (its default, 50, left Shape ops in 12-layer unrolled decoders).
FIXED_POINT_ITERS = "2000"


def paths(model: str, graph: str, batch: int) -> tuple[str, str]:
    stem = f"{model}/onnx/{graph}_bs{batch}"
    return f"{stem}.onnx", f"{stem}.io.npz"


def declare(plan, model, dims: dict, graph: str, batch: int, onnx_id: str) -> str:
    spec = GRAPHS[graph]
    node = plan.add(Node(
        id=f"simplify:{model.name}.{graph}.bs{batch}", stage="simplify", model=model.name,
        outputs=paths(model.name, graph, batch), action="export.simplify:run", code=CODE, toolchain="python",
        deps=(onnx_id,),
        params={"graph": graph, "batch": batch, "input_shapes": spec.shapes(dims, batch), "atol": spec.atol,
                "discrete": spec.discrete_outputs, "sample_seed": SAMPLE_SEED, "dims": dims},
        labels={"graph": graph, "batch": batch},
    ), f"export:{model.name}")
    return node.id


def read_loop(path) -> dict:
    """A step decoder's loop reference from its .io.npz: {ids input name: token ids [B, length]}."""
    import numpy as np

    with np.load(path) as z:
        return {k[len("loop:"):]: z[k] for k in z.files if k.startswith("loop:")}


def read_io(path) -> tuple[dict, dict]:
    """(inputs, reference outputs) from an .io.npz, each keyed by tensor name."""
    import numpy as np

    with np.load(path) as z:
        ins = {k[len("input:"):]: z[k] for k in z.files if k.startswith("input:")}
        outs = {k[len("output:"):]: z[k] for k in z.files if k.startswith("output:")}
    return ins, outs


def still_dynamic(model) -> list[str]:
    return sorted({n.op_type for n in model.graph.node} & {"Shape", "If", "Loop"})


def simplify_static(model, input_shapes: dict):
    """onnxsim at fixed input shapes, repeated while Shape ops survive and the graph still shrinks.
    Returns (model, passes)."""
    import os

    import onnxsim

    from export.gates import GateError

    os.environ["ONNXSIM_FIXED_POINT_ITERS"] = FIXED_POINT_ITERS  # read by onnxsim at each call
    passes = 0
    while passes == 0 or (still_dynamic(model) and passes < MAX_SIMPLIFY_PASSES):
        before = len(model.graph.node)
        # Constant folding and shape inference only: onnxsim's own fusions (MatMul+Add -> Gemm behind
        # a shared Reshape) made TPU-MLIR 1.30.2 fail on blip_vqa_tenc ("operand does not dominate
        # this use") and on the decoders; both compilers fuse for themselves.
        model, ok = onnxsim.simplify(model, overwrite_input_shapes=None if passes else input_shapes,
                                     perform_optimization=False)
        passes += 1
        if not ok:
            raise GateError("onnxsim could not validate the simplified graph")
        if passes > 1 and len(model.graph.node) == before:
            break  # a fixed point: another pass would not fold anything more
    return model, passes


def run(node: Node, ctx) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from export.decoding import greedy_loop, loop_settings
    from export.gates import GateError, compare, worst
    from export.samples import make_inputs
    from export.stage import ort_step

    p = node.params
    spec = GRAPHS[p["graph"]]
    raw_path = ctx.path(onnx_path(node.model, p["graph"]))
    raw = onnx.load(str(raw_path))
    simplified, passes = simplify_static(raw, p["input_shapes"])
    if still_dynamic(simplified):
        raise GateError(f"{spec.name} bs{p['batch']}: still has {still_dynamic(simplified)} after {passes} onnxsim "
                        "passes: the graph is not fully static")
    out_onnx, out_io = (ctx.tmp(rel) for rel in node.outputs)
    fix_output_dims(simplified, spec, p["dims"], p["batch"])
    onnx.save(simplified, str(out_onnx))
    check_onnx_io(out_onnx, spec, p["dims"], p["batch"])
    feeds = make_inputs(spec, p["dims"], p["batch"], seed=p["sample_seed"])
    ref_sess = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feeds)))
    sess = ort.InferenceSession(str(out_onnx), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    for name, shape in spec.output_shapes(p["dims"], p["batch"]).items():
        if list(got[name].shape) != shape:
            raise GateError(f"{spec.name} bs{p['batch']}: output {name} has shape {list(got[name].shape)}, spec says {shape}")
    fig = worst(compare(ref, got, spec.atol, spec.discrete_outputs))
    figures = {"simplified_vs_raw": fig}
    loop = {}
    if spec.decoding:
        # The whole greedy loop too; its tokens are the reference every compiled step graph must loop to.
        settings = loop_settings(spec, p["dims"])
        loop = {settings["ids_name"]: greedy_loop(ort_step(ref_sess), feeds, **settings)}
        mine = {settings["ids_name"]: greedy_loop(ort_step(sess), feeds, **settings)}
        figures["loop_simplified_vs_raw"] = worst(compare(loop, mine, 0.0, discrete=True))
    np.savez(out_io, **{f"input:{k}": v for k, v in feeds.items()}, **{f"output:{k}": v for k, v in ref.items()},
             **{f"loop:{k}": v for k, v in loop.items()})
    nodes_before, nodes_after = len(raw.graph.node), len(simplified.graph.node)
    ctx.log(f"{spec.name} bs{p['batch']}: {nodes_before} -> {nodes_after} nodes in {passes} onnxsim passes, gate vs raw {fig}")
    return {"figures": figures, "nodes": [nodes_before, nodes_after], "onnxsim_passes": passes,
            "signature": signature(spec, p["dims"], p["batch"])}

"""Stage `simplify`: one fixed-shape onnxsim graph per (graph, batch size), gated vs the raw one.

Also writes the sample inputs and reference outputs at that batch size (`.io.npz`): the
compile stages validate their artifacts against exactly these.
"""
from __future__ import annotations

from buildplan.core import PYTHON, Node
from export.specs import GRAPHS
from export.reference import write_io
from export.stage import check_onnx_io, fix_output_dims, raw_role, signature

STAGE_DOCS = {"simplify": "onnxsim per batch size, with its reference inputs and outputs"}
MEMORY_MB = {"simplify": {"tiny": 1000, "base": 10000}}  # peak RSS, measured (README: base up to 9.0 GB)

SAMPLE_SEED = 7
# onnxsim stops after a bounded number of folding rounds; the unrolled decoders need more (Shape
# ops survived from the 6th decoding step on). So simplify again until nothing dynamic is left.
MAX_SIMPLIFY_PASSES = 5
# onnxsim's folding rounds per pass (its default, 50, left Shape ops in 12-layer unrolled decoders).
FIXED_POINT_ITERS = "2000"


def paths(model: str, graph: str, batch: int) -> dict[str, str]:
    stem = f"{model}/onnx/{graph}_bs{batch}"
    return {"onnx": f"{stem}.onnx", "reference": f"{stem}.io.npz"}


class Exported:
    """What the backends compile from. `raw(graph)` is the batch-dynamic graph (a node id and the
    role of its file there); `fixed(graph, batch)` declares, once, the simplified graph at that
    batch size with its reference inputs and outputs (roles "onnx" and "reference");
    `calibration(graph, batch)` its calibration samples from real data, if the model has any."""

    def __init__(self, plan, model, dims: dict, onnx_id: str):
        self.plan, self.model, self.dims, self.onnx_id = plan, model, dims, onnx_id
        self.calibration_source = None  # set by the calibration_set stage when the model has real data

    def calibration(self, graph: str, batch: int) -> str | None:
        """The node of `graph`'s calibration samples made from real data (role "calibration_set"),
        or None: calibrate on the .npz samples or synthetic ones."""
        return self.calibration_source(graph, batch) if self.calibration_source else None

    def raw(self, graph: str) -> tuple[str, str]:
        return self.onnx_id, raw_role(graph)

    def fixed(self, graph: str, batch: int) -> str:
        spec = GRAPHS[graph]
        node = self.plan.add(Node(
            id=f"simplify:{self.model.name}.{graph}.bs{batch}", stage="simplify", model=self.model.name,
            outputs=paths(self.model.name, graph, batch), action="export.simplify:run", toolchain=PYTHON,
            deps=(self.onnx_id,),
            params={"graph": graph, "batch": batch, "input_shapes": spec.shapes(self.dims, batch), "atol": spec.atol,
                    "discrete": spec.discrete_outputs, "sample_seed": SAMPLE_SEED, "dims": self.dims},
            labels={"graph": graph, "batch": batch},
        ), f"export:{self.model.name}")
        return node.id


def declare(plan, model, dims: dict, onnx_id: str) -> Exported:
    """The last export stage: simplified graphs are declared as the backends ask for them."""
    return Exported(plan, model, dims, onnx_id)


def still_dynamic(model) -> list[str]:
    return sorted({n.op_type for n in model.graph.node} & {"Shape", "If", "Loop"})


def simplify_static(model, input_shapes: dict):
    """onnxsim at fixed input shapes, repeated while Shape ops survive and the graph still shrinks.
    Returns (model, passes)."""
    import os

    import onnxsim

    from buildplan.core import GateError

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
    import onnx
    import onnxruntime as ort

    from export.decoding import greedy_loop, loop_settings
    from buildplan.core import GateError
    from export.gates import compare, worst
    from export.samples import make_inputs
    from export.stage import ort_step

    p = node.params
    spec = GRAPHS[p["graph"]]
    raw_path = ctx.input(raw_role(p["graph"]))
    raw = onnx.load(str(raw_path))
    simplified, passes = simplify_static(raw, p["input_shapes"])
    if still_dynamic(simplified):
        raise GateError(f"{spec.name} bs{p['batch']}: still has {still_dynamic(simplified)} after {passes} onnxsim "
                        "passes: the graph is not fully static")
    out_onnx, out_io = ctx.tmp("onnx"), ctx.tmp("reference")
    fix_output_dims(simplified, spec, p["dims"], p["batch"])
    onnx.save(simplified, str(out_onnx))
    check_onnx_io(out_onnx, spec, p["dims"], p["batch"])
    feeds = make_inputs(spec, p["dims"], p["batch"], seed=p["sample_seed"])
    ref_sess = ort.InferenceSession(str(raw_path), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feeds), strict=True))
    sess = ort.InferenceSession(str(out_onnx), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
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
    write_io(out_io, feeds, ref, loop)
    nodes_before, nodes_after = len(raw.graph.node), len(simplified.graph.node)
    ctx.log(f"{spec.name} bs{p['batch']}: {nodes_before} -> {nodes_after} nodes in {passes} onnxsim passes, gate vs raw {fig}")
    return {"figures": figures, "nodes": [nodes_before, nodes_after], "onnxsim_passes": passes,
            "signature": signature(spec, p["dims"], p["batch"])}

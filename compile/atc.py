"""Stage `om`: Ascend offline models with ATC, one per graph x SoC x batch size.

The command line is computed at plan time (tests assert it exactly) with placeholders for
paths, so moving the checkout does not change any fingerprint. ATC appends `.om` to
--output. A `--dynamic_batch_size` target builds one OM for all its batch sizes from the
raw (batch-dynamic) graph.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from buildplan.plan import Node
from compile.chips import ASCEND_SOCS
from export.specs import GRAPHS

CODE = ("compile/atc.py",)
STANDIN_MARK = b"BLIPC-ATC-STANDIN"  # first bytes of what the test stand-in writes


def om_stem(graph: str, batch: int | None) -> str:
    return f"{graph}_bs{batch}" if batch is not None else f"{graph}_dynbs"


def command(spec, dims: dict, soc: str, batch: int | None, target, batches: tuple[int, ...] = ()) -> list[str]:
    """ATC's argument list; {model}, {output} and {ini} are filled in at run time."""
    shapes = spec.shapes(dims, -1 if batch is None else batch)
    layout = "NCHW" if any(t.layout == "NCHW" for t in spec.inputs) else "ND"
    argv = ["atc", "--framework=5", "--model={model}", "--output={output}", f"--input_format={layout}",
            "--input_shape=" + ";".join(f"{n}:{','.join(map(str, s))}" for n, s in shapes.items()),
            "--log=error", f"--soc_version={ASCEND_SOCS[soc]}"]
    if spec.atc_op_precision:
        argv.append("--op_precision_mode={ini}")
    if batch is None:
        argv.append("--dynamic_batch_size=" + ",".join(map(str, batches)))
    if target.precision_mode:
        argv.append(f"--precision_mode={target.precision_mode}")
    return argv


def declare(plan, model, dims: dict, target, onnx_id: str, simplify_stage) -> None:
    soc_dir = ASCEND_SOCS[target.name]
    for graph in target.graphs:
        spec = GRAPHS[graph]
        # Dynamic mode compiles the raw graph (batch still symbolic); static mode the per-bs simplified one.
        batches = (None,) if target.dynamic_batch else target.batch_sizes
        for bs in batches:
            dep = onnx_id if bs is None else simplify_stage.declare(plan, model, dims, graph, bs, onnx_id)
            stem = om_stem(graph, bs)
            plan.add(Node(
                id=f"om:{model.name}.{graph}.{target.name}.{'dyn' if bs is None else f'bs{bs}'}", stage="om",
                model=model.name, outputs=(f"{model.name}/{soc_dir}/{stem}.om",),
                action="compile.atc:run", code=CODE, toolchain="atc", deps=(dep,),
                params={"graph": graph, "argv": command(spec, dims, target.name, bs, target, target.batch_sizes),
                        # the user's flags go to atc exactly as written, never through the placeholders
                        "extra_flags": list(target.extra_flags.get(graph, ())),
                        "model_file": Path(dep_onnx(plan, dep, graph if bs is None else None)).name,
                        "op_precision_ini": spec.atc_op_precision, "stem": stem},
                labels={"graph": graph, "batch": bs if bs is not None else list(target.batch_sizes),
                        "target": target.name, "precision": target.precision_mode or "default"}),
                f"compile:{target.name}")


def dep_onnx(plan, dep_id: str, graph: str | None = None) -> str:
    """The ONNX file an OM is compiled from: the simplified per-batch graph (its only .onnx), or
    for a dynamic-batch OM the raw graph named exactly after it (not found by substring:
    BLIP_image is a prefix of BLIP_image_feat)."""
    outputs = plan.nodes[dep_id].outputs
    return next(o for o in outputs if o.endswith(".onnx") and (graph is None or Path(o).name == f"{graph}.onnx"))


def _fill(arg: str, fill: dict) -> str:
    for placeholder, value in fill.items():
        arg = arg.replace(placeholder, value)
    return arg


def run(node: Node, ctx) -> dict:
    from buildplan.runner import StageError

    p = node.params
    work = ctx.workdir()
    dep = ctx.plan.nodes[node.deps[0]]
    model_file = ctx.path(next(o for o in dep.outputs if Path(o).name == p["model_file"]))
    fill = {"{model}": str(model_file), "{output}": str(work / p["stem"]), "{ini}": str(work / "op_precision.ini")}
    if p["op_precision_ini"]:
        (work / "op_precision.ini").write_text(p["op_precision_ini"])
    tc = ctx.toolchain()
    argv = [str(tc.bin_dir) + "/atc"] + [_fill(a, fill) for a in p["argv"][1:]] + p["extra_flags"]
    ctx.run(argv, cwd=work, what="atc")
    produced = work / f"{p['stem']}.om"
    if not produced.is_file() or produced.stat().st_size == 0:
        raise StageError(f"atc exited 0 but wrote no {produced.name}")
    with open(produced, "rb") as f:
        standin = f.read(len(STANDIN_MARK)) == STANDIN_MARK
    shutil.move(produced, ctx.tmp(node.outputs[0]))
    return {"standin": standin, "atc_version": tc.label,
            "note": "written by the test stand-in, not a real compile" if standin else "real ATC output"}

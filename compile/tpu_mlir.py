"""Stages `transform`, `calibrate`, `bmodel`: SOPHGO bmodels with TPU-MLIR.

model_transform runs once per (graph, batch size): the top MLIR does not depend on the chip,
so every chip and precision shares it (the seed scripts redo it per chip). The top MLIR's
outputs, and each bmodel's outputs on the chip's cmodel, are accepted against the export
stage's ONNX reference (`.io.npz`).
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from buildplan.plan import Node
from export.decoding import loop_settings
from export.specs import GRAPHS

# The acceptance runs these too (the reference, the comparison, the decoding loop).
CODE = ("compile/tpu_mlir.py", "compile/cmodel_loop.py", "export/decoding.py", "export/gates.py", "export/simplify.py",
        "export/specs.py", "export/presets.py")
# cosine, euclidean similarity thresholds for model_deploy --tolerance, per precision.
DEPLOY_TOLERANCE = {"F32": "0.99,0.90", "F16": "0.95,0.85", "BF16": "0.95,0.80", "INT8": "0.80,0.50"}
TRANSFORM_TOLERANCE = "0.99,0.99"
# Our acceptance of each compiled graph: its outputs against the ONNX reference that the export
# stage proved against PyTorch (io.npz). TPU-MLIR's own comparisons pair tensors by name and pass
# vacuously when lowering renamed an output (blip_itm: `itm_score_Gather_slice` in the top MLIR,
# `itm_score_Gather` after lowering: "0 compared"), so they cannot be the only check.
# Per precision: minimum cosine, largest error relative to the reference's largest magnitude.
ACCEPT = {"F32": (0.999, 0.01), "F16": (0.99, 0.05), "BF16": (0.98, 0.1), "INT8": (0.95, 0.2)}


def _dir(model: str, graph: str, batch: int) -> str:
    return f"{model}/tpu_mlir/{graph}_{batch}b"


def transform_outputs(model: str, graph: str, batch: int) -> tuple[str, ...]:
    d = _dir(model, graph, batch)
    # model_transform names the weight file after the lower-cased model name (BLIP_text ->
    # blip_text_top_f32_all_weight.npz), and the top MLIR refers to it by that name.
    return (f"{d}/{graph}_{batch}b.mlir", f"{d}/{graph.lower()}_top_f32_all_weight.npz", f"{d}/{graph}_in_f32.npz",
            f"{d}/{graph}_top_outputs.npz")


def bmodel_path(model: str, graph: str, chip: str, precision: str, batch: int) -> str:
    # sophon-demo layout: upper-case chip folder, lower-case chip and precision in the name.
    return f"{model}/{chip.upper()}/{graph}_{chip}_{precision.lower()}_{batch}b.bmodel"


def declare(plan, model, dims: dict, target, onnx_id: str, simplify_stage) -> None:
    for graph in target.graphs:
        spec = GRAPHS[graph]
        for bs in target.batch_sizes:
            simplified = simplify_stage.declare(plan, model, dims, graph, bs, onnx_id)
            labels = {"graph": graph, "batch": bs}
            transform = plan.add(Node(
                id=f"transform:{model.name}.{graph}.{bs}b", stage="transform", model=model.name,
                outputs=transform_outputs(model.name, graph, bs), action="compile.tpu_mlir:run_transform",
                code=CODE, toolchain="tpu_mlir", deps=(simplified,),
                params={"graph": graph, "batch": bs, "input_shapes": list(spec.shapes(dims, bs).values()),
                        "outputs": [t.name for t in spec.outputs], "tolerance": TRANSFORM_TOLERANCE},
                labels=labels))
            calibration = None
            if "INT8" in target.precisions:
                cal = model.calibration
                data_files = tuple(sorted(str(p) for p in _npz_files(cal["data"]))) if cal["data"] else ()
                calibration = plan.add(Node(
                    id=f"calibrate:{model.name}.{graph}.{bs}b", stage="calibrate", model=model.name,
                    outputs=(f"{_dir(model.name, graph, bs)}/{graph}_cali_table",),
                    action="compile.tpu_mlir:run_calibrate", code=CODE + ("export/samples.py",),
                    toolchain="tpu_mlir", deps=(transform.id,), sources=data_files,
                    params={"graph": graph, "batch": bs, "samples": cal["samples"], "user_data": bool(data_files),
                            "dims": dims},
                    labels=labels))
            for precision in target.precisions:
                plan.add(Node(
                    id=f"bmodel:{model.name}.{graph}.{target.name}.{precision}.{bs}b", stage="bmodel",
                    model=model.name, outputs=(bmodel_path(model.name, graph, target.name, precision, bs),),
                    action="compile.tpu_mlir:run_deploy", code=CODE, toolchain="tpu_mlir",
                    deps=(transform.id,) + ((calibration.id,) if precision == "INT8" else ()),
                    params={"graph": graph, "batch": bs, "chip": target.name, "precision": precision,
                            "simulate": target.simulate, "tolerance": DEPLOY_TOLERANCE[precision],
                            "device_memory_mb": target.device_memory_mb,
                            **({"loop": loop_settings(spec, dims)} if spec.decoding else {})},
                    labels={**labels, "target": target.name, "precision": precision}),
                    f"compile:{target.name}")


def _npz_files(folder):
    from pathlib import Path

    return sorted(Path(folder).glob("*.npz"))


def _similarities(log: str) -> list[dict]:
    """The comparisons TPU-MLIR printed: which files, how many tensors it could pair by name
    (0 means it checked nothing), the tolerance, the worst similarity, whether it passed."""
    found = []
    for block in log.split("[Running]: npz_tool.py compare ")[1:]:
        a, b = block.split()[:2]
        tol = re.search(r"--tolerance (\S+)", block)
        count = re.search(r"(\d+) compared", block)
        entry = {"compared": f"{a} vs {b}", "tolerance": tol.group(1) if tol else None,
                 "tensors": int(count.group(1)) if count else None,
                 "passed": "[Success]: npz_tool.py compare" in block}
        sim = re.search(r"min_similarity = \(([^)]*)\)", block)
        if sim and entry["tensors"]:
            values = [float(x) if x.strip() not in ("inf", "-inf", "nan") else x.strip() for x in sim.group(1).split(",")]
            entry.update(cosine=values[0], euclid=values[1])
        found.append(entry)
    return found


def accept(spec, reference: dict, produced: list, precision: str) -> dict:
    """Compare a compiled graph's outputs (in the spec's order) with the ONNX reference; raise
    a StageError naming the output when it is off by more than the precision allows."""
    import numpy as np

    from buildplan.runner import StageError
    from export.gates import compare

    if len(produced) != len(spec.outputs):
        raise StageError(f"{spec.name}: {len(produced)} outputs, the spec has {len(spec.outputs)}")
    candidate = {}
    for t, got in zip(spec.outputs, produced):
        ref = reference[t.name]
        if got.size != ref.size:
            raise StageError(f"{spec.name}: output {t.name} has shape {list(got.shape)}, reference {list(ref.shape)}")
        candidate[t.name] = np.asarray(got).reshape(ref.shape)
    figures = compare(reference, candidate, float("inf"), spec.discrete_outputs)  # token ids: exact or GateError
    min_cos, max_rel = ACCEPT[precision]
    for name, f in figures.items():
        f["rel_max_abs"] = f["max_abs"] / (float(np.max(np.abs(reference[name]))) or 1.0)
        if not spec.discrete_outputs and (f["cosine"] < min_cos or f["rel_max_abs"] > max_rel):
            raise StageError(f"{spec.name} {precision}: output {name} vs the ONNX reference: cosine {f['cosine']:.5f} "
                             f"(min {min_cos}), relative max error {f['rel_max_abs']:.4f} (max {max_rel})")
    return figures


def run_transform(node: Node, ctx) -> dict:
    import numpy as np

    from export.gates import worst
    from export.simplify import read_io

    p = node.params
    graph, bs = p["graph"], p["batch"]
    work = ctx.workdir()
    onnx_file, io_file = (ctx.path(o) for o in ctx.plan.nodes[node.deps[0]].outputs)
    inputs, reference = read_io(io_file)
    np.savez(work / "test_input.npz", **inputs)
    shapes = "[" + ",".join("[" + ",".join(map(str, s)) + "]" for s in p["input_shapes"]) + "]"
    log = ctx.run(["model_transform.py", "--model_name", graph, "--model_def", str(onnx_file),
                   "--input_shapes", shapes, "--mlir", f"{graph}_{bs}b.mlir",
                   "--test_input", "test_input.npz", "--test_result", f"{graph}_top_outputs.npz",
                   "--tolerance", p["tolerance"]], cwd=work, what="model_transform.py")
    # Keep only the graph outputs of the reference: the full file holds every intermediate tensor.
    with np.load(work / f"{graph}_top_outputs.npz") as z:
        top = {}
        for name in p["outputs"]:
            key = next((k for k in z.files if k == name or k.startswith(name + "_")), None)
            if key is None:
                from buildplan.runner import StageError

                raise StageError(f"model_transform wrote no tensor for output {name!r} (has {z.files[:10]})")
            top[key] = z[key]
    for rel in node.outputs:
        name = rel.rsplit("/", 1)[1]
        if name.endswith("_top_outputs.npz"):
            np.savez(ctx.tmp(rel), **top)
        else:
            shutil.move(work / name, ctx.tmp(rel))
    vs_onnx = worst(accept(GRAPHS[graph], reference, list(top.values()), "F32"))
    return {"figures": {"top_mlir_vs_onnx": vs_onnx, "tpu_mlir": _similarities(log)}}


def run_calibrate(node: Node, ctx) -> dict:
    import numpy as np

    from export.samples import make_inputs

    p = node.params
    mlir = ctx.path(ctx.plan.nodes[node.deps[0]].outputs[0])
    work = ctx.workdir()
    data = work / "data"
    data.mkdir()
    if p["user_data"]:
        for src in node.sources:
            shutil.copy(src, data)
        count = len(node.sources)
    else:
        # No real data declared: synthetic samples. Good enough to prove the INT8 path, not for accuracy.
        spec = GRAPHS[p["graph"]]
        for i in range(p["samples"]):
            np.savez(data / f"sample_{i:04d}.npz", **make_inputs(spec, p["dims"], p["batch"], seed=1000 + i))
        count = p["samples"]
    _link_weights(ctx, node.deps[0], work)
    ctx.run(["run_calibration.py", str(mlir), "--dataset", str(data), "--input_num", str(count),
             "-o", "cali_table"], cwd=work, what="run_calibration.py")
    shutil.move(work / "cali_table", ctx.tmp(node.outputs[0]))
    return {"calibration": {"samples": count, "synthetic": not p["user_data"]}}


def _link_weights(ctx, transform_id: str, work) -> None:
    # The top MLIR names its weight file relative to the working directory.
    for rel in ctx.plan.nodes[transform_id].outputs:
        if rel.endswith("_top_f32_all_weight.npz"):
            (work / rel.rsplit("/", 1)[1]).symlink_to(ctx.path(rel))


def run_deploy(node: Node, ctx) -> dict:
    p = node.params
    transform_id = node.deps[0]
    mlir, _, in_f32, top_outputs = (ctx.path(o) for o in ctx.plan.nodes[transform_id].outputs)
    work = ctx.workdir()
    _link_weights(ctx, transform_id, work)
    name = node.outputs[0].rsplit("/", 1)[1]
    argv = ["model_deploy.py", "--mlir", str(mlir), "--quantize", p["precision"], "--processor", p["chip"],
            "--model", name]
    if p["simulate"]:
        # TPU-MLIR checks its TPU dialect against the top MLIR; it would also run the bmodel on the
        # cmodel, but then deletes the outputs, so that run (minutes for BLIP-base) is ours, below.
        argv += ["--test_input", str(in_f32), "--test_reference", str(top_outputs), "--tolerance", p["tolerance"],
                 "--skip_validation"]
    if p["precision"] == "INT8":
        argv += ["--calibration_table", str(ctx.path(ctx.plan.nodes[node.deps[1]].outputs[0]))]
    log = ctx.run(argv, cwd=work, what="model_deploy.py")
    figures = {"tpu_mlir": _similarities(log)}
    device = device_memory(ctx.run(["model_tool", "--info", name], cwd=work, what="model_tool --info"))
    device["bmodel_bytes"] = (work / name).stat().st_size
    # A bmodel its chip cannot load is no artifact: refuse it before spending a cmodel run on it.
    budget = p["device_memory_mb"] * 2**20
    if device["device_bytes"] > budget:
        from buildplan.runner import StageError

        raise StageError(f"{name} needs {device['device_bytes'] / 2**20:.0f} MiB of device memory "
                         f"(weights {device.get('weight_bytes', 0) / 2**20:.0f} MiB), more than {p['chip']}'s budget of "
                         f"{p['device_memory_mb']} MiB: use a step decoder (blip_cap_step, blip_vqa_tdec_step) "
                         "or raise the target's device_memory_mb if the device really has more")
    if p["simulate"]:
        import numpy as np

        from export.gates import worst
        from export.simplify import read_io

        # The finished bmodel on the chip's cmodel: the network outputs, in order.
        ctx.run(["model_runner.py", "--input", str(in_f32), "--model", name, "--output", "bmodel_outputs.npz"],
                cwd=work, what="model_runner.py (cmodel run of the bmodel)")
        with np.load(work / "bmodel_outputs.npz") as z:
            produced = [z[k] for k in z.files]
        io_file = ctx.dep_output(ctx.plan.nodes[transform_id].deps[0], ".io.npz")
        _, reference = read_io(io_file)
        figures["bmodel_vs_onnx"] = worst(accept(GRAPHS[p["graph"]], reference, produced, p["precision"]))
        if "loop" in p:
            figures["cmodel_loop_vs_onnx_loop"] = _cmodel_loop(ctx, p["loop"], work / name, io_file, work)
    shutil.move(work / name, ctx.tmp(node.outputs[0]))
    return {"figures": figures, "simulated": bool(p["simulate"]), "device_memory": device}


def device_memory(info: str) -> dict:
    """What `model_tool --info` says a bmodel needs on the device, in bytes."""
    found = {}
    for key, pattern in (("device_bytes", r"device mem size:\s*(\d+)"), ("weight_bytes", r"\(weight:\s*(\d+)"),
                         ("instruction_bytes", r"instruct:\s*(\d+)"), ("runtime_bytes", r"instruct:\s*\d+, runtime:\s*(\d+)")):
        m = re.search(pattern, info)
        if m:
            found[key] = int(m.group(1))
    if "device_bytes" not in found:
        from buildplan.runner import StageError

        raise StageError("model_tool --info printed no 'device mem size': cannot check the device memory budget")
    return found


def _cmodel_loop(ctx, settings: dict, bmodel, io_file, work) -> dict:
    """The runtime's greedy loop around the step bmodel on the cmodel; its tokens must equal the
    loop's on the ONNX graph (which the export stage proved equal to transformers' generate())."""
    import json

    import numpy as np

    from export.gates import compare
    from export.simplify import read_io, read_loop

    inputs, _ = read_io(io_file)
    np.savez(work / "loop_inputs.npz", **inputs)
    ctx.run(["python", str(Path(__file__).with_name("cmodel_loop.py")), str(bmodel), str(work / "loop_inputs.npz"),
             json.dumps(settings), str(work / "loop_ids.npz")], cwd=work, what="greedy loop of the bmodel on the cmodel")
    with np.load(work / "loop_ids.npz") as z:
        got = z["ids"]
    want = read_loop(io_file)
    return compare(want, {settings["ids_name"]: got}, 0.0, discrete=True)[settings["ids_name"]]

"""Backend TPU-MLIR: SOPHGO bmodels for bm1684, bm1684x and bm1688 (stages `transform`,
`calibrate`, `bmodel`).

model_transform runs once per (graph, batch size): the top MLIR does not depend on the chip,
so every chip and precision shares it (the seed scripts redo it per chip). The top MLIR's
outputs, and each bmodel's outputs on the chip's cmodel, are accepted against the export
stage's ONNX reference (`.io.npz`).
"""
from __future__ import annotations

import glob
import re
import shutil
from functools import partial
from pathlib import Path

from buildplan.core import ConfigError, GateError, Node, Setting, StageError
from buildplan.toolchains import Toolchain, memoised, short_sha
from compile.acceptance import (ACCEPT, DECODER_GATES, accept, accept_tokens, calibration_inputs, calibration_samples,
                                gate_inputs, gate_samples, onnx_runs, token_gate)
from export.decoding import loop_settings
from export.specs import GRAPHS, TASK_BUNDLES, task_chain

NAME = "tpu_mlir"
LABEL = "TPU-MLIR"
VERSION = "1.30.2"  # what ./bootstrap.sh installs
# Precisions model_deploy supports per chip (BM1684 has no F16/BF16 units).
PRECISIONS: dict[str, tuple[str, ...]] = {
    "bm1684": ("F32", "INT8"),
    "bm1684x": ("F32", "F16", "BF16", "INT8"),
    "bm1688": ("F32", "F16", "BF16", "INT8"),
}
TARGETS = tuple(PRECISIONS)
# Device memory a chip's bmodels may use, in MiB: the seed's NPU heap after its memory edit
# (sophon-demo, seed 001 section 3), shared by every bmodel loaded at once.
DEVICE_MEMORY_MB: dict[str, int] = {"bm1684": 7615, "bm1684x": 7615, "bm1688": 6328}
SETTINGS = (
    Setting("precisions", "choices", "model_deploy --quantize values; one bmodel each", default=("F32",),
            allowed=lambda chip: PRECISIONS[chip], axis=True),
    Setting("simulate", "bool", "run each bmodel on the chip's cmodel and accept it against the ONNX reference",
            default=True),
    Setting("check_lowering", "bool", "with simulate: false, still compare the lowered model (TPU-MLIR's interpreter "
            "of its TPU dialect, no cmodel) with the top MLIR on the reference input: an accuracy figure in minutes "
            "where the cmodel takes hours (BLIP-base image graphs)", default=False),
    Setting("device_memory_mb", "int", "device memory one bmodel may need (default: the seed's NPU heap)",
            default=lambda chip: DEVICE_MEMORY_MB[chip], minimum=1, maximum=1 << 20, unit="MiB"),
    Setting("mixed_precision", "str", "below F32: `auto` keeps in F32 (a quantize table, searched once and kept as "
            "an artifact) the fewest ops that make model_deploy compile and the bmodel pass its acceptance; `off`: a "
            "failure names the op or layer", default="off", allowed=("off", "auto")),
    Setting("max_float_layers", "int", "mixed_precision auto: at most this many ops kept in F32, besides the ops "
            "holding token ids or positions beyond what the precision holds exactly and, in INT8, additive masks "
            "(always kept)",
            default=16, minimum=1, maximum=100000, unit="ops"),
    Setting("combine_batch_sizes", "bool", "also one bmodel per graph and precision holding every declared batch "
            "size, the weights stored once (model_tool --combine_coeff); each batch size validated from that file",
            default=False),
    Setting("task_bundle", "bool", "also one bmodel per precision and batch size holding every net the model's task "
            "runs (captioning: blip_cap_venc, blip_cap_step; VQA: blip_vqa_venc, blip_vqa_tenc, blip_vqa_tdec_step), "
            "validated by running the task's greedy loop from that file", default=False),
    Setting("decoder_gate", "str", "decoders below F32: `agreement` holds the token ids to the share of identical "
            "decisions over many inputs (README: token gates); `exact`: every token equal, as in F32",
            default="agreement", allowed=DECODER_GATES),
)
TOOLCHAIN_SETTINGS = (
    Setting("root", "path", "a TPU-MLIR environment or install prefix whose bin/ has model_deploy.py "
            "(default: the one ./bootstrap.sh installs; BLIPC_TPU_MLIR overrides)"),
)
ROOT_ENV = "BLIPC_TPU_MLIR"  # a TPU-MLIR of the user's own
ENVIRONMENT = (ROOT_ENV, "BLIPC_TOOLCHAIN_DIR")  # read by detect(); the no-op snapshot watches them
STAGE_DOCS = {"transform": "TPU-MLIR top MLIR", "calibrate": "TPU-MLIR INT8 calibration table",
              "bmodel": "SOPHGO bmodel", "float_ops": "TPU-MLIR ops a bmodel keeps in F32 (a quantize table)",
              "combine": "SOPHGO bmodel holding every batch size of a graph",
              "bundle": "SOPHGO bmodel holding every net of a task"}
# Peak RSS of the largest tool process, measured (README: base transforms 6-10 GB, bmodels ~4 GB), rounded up.
MEMORY_MB = {"transform": {"tiny": 1600, "base": 11000}, "calibrate": {"tiny": 1200, "base": 11000},
             "bmodel": {"tiny": 700, "base": 5000}, "float_ops": {"tiny": 700, "base": 5000},
             "combine": {"tiny": 700, "base": 5000}, "bundle": {"tiny": 900, "base": 6000}}
HOWTO = (f"run ./bootstrap.sh (installs TPU-MLIR {VERSION} into ~/.cache/blipc or BLIPC_TOOLCHAIN_DIR), or point BLIPC_TPU_MLIR "
         "(or toolchains.tpu_mlir.root in models.yaml) at an environment whose bin/ has model_deploy.py")
# cosine, euclidean similarity thresholds for model_deploy --tolerance, per precision.
DEPLOY_TOLERANCE = {"F32": "0.99,0.90", "F16": "0.95,0.85", "BF16": "0.95,0.80", "INT8": "0.80,0.50"}
TRANSFORM_TOLERANCE = "0.99,0.99"
# Our acceptance (compile/acceptance.py) of each compiled graph comes on top of TPU-MLIR's own
# comparisons, which pair tensors by name and pass vacuously when lowering renamed an output
# (blip_itm: `itm_score_Gather_slice` in the top MLIR, `itm_score_Gather` after lowering: "0 compared").


def lowering_tolerance(precision: str, sole_check: bool) -> str:
    """model_deploy's --tolerance. Beside the cmodel, TPU-MLIR's own: the cmodel acceptance decides.
    As the sole accuracy check (check_lowering without the cmodel), its cosine is the acceptance's
    minimum: TPU-MLIR's INT8 0.80 let a BLIP-base ViT at 0.898 through. (The acceptance's relative
    error needs the outputs, which model_deploy deletes.)"""
    cosine, euclid = DEPLOY_TOLERANCE[precision].split(",")
    return f"{max(float(cosine), ACCEPT[precision][0])},{euclid}" if sole_check else DEPLOY_TOLERANCE[precision]


# --- toolchain ---------------------------------------------------------------------------
def root(settings: dict) -> Path:
    from buildplan import env

    configured = env.get(ROOT_ENV) or settings.get("root")
    return Path(configured) if configured else env.toolchain_dir() / f"tpu-mlir-{VERSION}"


def detect(settings: dict) -> tuple[Toolchain, list[str]]:
    top = root(settings)
    bin_dir = top / "bin"
    watched = [str(bin_dir / "model_deploy.py"), str(top / "lib")]
    if not (bin_dir / "model_deploy.py").is_file():
        return Toolchain(NAME, False, problem=f"TPU-MLIR not found at {top} (no bin/model_deploy.py): {HOWTO}"), watched
    site_dirs = sorted(glob.glob(str(top / "lib" / "python3*" / "site-packages")))
    watched += site_dirs
    return memoised(NAME, watched, lambda: identify(bin_dir, site_dirs)), watched


def identify(bin_dir: Path, site_dirs: list[str]) -> Toolchain:
    dist = sorted(d for site in site_dirs for d in glob.glob(f"{site}/tpu_mlir-*.dist-info"))
    if dist:
        version = Path(dist[-1]).name[len("tpu_mlir-"):-len(".dist-info")]
        build = short_sha(Path(dist[-1]) / "RECORD")  # RECORD lists every file's hash: a build identity
    else:  # a source build (e.g. SOPHGO's docker image): identify by the tool's own code
        version, build = "source", short_sha(bin_dir / "model_deploy.py")
    return Toolchain(NAME, True, {"version": version, "build": build}, str(bin_dir))


# --- plan ----------------------------------------------------------------------------------
def _dir(model: str, graph: str, batch: int) -> str:
    return f"{model}/tpu_mlir/{graph}_{batch}b"


def transform_outputs(model: str, graph: str, batch: int) -> dict[str, str]:
    d = _dir(model, graph, batch)
    # model_transform names the weight file after the lower-cased model name (BLIP_text ->
    # blip_text_top_f32_all_weight.npz), and the top MLIR refers to it by that name.
    return {"mlir": f"{d}/{graph}_{batch}b.mlir", "weights": f"{d}/{graph.lower()}_top_f32_all_weight.npz",
            "test_input": f"{d}/{graph}_in_f32.npz", "top_outputs": f"{d}/{graph}_top_outputs.npz"}


def bmodel_path(model: str, graph: str, chip: str, precision: str, batch: int) -> str:
    # sophon-demo layout: upper-case chip folder, lower-case chip and precision in the name.
    return f"{model}/{chip.upper()}/{graph}_{chip}_{precision.lower()}_{batch}b.bmodel"


def searched_bmodel_path(model: str, graph: str, chip: str, precision: str, batch: int) -> str:
    """The mixed-precision search's own build with its final table, which the bmodel stage takes
    instead of compiling and validating it a second time."""
    return f"{_dir(model, graph, batch)}/{Path(bmodel_path(model, graph, chip, precision, batch)).stem}.searched.bmodel"


def declare(plan, model, dims: dict, target, exported) -> None:
    settings = target.settings
    cells: dict[tuple, object] = {}  # (graph, precision, batch) -> bmodel node
    for graph in target.graphs:
        spec = GRAPHS[graph]
        stages: dict[str, list] = {p: [] for p in settings["precisions"]}  # precision -> per-batch bmodel nodes
        calibration = None
        # smallest batch first: its calibration table serves every batch size (below)
        for bs in sorted(target.batch_sizes):
            simplified = exported.fixed(graph, bs)
            labels = {"graph": graph, "batch": bs}
            # model_transform's own check runs the ONNX graph with every tensor kept: 22 GB for the
            # BLIP-base ViT at bs 4. It converts the same ops at every batch size, so it runs at bs 1
            # only; the bmodels of every batch size are still accepted against their ONNX reference.
            transform = plan.add(Node(
                id=f"transform:{model.name}.{graph}.{bs}b", stage="transform", model=model.name,
                outputs=transform_outputs(model.name, graph, bs), action="compile.tpu_mlir:run_transform",
                toolchain=NAME, deps=(simplified,),
                params={"graph": graph, "batch": bs, "input_shapes": list(spec.shapes(dims, bs).values()),
                        "outputs": [t.name for t in spec.outputs], "tolerance": TRANSFORM_TOLERANCE,
                        **({} if bs == 1 else {"reference_check": False})},
                labels=labels))
            # One table per graph, made at the smallest batch size: a table holds a threshold per op
            # name, the top MLIRs of every batch size name their ops alike, and activation ranges
            # do not depend on how many samples share a call (sophon-demo's scripts reuse their bs1 table at bs4).
            if "INT8" in settings["precisions"] and calibration is None:
                cal_params, cal_sources, cal_deps = calibration_inputs(model, exported, graph, bs)
                calibration = plan.add(Node(
                    id=f"calibrate:{model.name}.{graph}.{bs}b", stage="calibrate", model=model.name,
                    outputs={"cali_table": f"{_dir(model.name, graph, bs)}/{graph}_cali_table"},
                    action="compile.tpu_mlir:run_calibrate", toolchain=NAME, deps=(transform.id, *cal_deps),
                    sources=cal_sources, params={"graph": graph, "batch": bs, **cal_params, "dims": dims},
                    labels=labels))
            for precision in settings["precisions"]:
                bmodel = bmodel_path(model.name, graph, target.name, precision, bs)
                # the simplified graph too: its .io.npz is what the bmodel is accepted against
                gate, gate_deps = token_gate(spec, precision, settings["decoder_gate"], dims,
                                             partial(gate_samples, model, exported, graph, bs))
                deps = (transform.id, simplified, *gate_deps) + ((calibration.id,) if precision == "INT8" else ())
                mixed = settings["mixed_precision"] == "auto" and precision != "F32"
                cell = {**labels, "target": target.name, "precision": precision}
                compiled = {"graph": graph, "batch": bs, "chip": target.name, "precision": precision}
                # what a bmodel is checked by; the search's tries are checked alike
                lowering_only = settings["check_lowering"] and not settings["simulate"]
                checked = {"simulate": settings["simulate"], "tolerance": lowering_tolerance(precision, lowering_only),
                           **({"check_lowering": True} if lowering_only else {}),
                           **({"loop": loop_settings(spec, dims)} if spec.decoding else {}),
                           **({"token_gate": gate} if gate else {})}
                if mixed:  # the table is an artifact: searched again only when stale
                    deps += (plan.add(Node(
                        id=f"float_ops:{model.name}.{graph}.{target.name}.{precision}.{bs}b", stage="float_ops",
                        model=model.name, outputs={"float_ops": bmodel + ".float_ops.json",
                                                   "searched_bmodel": searched_bmodel_path(model.name, graph, target.name,
                                                                                           precision, bs)},
                        action="compile.tpu_mlir:run_float_search", toolchain=NAME, deps=deps, labels=cell,
                        params={**compiled, **checked, "max_float_layers": settings["max_float_layers"]})).id,)
                stages[precision].append(cells.setdefault((graph, precision, bs), plan.add(Node(
                    id=f"bmodel:{model.name}.{graph}.{target.name}.{precision}.{bs}b", stage="bmodel",
                    model=model.name, outputs={"bmodel": bmodel}, action="compile.tpu_mlir:run_deploy", toolchain=NAME,
                    deps=deps,
                    params={**compiled, **checked, "device_memory_mb": settings["device_memory_mb"],
                            **({"mixed_precision": "auto"} if mixed else {})},
                    labels=cell),
                    f"compile:{target.name}")))
        if settings["combine_batch_sizes"] and len(target.batch_sizes) > 1:
            for precision, parts in stages.items():
                _declare_combined(plan, model, graph, target, precision, parts)


    if settings["task_bundle"]:
        _declare_bundles(plan, model, dims, target, cells, exported)


def _declare_bundles(plan, model, dims: dict, target, cells: dict, exported) -> None:
    """Per precision and batch size, one bmodel with every net of the model's task, checked on the
    model's images and texts where it has them (each net's samples give the task's raw inputs)."""
    nets = TASK_BUNDLES.get(model.task)
    missing = [g for g in nets or () if g not in target.graphs]
    if nets is None or missing:
        raise ConfigError(plan.config.path, f"models[{model.name}].targets.{target.name}.task_bundle",
                          f"a {model.task} bundle needs the nets {', '.join(nets or ())} on {target.name}"
                          if nets else f"the {model.task} task runs one net: there is nothing to bundle",
                          f"add {', '.join(missing)} to the target's graphs" if nets else "remove task_bundle")
    for precision in target.settings["precisions"]:
        for bs in target.batch_sizes:
            parts = [cells[(g, precision, bs)] for g in nets]
            real = {g: gate_samples(model, exported, g, bs) for g in nets}
            files = {g: {"bmodel": n.outputs["bmodel"], **{role: plan.nodes[n.deps[1]].outputs[role]
                                                            for role in ("onnx", "reference")},
                         **({"calibration_set": plan.nodes[real[g]].outputs["calibration_set"]} if real[g] else {})}
                     for g, n in zip(nets, parts, strict=True)}
            last = parts[-1].params
            plan.add(Node(
                id=f"bundle:{model.name}.{target.name}.{precision}.{bs}b", stage="bundle", model=model.name,
                outputs={"bmodel": bundle_path(model.name, model.task, target.name, precision, bs)},
                action="compile.tpu_mlir:run_bundle", toolchain=NAME,
                deps=tuple(dict.fromkeys([d for n in parts for d in (n.id, n.deps[1])] + [r for r in real.values() if r])),
                params={"task": model.task, "chip": target.name, "precision": precision, "batch": bs, "files": files,
                        "chain": task_chain(model.task), "loop": last["loop"], "simulate": last["simulate"],
                        "device_memory_mb": last["device_memory_mb"], "dims": dims,
                        "min_share": last["token_gate"]["min_share"] if "token_gate" in last else 1.0},
                labels={"graph": model.task, "batch": bs, "target": target.name, "precision": precision}),
                f"compile:{target.name}")


def bundle_path(model: str, task: str, chip: str, precision: str, batch: int) -> str:
    # sophon-demo's pattern with the task in the graph's place: blip_vqa_bm1684x_f16_1b.bmodel
    return f"{model}/{chip.upper()}/blip_{task}_{chip}_{precision.lower()}_{batch}b.bmodel"


def combined_path(model: str, graph: str, chip: str, precision: str, batches) -> str:
    return f"{model}/{chip.upper()}/{graph}_{chip}_{precision.lower()}_{'-'.join(map(str, batches))}b.bmodel"


def _declare_combined(plan, model, graph: str, target, precision: str, parts: list) -> None:
    """One bmodel with every batch size's stage of `graph` at `precision`, largest first (the
    runtime sizes a net's input buffers by its first stage), validated batch by batch."""
    parts = sorted(parts, key=lambda n: -n.params["batch"])
    files, deps = [], []
    for part in parts:
        transform, simplified = part.deps[0], part.deps[1]
        real = [d for d in part.deps if plan.nodes[d].stage == "calibration_set"]  # a gate's real-data samples
        deps += [part.id, transform, simplified, *real]
        files.append({"batch": part.params["batch"], "bmodel": part.outputs["bmodel"],
                      "test_input": plan.nodes[transform].outputs["test_input"],
                      "reference": plan.nodes[simplified].outputs["reference"], "onnx": plan.nodes[simplified].outputs["onnx"],
                      **({"calibration_set": plan.nodes[real[0]].outputs["calibration_set"]} if real else {})})
    first = parts[0].params
    plan.add(Node(
        id=f"combine:{model.name}.{graph}.{target.name}.{precision}", stage="combine", model=model.name,
        outputs={"bmodel": combined_path(model.name, graph, target.name, precision, [f["batch"] for f in files])},
        action="compile.tpu_mlir:run_combine", toolchain=NAME,
        deps=tuple(dict.fromkeys(deps)),
        params={**{k: v for k, v in first.items() if k not in ("batch", "mixed_precision", "tolerance")}, "parts": files},
        labels={"graph": graph, "batch": [f["batch"] for f in files], "target": target.name, "precision": precision}),
        f"compile:{target.name}")


# --- run -------------------------------------------------------------------------------------
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


def run_transform(node: Node, ctx) -> dict:
    import numpy as np

    from export.gates import worst
    from export.reference import read_io

    p = node.params
    graph = p["graph"]
    work = ctx.workdir()
    inputs, reference = read_io(ctx.input("reference"))
    np.savez(work / "test_input.npz", **inputs)
    shapes = "[" + ",".join("[" + ",".join(map(str, s)) + "]" for s in p["input_shapes"]) + "]"
    mlir = Path(node.outputs["mlir"]).name
    checked = p.get("reference_check", True)
    log = ctx.run(["model_transform.py", "--model_name", graph, "--model_def", str(ctx.input("onnx")),
                   "--input_shapes", shapes, "--mlir", mlir,
                   *(["--test_input", "test_input.npz", "--test_result", "top_outputs.npz",
                      "--tolerance", p["tolerance"]] if checked else [])], cwd=work, what="model_transform.py")
    # Keep only the graph outputs of the reference (the file holds every intermediate tensor),
    # under the names the top MLIR returns them by, which lowering may have changed, in the
    # spec's order.
    names = top_output_names((work / mlir).read_text())
    if len(names) != len(p["outputs"]):
        raise StageError(f"{mlir} returns {len(names)} tensors {names}, the spec declares {p['outputs']}")
    if not checked:  # what the bmodels are compared with: the ONNX graph's outputs
        shutil.move(work / "test_input.npz", work / Path(node.outputs["test_input"]).name)
        np.savez(ctx.tmp("top_outputs"), **dict(zip(names, (reference[o] for o in p["outputs"]), strict=True)))
        for role in ("mlir", "weights", "test_input"):
            shutil.move(work / Path(node.outputs[role]).name, ctx.tmp(role))
        return {"figures": {"tpu_mlir": []}, "summary": "not run against ONNX (checked at batch size 1)"}
    with np.load(work / "top_outputs.npz") as z:
        missing = [n for n in names if n not in z.files]
        if missing:
            raise StageError(f"model_transform wrote no tensor for the outputs {missing} of {mlir}")
        top = {n: z[n] for n in names}
    np.savez(ctx.tmp("top_outputs"), **top)
    for role in ("mlir", "weights", "test_input"):
        shutil.move(work / Path(node.outputs[role]).name, ctx.tmp(role))
    vs_onnx = worst(accept(GRAPHS[graph], reference, list(top.values()), "F32"))
    return {"figures": {"top_mlir_vs_onnx": vs_onnx, "tpu_mlir": _similarities(log)}}


def top_output_names(mlir: str) -> list[str]:
    """The tensors a top MLIR's main function returns, in order, by their location names:
    `return %12, %indices : ...` with `%12 = "top.X"(...) loc(#loc7)` and `#loc7 = loc("itm_score")`.
    An operation with several results (`%indices, %values = "top.Arg"...`, or `%5:2` used as `%5#1`)
    has one location for all, or a fused one with a name per result."""
    ret = re.search(r"^\s*return\s+([^:]+?)\s*:", mlir, re.M)
    if ret is None:
        raise StageError("the top MLIR has no return statement")
    locs = dict(re.findall(r"^(#loc\d+)\s*=\s*(loc\(.*\))\s*$", mlir, re.M))
    defs = {}  # result value -> (its index among the operation's results, the operation's location)
    for lhs, loc in re.findall(r"^\s*(%[^=]+?)\s*=\s*\S.*\bloc\((#loc\d+|\"[^\"]*\")\)\s*$", mlir, re.M):
        results = [v.strip() for v in lhs.split(",")]
        if len(results) == 1 and ":" in results[0]:  # `%5:2` -> %5#0, %5#1
            base, count = results[0].split(":")
            results = [f"{base}#{i}" for i in range(int(count))]
        for i, value in enumerate(results):
            defs[value] = (i, loc)
    names = []
    for value in (v.strip() for v in ret.group(1).split(",")):
        if value not in defs:
            raise StageError(f"the top MLIR returns {value}, which no operation defines")
        index, loc = defs[value]
        text = locs.get(loc, f"loc({loc})")
        if text.startswith("loc(fused"):  # one name per result: quoted, or #loc references
            named = [locs.get(r, "") for r in re.findall(r"#loc\d+", text)] or re.findall(r'"[^"]*"', text)
            named = [re.search(r'"([^"]*)"', n).group(1) if '"' in n else None for n in named]
        else:
            single = re.fullmatch(r'loc\("([^"]*)"\)', text)
            named = [single.group(1)] if single else []
        if index >= len(named) or named[index] is None:
            raise StageError(f"cannot tell the name of {value} (result {index} of an operation at {text})")
        names.append(named[index])
    return names


def run_calibrate(node: Node, ctx) -> dict:
    import numpy as np

    p = node.params
    work = ctx.workdir()
    data = work / "data"
    data.mkdir()
    count = 0
    for count, sample in enumerate(calibration_samples(node, ctx, GRAPHS[p["graph"]], p["dims"], p["batch"]), 1):
        np.savez(data / f"sample_{count:04d}.npz", **sample)
    _link_weights(ctx, work)
    ctx.run(["run_calibration.py", str(ctx.input("mlir")), "--dataset", str(data), "--input_num", str(count),
             "-o", "cali_table"], cwd=work, what="run_calibration.py")
    shutil.move(work / "cali_table", ctx.tmp("cali_table"))
    return {"calibration": {"samples": count, "synthetic": not (p["user_data"] or p["real_data"]),
                            "from_images": p["real_data"]}}


def _link_weights(ctx, work) -> None:
    # The top MLIR names its weight file relative to the working directory.
    weights = ctx.input("weights")
    (work / weights.name).symlink_to(weights)


def top_graph(mlir: str) -> list[dict]:
    """Every op of a top MLIR, in order: its location name (`node`, what a quantize table and a
    tensor dump name), its type (`op`) and the location names of its operands (`inputs`)."""
    locs = dict(re.findall(r'^(#loc\d+)\s*=\s*loc\("([^"]*)"\)\s*$', mlir, re.M))
    named: dict[str, str | None] = {}
    graph = []
    for lhs, op, operands, loc in re.findall(
            r'^\s*(%[^=]+?)\s*=\s*"top\.(\w+)"\(([^)]*)\).*\bloc\((#loc\d+)\)\s*$', mlir, re.M):
        name = locs.get(loc)
        named[lhs.split(":")[0].strip()] = name  # `%5:2` defines %5#0 and %5#1
        operands = [named.get(v.strip().split("#")[0]) for v in operands.split(",") if v.strip()]
        graph.append({"node": name, "op": op, "inputs": [v for v in operands if v]})
    return graph


def top_ops(mlir: str) -> list[tuple[str, str]]:
    """(location name, op type) of every computing op of a top MLIR, in order: what a quantize
    table names (inputs, weights and `none` values excluded)."""
    return [(g["node"], g["op"]) for g in top_graph(mlir) if g["node"] and g["op"] not in ("None", "Input", "Weight")]


def localize_accuracy(ctx, p: dict, float_ops=()) -> tuple[dict, list[dict]]:
    """Every tensor of the TPU dialect against the top MLIR's on the reference sample, under the
    precision's rule: the first op off, whether its inputs still match, and the worst (a finding
    of compile/localization.py), with the per-op figures. Costs one model_deploy with
    --compare_all and one top MLIR run that dumps every tensor."""
    import numpy as np

    from compile.localization import findings, tensor_figures

    work = ctx.workdir("localize")
    in_f32 = str(ctx.input("test_input"))
    _top_tensors(ctx, work)
    try:  # --debug keeps the TPU dialect's tensors, which model_deploy otherwise deletes
        ctx.run(_deploy_argv(ctx, p, work, "localize.bmodel", float_ops) + [
            "--test_input", in_f32, "--test_reference", "top_tensors.npz", "--compare_all", "--tolerance",
            p["tolerance"], "--debug", "--skip_validation"], cwd=work, what="model_deploy.py --compare_all (localization)")
    except StageError:
        pass  # its own comparison may fail: that is what is being localized
    dumped = sorted(work.glob("*_tpu_outputs.npz"))
    if not dumped:
        raise StageError("model_deploy --compare_all wrote no tensors of the TPU dialect: cannot localize")
    graph = top_graph(ctx.input("mlir").read_text())
    entries = []
    with np.load(work / "top_tensors.npz") as top, np.load(dumped[0]) as tpu:
        for g in graph:
            name = g["node"]
            if g["op"] in ("None", "Input", "Weight") or name not in top.files or name not in tpu.files:
                continue
            want, got = top[name], tpu[name]
            if want.size == got.size:
                entries.append({**g, "tensor": name, "consumers": [],
                                **tensor_figures(want, got.reshape(want.shape), p["precision"])})
    shutil.rmtree(work, ignore_errors=True)
    return findings(entries, p["precision"], {g["node"] for g in graph if g["op"] == "Input"}), entries


def _top_tensors(ctx, work: Path) -> Path:
    """Every tensor of the top MLIR on the reference input, in work/top_tensors.npz."""
    _link_weights(ctx, work)
    ctx.run(["model_runner.py", "--input", str(ctx.input("test_input")), "--model", str(ctx.input("mlir")),
             "--output", "top_tensors.npz", "--dump_all_tensors"], cwd=work,
            what="model_runner.py (every tensor of the top MLIR)")
    return work / "top_tensors.npz"


# The largest integer each precision holds exactly. INT8 none: it scales each tensor by the range
# calibration saw, so ids and flags keep their values only by luck (an answer's ids, [SEP] 102
# among them, share a scale with ids up to 30522; on bm1684 blip_cap's `1 - finished` flags came
# out at cosine 0.0), and lowered, an unrolled decoder's flag ops crashed model_deploy at every
# decoding step in turn (bm1684: `Equal`, `Mul`; bm1684x: the first `Max`).
EXACT_INTEGERS = {"F16": 2048, "BF16": 256, "INT8": None}


def _calibrated_ranges(table: str) -> dict[str, float]:
    """The largest magnitude a calibration table saw for each op: `name threshold min max` lines."""
    ranges = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#"):
            try:
                ranges[fields[0]] = max(abs(float(fields[2])), abs(float(fields[3])))
            except ValueError:
                continue
    return ranges


def kept_outright(ctx, p: dict) -> dict[str, list[str]]:
    """The ops p's precision cannot carry, whatever the calibration or tolerance, kept in F32
    without spending the budget:
    - `integer_path`: outputs that are whole numbers beyond what the precision holds exactly
      (INT8: any), on the reference input: token ids, positions and flags (an unrolled decoder's
      ArgMax, the ids it concatenates, its finished flags). Lowered, 30522 rounds to 30528 and
      the embedding lookup takes another word.
    - `mask_path` (INT8): ops that produce or read an additive mask, values of MASK_MAGNITUDE or
      more on the reference input or in the calibration table: one INT8 scale over -1e9 and a
      logit of 15 makes every logit 0 (the step decoders' blocked end token), one over -10000
      flattens the attention scores it is added to."""
    import numpy as np

    from compile.localization import MASK_MAGNITUDE

    work = ctx.workdir("kept_outright")
    limit = EXACT_INTEGERS[p["precision"]]
    graph = [g for g in top_graph(ctx.input("mlir").read_text()) if g["op"] not in ("None", "Input", "Weight")]
    integers, magnitude = [], {}
    with np.load(_top_tensors(ctx, work)) as tensors:
        for g in graph:
            if g["node"] not in tensors.files:
                continue
            t = tensors[g["node"]]
            if not t.size or not np.issubdtype(t.dtype, np.floating):
                continue
            if np.all(t == np.round(t)) and (limit is None or np.abs(t).max() > limit):
                integers.append(g["node"])
            magnitude[g["node"]] = float(np.abs(t).max())
    shutil.rmtree(work, ignore_errors=True)
    masks = []
    if p["precision"] == "INT8":
        computed = {g["node"] for g in graph}
        for name, seen in _calibrated_ranges(ctx.input("cali_table").read_text()).items():
            if name in computed:  # the reference input may have no padding; calibration samples do
                magnitude[name] = max(magnitude.get(name, 0.0), seen)
        carrying = {n for n, m in magnitude.items() if m >= MASK_MAGNITUDE and n not in integers}
        masks = [g["node"] for g in graph if g["node"] not in integers
                 and (g["node"] in carrying or carrying.intersection(g["inputs"]))]
        masks += _fused_attention_names(graph, set(masks))
    return {"integer_path": integers, "mask_path": masks}


# What kept_outright keeps, each with why (for the log).
OUTRIGHT = {"integer_path": "carry whole numbers{beyond} (token ids, positions, flags)",
            "mask_path": "produce or read additive masks"}


def _fused_attention_names(graph: list[dict], masks: set) -> list[str]:
    """The output projection of each attention whose mask path is kept in F32. TPU-MLIR (bm1684x)
    fuses an attention, from its q/k/v projections through softmax(q.k * scale + mask).v to the
    output projection, into one Attention op named after that projection, so the quantize table's
    entries for the mask Add and the Softmax no longer name anything and the fused op computes the
    masked scores in INT8 (tiny blip_vqa_tdec_step: the padded question's answer is the unpadded
    one's). Keeping the op the fusion is named after keeps the whole attention in F32."""
    readers: dict[str, list[dict]] = {}
    for g in graph:
        for name in g["inputs"]:
            readers.setdefault(name, []).append(g)

    def sole_reader(g: dict) -> dict | None:
        found = readers.get(g["node"], [])
        return found[0] if len(found) == 1 else None

    named = []
    for softmax in (g for g in graph if g["op"] == "Softmax" and g["node"] in masks):
        op = sole_reader(softmax)  # probs.v
        if op is None or op["op"] != "MatMul":
            continue
        op = sole_reader(op)
        while op is not None and op["op"] in ("Reshape", "Permute"):  # the heads merged back
            op = sole_reader(op)
        if op is not None and op["op"] == "MatMul" and op["node"] not in masks:  # the output projection
            named.append(op["node"])
    return named


def _deploy_argv(ctx, p: dict, work: Path, name: str, float_ops=()) -> list[str]:
    """model_deploy's command for this node's chip and precision; the ops in `float_ops` kept in
    F32 by a quantize table written into `work`."""
    argv = ["model_deploy.py", "--mlir", str(ctx.input("mlir")), "--quantize", p["precision"], "--processor", p["chip"],
            "--model", name]
    if p["precision"] == "INT8":
        argv += ["--calibration_table", str(ctx.input("cali_table"))]
    if float_ops:
        (work / "float_ops.qtable").write_text("".join(f"{op} F32\n" for op in float_ops))
        argv += ["--quantize_table", "float_ops.qtable"]
    return argv


def _lowering_check(ctx, p: dict) -> list[str]:
    """model_deploy's own comparison of its TPU dialect with the top MLIR on the reference input,
    where it applies. It would also run the bmodel on the cmodel, but then deletes the outputs, so
    that run (minutes for BLIP-base) is ours (_accepted). Not under the token agreement rule:
    TPU-MLIR's cosine of token ids would be a second, different gate on the same outputs."""
    if not (p["simulate"] or p.get("check_lowering")) or p.get("token_gate"):
        return []
    return ["--test_input", str(ctx.input("test_input")), "--test_reference", str(ctx.input("top_outputs")),
            "--tolerance", p["tolerance"], "--skip_validation"]


def _accuracy_checked(ctx, p: dict) -> bool:
    return bool(p["simulate"] or _lowering_check(ctx, p))


def _compiles(ctx, p: dict, float_ops, count: list, checked: bool = False, misses: list | None = None) -> bool:
    """Whether model_deploy makes a bmodel with these ops in F32; `checked`: and whether that
    bmodel passes what run_deploy holds it to (TPU-MLIR's comparison, the cmodel acceptance),
    each miss's first line appended to `misses`."""
    import json

    count[0] += 1
    work = ctx.workdir(f"try{count[0]}")
    _link_weights(ctx, work)
    try:
        log = ctx.run(_deploy_argv(ctx, p, work, "t.bmodel", float_ops) + (_lowering_check(ctx, p) if checked else []),
                      cwd=work, what=f"model_deploy.py ({'accuracy' if checked else 'crash'} search, try {count[0]})")
        figures = {"tpu_mlir": _similarities(log)}
        if checked and p["simulate"]:
            figures.update(_accepted(ctx, p, work / "t.bmodel", work))
        # Every passing try narrows the search to its table, so the last one built the final table.
        passed = ctx.workdir("passed")
        shutil.move(work / "t.bmodel", passed / "t.bmodel")
        (passed / "t.json").write_text(json.dumps({"float_ops": sorted(float_ops), "checked": checked,
                                                   "figures": figures}))
        return True
    except StageError as e:
        if checked:
            ctx.log(f"try {count[0]} ({len(float_ops)} ops in F32) misses: {str(e).splitlines()[0]}")
            if misses is not None:
                misses.append(str(e).splitlines()[0])
        return False
    finally:
        shutil.rmtree(work, ignore_errors=True)


def localize_crash(ctx, p: dict, ops: list[tuple[str, str]], already=(), count=None, fails_as_is=False) -> dict:
    """The op whose lowering to p's precision makes model_deploy fail: bisect over how many of the
    ops (in graph order) are quantized, the rest kept in F32 by a quantize table. Costs about
    log2(ops) + 2 compiles, no validation runs."""
    count = count if count is not None else [0]
    names = [n for n, _ in ops if n not in already]
    kinds = dict(ops)
    if not fails_as_is and _compiles(ctx, p, list(already), count):
        return {"op": None, "compiles": count[0], "compiles_as_is": True,
                "why": "the compile itself succeeds: model_deploy failed its own comparison of the TPU dialect "
                       "with the top MLIR (an accuracy failure; see the log)"}
    if not _compiles(ctx, p, list(already) + names, count):
        return {"op": None, "compiles": count[0],
                "why": f"model_deploy fails even with every op in F32: not a {p['precision']} problem"}
    low, high = 0, len(names)  # low quantized ops compile; high (all of them) do not
    while high - low > 1:
        mid = (low + high) // 2
        if _compiles(ctx, p, list(already) + names[mid:], count):
            low = mid
        else:
            high = mid
    culprit = names[high - 1]
    return {"op": culprit, "type": kinds[culprit], "compiles": count[0],
            "why": f"model_deploy compiles the first {high - 1} ops in {p['precision']} and fails once "
                   f"{culprit} ({kinds[culprit]}) is too"}


# Accuracy search: each try is a compile and a cmodel acceptance (a decoder's: 10 inputs, 4 loops),
# so fewer pruning tries than ONNX Runtime's quantizations.
PRUNE_TRIES = 6


def run_float_search(node: Node, ctx) -> dict:
    """The ops to keep in F32 for this graph at this precision: first what the precision cannot
    carry (kept_outright); then, while model_deploy fails, the op its crash localizes to; then,
    when the bmodel misses what run_deploy holds it to, the fewest of the ops its TPU dialect
    computes worst (compile/localization.py's search over the lowering's per-op figures). All
    within the budget, besides kept_outright; none when the precision compiles and passes as it is.
    Cost of the accuracy step: one localization, then about log2(budget) + 2 tries and at most
    PRUNE_TRIES more, each a compile and a cmodel acceptance."""
    import json

    from compile.localization import search_float_layers

    p = node.params
    ops = top_ops(ctx.input("mlir").read_text())
    outright = kept_outright(ctx, p)
    unbudgeted = [op for path in OUTRIGHT for op in outright[path]]
    for path, what in OUTRIGHT.items():
        if outright[path]:
            limit = EXACT_INTEGERS[p["precision"]]
            ctx.log(f"mixed precision: {len(outright[path])} ops {what.format(beyond=f' beyond {limit}' if limit else '')}: kept in F32 "
                    f"outright: {', '.join(outright[path])}")
    count, kept, steps = [0], list(unbudgeted), []
    while not _compiles(ctx, p, kept, count):
        found = localize_crash(ctx, p, ops, kept, count, fails_as_is=True)
        steps.append(found)
        if found["op"] is None:
            raise StageError(f"mixed precision: {found['why']}", finding=found)
        if len(kept) - len(unbudgeted) >= p["max_float_layers"]:
            raise StageError(f"mixed precision: the budget of {p['max_float_layers']} ops in F32 is spent "
                             f"({', '.join(kept)}) and model_deploy still fails; next: {found['op']} ({found['type']})",
                             finding=found)
        ctx.log(f"mixed precision: keeping {found['op']} ({found['type']}) in F32: {found['why']}")
        kept.append(found["op"])
    accuracy: dict = {"checked": _accuracy_checked(ctx, p)}
    misses: list[str] = []
    if accuracy["checked"] and not _compiles(ctx, p, kept, count, checked=True, misses=misses):
        found, entries = localize_accuracy(ctx, p, kept)
        said = f"{misses[0]}; {_said(found, p)}"
        ctx.log(f"mixed precision: with {len(kept)} ops in F32 the bmodel misses: {said}")
        budget = p["max_float_layers"] - (len(kept) - len(unbudgeted))
        try:
            searched = search_float_layers([e for e in entries if e["node"] not in kept],
                                           lambda chosen: _compiles(ctx, p, kept + chosen, count, checked=True),
                                           budget, ctx.log, prune_tries=PRUNE_TRIES)
        except StageError as e:
            raise GateError(f"{e} ({count[0]} compiles). With {len(kept)} ops in F32: {said}",
                            finding={**found, **outright, "float_ops": kept, "as_is": misses[0]}) from None
        kept += searched["float_layers"]
        accuracy.update(as_is=misses[0], localized=found, ops=searched["float_layers"], tries=searched["tries"])
    kinds = dict(ops)
    table = {"float_ops": kept, "types": {k: kinds.get(k) for k in kept}, **outright,
             "compiles": count[0], "steps": steps, "accuracy": accuracy,
             "bmodel": _searched_build(ctx, p, kept, accuracy["checked"], count)}
    ctx.tmp("float_ops").write_text(json.dumps(table, indent=1))
    return {"float_ops": kept, **{path: len(outright[path]) for path in OUTRIGHT},
            "compiles": count[0],
            "summary": f"{len(kept)} ops kept in F32{_why_kept(outright, kept, accuracy)}, {count[0]} compiles"}


def _searched_build(ctx, p: dict, kept: list, checked: bool, count: list) -> dict:
    """The search's last passing build, when it has the final table and was checked as the bmodel
    stage checks (else one more compile), moved to the node's `searched_bmodel` output: its
    sha256 and figures, for run_deploy to take it as its own."""
    import json

    from buildplan.files import sha256_file

    passed = ctx.workdir("passed")
    last = json.loads((passed / "t.json").read_text()) if (passed / "t.json").exists() else {}
    if last.get("float_ops") != sorted(kept) or last.get("checked") != checked:
        if not _compiles(ctx, p, kept, count, checked=checked):
            raise StageError(f"mixed precision: the final table ({len(kept)} ops in F32) no longer builds and passes")
        last = json.loads((passed / "t.json").read_text())
    shutil.move(passed / "t.bmodel", ctx.tmp("searched_bmodel"))
    return {"sha256": sha256_file(ctx.tmp("searched_bmodel")), "figures": last["figures"]}


def _why_kept(outright: dict, kept: list, accuracy: dict) -> str:
    searched = len(accuracy.get("ops", ()))
    paths = [f"{len(outright[path])} on the {path.replace('_', ' ')}" for path in OUTRIGHT]
    parts = [*paths, f"{len(kept) - searched - sum(len(outright[path]) for path in OUTRIGHT)} for a crash",
             f"{searched} for accuracy"]
    return f" ({', '.join(p for p in parts if not p.startswith('0 '))})" if kept else ""


def run_deploy(node: Node, ctx) -> dict:
    import json

    p = node.params
    work = ctx.workdir()
    _link_weights(ctx, work)
    name = Path(node.outputs["bmodel"]).name
    table = json.loads(ctx.input("float_ops").read_text()) if p.get("mixed_precision") else {}
    float_ops = table.get("float_ops", [])
    searched = _take_searched_build(ctx, table, work / name) if table else None
    figures = searched if searched is not None else {"tpu_mlir": _deploy(ctx, p, work, name, float_ops)}
    device = _within_device_memory(ctx, p, work, name, "use a step decoder (blip_cap_step, blip_vqa_tdec_step) or ")
    if p["simulate"] and searched is None:
        try:
            figures.update(_accepted(ctx, p, work / name, work))
        except GateError as e:
            raise _localized(ctx, p, e, float_ops) from None
    shutil.move(work / name, ctx.tmp("bmodel"))
    return {"figures": figures, "simulated": bool(p["simulate"]), "device_memory": device,
            **({"acceptance": "tokens_vs_onnx"} if "tokens_vs_onnx" in figures else {}),
            **({"float_ops": float_ops, "summary": f"mixed: {len(float_ops)} ops in F32"} if float_ops else {})}


def _take_searched_build(ctx, table: dict, bmodel: Path) -> dict | None:
    """The mixed-precision search's build of this very table, checked as run_deploy checks, copied
    to `bmodel`: its figures. None (compile it here) when that file is not the one the search made."""
    from buildplan.files import sha256_file

    searched = ctx.input("searched_bmodel")
    built = table.get("bmodel") or {}
    if not searched.is_file() or sha256_file(searched) != built.get("sha256"):
        ctx.log(f"{searched} is not the search's build (sha256 {built.get('sha256')}): compiling")
        return None
    shutil.copyfile(searched, bmodel)
    ctx.log(f"the search's build of this table, already checked: {searched}")
    return built["figures"]


def _deploy(ctx, p: dict, work: Path, name: str, float_ops: list) -> list[dict]:
    """model_deploy of the bmodel into work/name: TPU-MLIR's own comparisons, where it makes them.
    Below F32 a crash is localized to its op; a failed comparison, to its layer."""
    import json

    try:
        log = ctx.run(_deploy_argv(ctx, p, work, name, float_ops) + _lowering_check(ctx, p), cwd=work,
                      what="model_deploy.py")
    except StageError as e:
        if p["precision"] == "F32" or float_ops:
            raise
        found = localize_crash(ctx, p, top_ops(ctx.input("mlir").read_text()))
        ctx.log(f"crash localization: {json.dumps(found)}")
        if found.get("compiles_as_is"):  # TPU-MLIR's own comparison failed: an accuracy failure
            raise _localized(ctx, p, e) from None
        raise StageError(f"{str(e).splitlines()[0]} {found['why']} ({found['compiles']} compiles to find it); "
                         "mixed_precision: auto keeps such ops in F32\n" + "\n".join(str(e).splitlines()[1:]),
                         finding={"crash": found}) from None
    return _similarities(log)


def run_combine(node: Node, ctx) -> dict:
    """model_tool --combine_coeff of a graph's per-batch bmodels (largest batch first), then every
    batch size run from the combined file on the cmodel and accepted as its single file was."""
    p = node.params
    work = ctx.workdir()
    name = Path(node.outputs["bmodel"]).name
    ctx.run(["model_tool", "--combine_coeff", *(str(ctx.path(f["bmodel"])) for f in p["parts"]), "-o", name], cwd=work,
            what="model_tool --combine_coeff")
    device = _within_device_memory(ctx, p, work, name)
    singles = {f["batch"]: ctx.path(f["bmodel"]).stat().st_size for f in p["parts"]}
    sizes = {"combined_bytes": (work / name).stat().st_size, "separate_bytes": sum(singles.values()),
             "largest_single_bytes": max(singles.values())}
    figures = {}
    if p["simulate"]:
        for f in p["parts"]:
            try:
                accepted = _accepted(ctx, {**p, "batch": f["batch"]}, work / name, ctx.workdir(f"bs{f['batch']}"), f)
            except GateError as e:
                raise GateError(f"batch size {f['batch']} from the combined file: {e}") from None
            figures.update({f"bs{f['batch']}_{k}": v for k, v in accepted.items()})
    shutil.move(work / name, ctx.tmp("bmodel"))
    return {"figures": figures, "simulated": bool(p["simulate"]), "device_memory": device, "sizes": sizes,
            "summary": f"{len(p['parts'])} batch sizes, {sizes['combined_bytes'] / sizes['largest_single_bytes']:.2f}x "
                       "the largest single file"}


def run_bundle(node: Node, ctx) -> dict:
    """model_tool --combine of the task's bmodels, then the task run from that one file on the
    cmodel, graph after graph and the greedy loop, against the same chain on the ONNX graphs:
    every token equal in F32 (and under decoder_gate: exact), else the share of identical
    sequences of the agreement rule over GATE_LOOPS inputs (the model's first images and texts,
    when it has them, under either rule)."""
    import json

    import numpy as np

    from compile.acceptance import GATE_LOOPS
    from export.decoding import task_loop
    from export.reference import read_io
    from export.samples import pack

    p = node.params
    work = ctx.workdir()
    name = Path(node.outputs["bmodel"]).name
    ctx.run(["model_tool", "--combine", *(str(ctx.path(f["bmodel"])) for f in p["files"].values()), "-o", name],
            cwd=work, what="model_tool --combine")
    device = _within_device_memory(ctx, p, work, name)
    separate = sum(ctx.path(f["bmodel"]).stat().st_size for f in p["files"].values())
    result = {"sizes": {"bundle_bytes": (work / name).stat().st_size, "separate_bytes": separate},
              "device_memory": device, "nets": list(p["files"]), "simulated": bool(p["simulate"])}
    if p["simulate"]:
        # The data a task starts from: pixels, and text where it takes any. From the model's images
        # and texts when it has them (every net's samples, made as BLIP makes its inputs; up to
        # GATE_LOOPS of them, whatever the rule); else each graph's reference sample first, then
        # seeded ones for the agreement rule.
        real = any("calibration_set" in f for f in p["files"].values())
        wanted = GATE_LOOPS if real or p["min_share"] < 1.0 else 1
        per_graph = {graph: gate_inputs(GRAPHS[graph], {"real_data": "calibration_set" in f, "samples": wanted,
                                                        "dims": p["dims"]}, p["batch"],
                                        None if "calibration_set" in f else read_io(ctx.path(f["reference"]))[0],
                                        lambda role, f=f: ctx.path(f[role]))
                     for graph, f in p["files"].items()}
        count = min(len(inputs) for inputs in per_graph.values())
        samples = []
        for i in range(count):
            raw = {}
            for graph, inputs in per_graph.items():
                raw.update({t.sample: inputs[i][t.name] for t in GRAPHS[graph].inputs
                            if t.sample in ("image", "text_ids", "text_mask") and t.sample not in raw})
            samples.append(raw)
        import onnxruntime as ort

        sessions = {g: ort.InferenceSession(str(ctx.path(f["onnx"])), providers=["CPUExecutionProvider"])
                    for g, f in p["files"].items()}
        outputs = {g["name"]: g["outputs"] for g in p["chain"]}

        def on_onnx(graph, feeds):
            return dict(zip(outputs[graph], sessions[graph].run(outputs[graph], feeds), strict=True))

        want = [task_loop(on_onnx, raw, p["chain"], p["loop"]) for raw in samples]
        np.savez(work / "raw.npz", **pack(samples))
        ctx.run(["python", str(Path(__file__).with_name("cmodel_runs.py")), "--task", name, "raw.npz",
                 json.dumps(p["chain"]), json.dumps(p["loop"]), "task_ids.npz"], cwd=work,
                what=f"the {p['task']} task from {name} on the cmodel")
        with np.load(work / "task_ids.npz") as z:
            got = [z[f"{i}/loop"] for i in range(count)]
        identical = sum(bool(np.array_equal(w, g)) for w, g in zip(want, got, strict=True)) / count
        result["figures"] = {"task_vs_onnx": {"samples": count, "identical_sequences": identical,
                                              "min_share": p["min_share"], **({"real_data": True} if real else {})}}
        result["acceptance"] = "task_vs_onnx"
        if identical < p["min_share"]:
            raise GateError(f"the {p['task']} task from {name}: {identical:.0%} of {count} greedy sequences equal the "
                            f"ONNX graphs' (min {p['min_share']:.0%}); first: {got[0].tolist()} vs {want[0].tolist()}")
    shutil.move(work / name, ctx.tmp("bmodel"))
    result["summary"] = f"{len(p['files'])} nets, {result['sizes']['bundle_bytes'] / separate:.2f}x the separate files"
    return result


def _within_device_memory(ctx, p: dict, work: Path, name: str, advice: str = "") -> dict:
    """What `model_tool --info` says the bmodel needs on the device. A bmodel its chip cannot load
    is no artifact: refused (before any cmodel run is spent on it)."""
    device = device_memory(ctx.run(["model_tool", "--info", name], cwd=work, what="model_tool --info"))
    device["bmodel_bytes"] = (work / name).stat().st_size
    if device["device_bytes"] > p["device_memory_mb"] * 2**20:
        raise StageError(f"{name} needs {device['device_bytes'] / 2**20:.0f} MiB of device memory "
                         f"(weights {device.get('weight_bytes', 0) / 2**20:.0f} MiB), more than {p['chip']}'s budget of "
                         f"{p['device_memory_mb']} MiB: {advice}raise the target's device_memory_mb if the device "
                         "really has more")
    return device


def device_memory(info: str) -> dict:
    """What `model_tool --info` says a bmodel needs on the device, in bytes."""
    found = {}
    for key, pattern in (("device_bytes", r"device mem size:\s*(\d+)"), ("weight_bytes", r"\(weight:\s*(\d+)"),
                         ("instruction_bytes", r"instruct:\s*(\d+)"), ("runtime_bytes", r"instruct:\s*\d+, runtime:\s*(\d+)")):
        m = re.search(pattern, info)
        if m:
            found[key] = int(m.group(1))
    if "device_bytes" not in found:
        raise StageError("model_tool --info printed no 'device mem size': cannot check the device memory budget")
    return found


def _accepted(ctx, p: dict, bmodel: Path, work: Path, given=None) -> dict:
    """The finished bmodel on the chip's cmodel, accepted against the ONNX reference: its figures,
    or a GateError. `given` ({role: path}) names the test input, reference and ONNX files when
    they are not the node's inputs of those roles (a combined bmodel: one set per batch size)."""
    spec = GRAPHS[p["graph"]]
    file_of = (lambda role: ctx.path(given[role])) if given else ctx.input
    if spec.discrete_outputs:
        return _decoder_gate(ctx, p, spec, bmodel, work, file_of)
    import numpy as np

    from export.gates import worst
    from export.reference import read_io

    ctx.run(["model_runner.py", "--input", str(file_of("test_input")), "--model", str(bmodel), "--output",
             "bmodel_outputs.npz"], cwd=work, what="model_runner.py (cmodel run of the bmodel)")
    with np.load(work / "bmodel_outputs.npz") as z:
        produced = [z[k] for k in z.files]  # the network outputs, in order
    _, reference = read_io(file_of("reference"))
    return {"bmodel_vs_onnx": worst(accept(spec, reference, produced, p["precision"]))}


def _localized(ctx, p: dict, failure: StageError, float_ops=()) -> StageError:
    """The failure, with the op where the TPU dialect parts from the top MLIR named in it."""
    import json

    try:
        found, _ = localize_accuracy(ctx, p, float_ops)
    except StageError as e:
        ctx.log(f"accuracy localization failed: {e}")
        return failure
    ctx.log(f"accuracy localization ({found['compared']} tensors compared): {json.dumps(found)}")
    lines = str(failure).splitlines()
    return GateError("\n".join([f"{lines[0]}; {_said(found, p)}", *lines[1:]]), finding=found)


def _said(found: dict, p: dict) -> str:
    """A localization's finding in one line; for a decoder whose tensors all meet the rule, why
    its tokens still differ."""
    from compile.localization import describe

    if "first_off" not in found and GRAPHS[p["graph"]].discrete_outputs:
        return (f"every tensor up to the token choice meets the {p['precision']} rule (worst cosine "
                f"{found['worst']['cosine']:.5f}): the tokens that differ are near ties between the best logits")
    return describe(found, p["precision"])


def _decoder_gate(ctx, p: dict, spec, bmodel: Path, work: Path, file_of) -> dict:
    """A decoder's bmodel on the cmodel against the ONNX graph: under the exact rule, on the
    reference file's sample (every token equal, the step decoder's whole greedy loop too); under
    the agreement rule (below F32), over the gate's inputs (compile/acceptance.py)."""
    from export.gates import compare, worst
    from export.reference import read_io, read_loop

    io_file = file_of("reference")
    inputs, reference = read_io(io_file)
    gate, loop = p.get("token_gate"), p.get("loop")
    if gate:
        samples, loops = gate_inputs(spec, gate, p["batch"], inputs, file_of), gate["loops"]
        want = onnx_runs(file_of("onnx"), spec, samples, loop, loops)
        got = _cmodel_runs(ctx, spec, bmodel, samples, None, 0, work)
        if loop:  # the single calls decide first: when they miss the rule, the loops' cmodel time is saved
            accept_tokens(spec, [{k: v for k, v in w.items() if k != "loop"} for w in want], got, p["precision"],
                          gate["min_share"])
            got[:loops] = _cmodel_runs(ctx, spec, bmodel, samples[:loops], loop, loops, work)
        return {"tokens_vs_onnx": accept_tokens(spec, want, got, p["precision"], gate["min_share"])}
    got = _cmodel_runs(ctx, spec, bmodel, [inputs], loop, 1, work)
    figures = {"bmodel_vs_onnx": worst(accept(spec, reference, [got[0][t.name] for t in spec.outputs], p["precision"]))}
    if loop:  # the runtime's greedy loop around the step bmodel: the ONNX loop's tokens, which the
        # export stage proved equal to transformers' generate()
        ids = loop["ids_name"]
        figures["cmodel_loop_vs_onnx_loop"] = compare(read_loop(io_file), {ids: got[0]["loop"]}, 0.0, discrete=True)[ids]
    return figures


def _cmodel_runs(ctx, spec, bmodel: Path, samples: list[dict], loop: dict | None, loops: int, work: Path) -> list[dict]:
    """The bmodel on the cmodel, one toolchain process for every sample: each sample's outputs by
    spec name (in order: lowering may rename them), and for the first `loops` samples the greedy
    loop's ids under "loop"."""
    import json

    import numpy as np

    from export.samples import pack

    np.savez(work / "gate_samples.npz", **pack(samples))
    ctx.run(["python", str(Path(__file__).with_name("cmodel_runs.py")), str(bmodel), str(work / "gate_samples.npz"),
             json.dumps(loop), str(loops), str(work / "gate_outputs.npz")], cwd=work,
            what=f"cmodel runs of the bmodel ({len(samples)} samples{f', {loops} greedy loops' if loop else ''})")
    runs = []
    with np.load(work / "gate_outputs.npz") as z:
        for i in range(len(samples)):
            run = {t.name: z[f"{i}/{k}"] for k, t in enumerate(spec.outputs)}
            if loop and i < loops:
                run["loop"] = z[f"{i}/loop"]
            runs.append(run)
    return runs

"""Backend ONNX Runtime: ORT-format models (`.ort`, what ORT Mobile and edge CPUs load) for the
target `cpu`, in F32 and INT8 (stage `ort`).

INT8 is ORT's static quantization (QDQ, 8-bit weights and activations), calibrated on the same
samples as TPU-MLIR's (calibration.data, else the synthetic ones). Each artifact is loaded from
its ORT file, run on the reference inputs and accepted against the ONNX reference with the same
per-precision rule as a bmodel.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from buildplan.core import GateError, Node, Setting, StageError
from buildplan.toolchains import Toolchain, installed_versions, memoised, short_sha
from compile.acceptance import (ACCEPT, DECODER_GATES, accept, accept_tokens, calibration_inputs, calibration_samples,
                                gate_inputs, gate_samples, onnx_runs, token_gate)
from export.specs import GRAPHS

NAME = "onnxruntime"
LABEL = "ONNX Runtime"
TARGETS = ("cpu",)
PRECISIONS = ("F32", "INT8")
SETTINGS = (
    Setting("precisions", "choices", "one ORT-format model each; INT8 is ORT static quantization (QDQ)",
            default=("F32",), allowed=PRECISIONS, axis=True),
    Setting("mixed_precision", "str", "INT8: `auto` keeps the fewest layers in float that make the model pass its "
            "acceptance (searched once, kept as an artifact); `off`: pure INT8, a failure names the layer",
            default="off", allowed=("off", "auto")),
    Setting("max_float_layers", "int", "mixed_precision auto: at most this many nodes kept in float",
            default=16, minimum=1, maximum=100000, unit="nodes"),
    Setting("decoder_gate", "str", "decoders in INT8: `agreement` holds the token ids to the share of identical "
            "decisions over many inputs (README: token gates); `exact`: every token equal, as in F32",
            default="agreement", allowed=DECODER_GATES),
)
STAGE_DOCS = {"ort": "ONNX Runtime ORT-format model", "float_layers": "layers an INT8 model keeps in float"}
# peak RSS of the build process, measured on tiny; base a guess
MEMORY_MB = {"ort": {"tiny": 800, "base": 6000}, "float_layers": {"tiny": 1000, "base": 8000}}
# Extended, not all: the layout rewrites of level "all" are specific to the converting machine's
# CPU, and an ORT file is meant to run elsewhere. Extended still fuses QDQ pairs into INT8 kernels.
OPTIMIZATION = "extended"


# --- toolchain ---------------------------------------------------------------------------
def detect(settings: dict) -> tuple[Toolchain, list[str]]:
    watched = [entry or "." for entry in sys.path]  # an install or upgrade renames its dist-info folder
    return memoised(NAME, watched, identify), watched


def identify() -> Toolchain:
    version = installed_versions((NAME,))[NAME]
    if version is None:
        return Toolchain(NAME, False, problem="onnxruntime is not installed: run ./bootstrap.sh")
    import onnxruntime

    # the native library is what computes: its bytes identify the build, not only the version
    lib = next(Path(onnxruntime.__file__).parent.glob("capi/onnxruntime_pybind11_state*.so"), None)
    return Toolchain(NAME, True, {"version": version, "build": short_sha(lib, 1 << 20) if lib else "?"})


# --- plan ----------------------------------------------------------------------------------
def ort_path(model: str, graph: str, precision: str, batch: int) -> str:
    return f"{model}/CPU/{graph}_cpu_{precision.lower()}_{batch}b.ort"


def declare(plan, model, dims: dict, target, exported) -> None:
    mixed = target.settings["mixed_precision"] == "auto"
    for graph in target.graphs:
        for bs in target.batch_sizes:
            simplified = exported.fixed(graph, bs)
            for precision in target.settings["precisions"]:
                int8 = precision == "INT8"
                gate, gate_deps = token_gate(GRAPHS[graph], precision, target.settings["decoder_gate"], dims,
                                             partial(gate_samples, model, exported, graph, bs))
                gated = {"token_gate": gate} if gate else {}
                labels = {"graph": graph, "batch": bs, "target": target.name, "precision": precision}
                calibration, sources, deps = {}, (), (simplified, *gate_deps)
                if int8:
                    calibration, sources, cal_deps = calibration_inputs(model, exported, graph, bs)
                    calibration["dims"] = dims
                    deps += tuple(d for d in cal_deps if d not in deps)
                if int8 and mixed:  # the search's answer is an artifact: searched again only when stale
                    deps += (plan.add(Node(
                        id=f"float_layers:{model.name}.{graph}.{target.name}.{precision}.{bs}b", stage="float_layers",
                        model=model.name, action="compile.ort:run_float_search", toolchain=NAME, deps=deps,
                        outputs={"float_layers": ort_path(model.name, graph, precision, bs) + ".float_layers.json"},
                        sources=sources, labels=labels,
                        params={"graph": graph, "batch": bs, "precision": precision, **calibration, **gated,
                                "max_float_layers": target.settings["max_float_layers"]})).id,)
                plan.add(Node(
                    id=f"ort:{model.name}.{graph}.{target.name}.{precision}.{bs}b", stage="ort", model=model.name,
                    outputs={"ort": ort_path(model.name, graph, precision, bs)}, action="compile.ort:run",
                    toolchain=NAME, deps=deps, sources=sources,
                    params={"graph": graph, "batch": bs, "precision": precision, "optimization": OPTIMIZATION,
                            **calibration, **gated, **({"mixed_precision": "auto"} if int8 and mixed else {})},
                    labels=labels),
                    f"compile:{target.name}")


# --- run -------------------------------------------------------------------------------------
def quantize(onnx_file: Path, out: Path, samples, per_channel: bool, float_layers=(), masks=None) -> list[str]:
    """ORT static quantization, QDQ format: int8 weights, uint8 activations whose ranges come
    from `samples`; the nodes in `float_layers` stay float, and so does the mask path (returned;
    `masks` when the caller found it already). Per-channel weight scales need opset 13
    (DequantizeLinear's axis)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from compile.ort_precision import mask_path

    samples = list(samples)
    masks = mask_path(onnx_file, samples) if masks is None else masks

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(samples)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(onnx_file), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(dict.fromkeys([*float_layers, *masks])))
    return masks


def to_ort_format(onnx_file: Path, out: Path) -> None:
    """Save the optimised graph in ORT format, as ORT's own converter does."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    options.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    if not out.is_file() or out.stat().st_size == 0:
        raise StageError(f"ONNX Runtime wrote no ORT-format model for {onnx_file.name}")


class Acceptance:
    """What a model of this node is held to, prepared once: the ONNX reference's outputs on its
    sample, or a decoder's agreement gate with the ONNX graph's runs on the gate's inputs."""

    def __init__(self, node: Node, ctx, spec, inputs: dict, reference: dict):
        from export.decoding import loop_settings

        self.spec, self.precision, self.inputs, self.reference = spec, node.params["precision"], inputs, reference
        self.gate = node.params.get("token_gate")
        if self.gate:
            self.loop = loop_settings(spec, self.gate["dims"]) if spec.decoding else None
            self.samples = gate_inputs(spec, self.gate, node.params["batch"], inputs, ctx.input)
            self.want = onnx_runs(ctx.input("onnx"), spec, self.samples, self.loop, self.gate["loops"])

    def evaluate(self, model_file: Path) -> tuple[dict | None, str | None]:
        """(figures, None) when the model meets its acceptance, else (None, why)."""
        from export.gates import worst

        try:
            if self.gate:
                got = onnx_runs(model_file, self.spec, self.samples, self.loop, self.gate["loops"])
                return {"tokens_vs_onnx": accept_tokens(self.spec, self.want, got, self.precision,
                                                        self.gate["min_share"])}, None
            import onnxruntime as ort

            session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
            produced = session.run([t.name for t in self.spec.outputs], self.inputs)
            return {"ort_vs_onnx": worst(accept(self.spec, self.reference, produced, self.precision))}, None
        except StageError as e:
            return None, str(e)


def _localized(onnx_file: Path, quantized: Path, inputs: dict, precision: str) -> tuple[dict, list[dict]]:
    import onnx

    from compile.localization import findings
    from compile.ort_precision import profile

    float_model = onnx.load(str(onnx_file))
    entries = profile(float_model, onnx.load(str(quantized)), inputs, precision)
    return findings(entries, precision, {i.name for i in float_model.graph.input}), entries


def run(node: Node, ctx) -> dict:
    import json

    from compile.localization import describe
    from export.reference import read_io

    p = node.params
    spec = GRAPHS[p["graph"]]
    onnx_file = ctx.input("onnx")
    inputs, reference = read_io(ctx.input("reference"))
    work = ctx.workdir()
    result: dict = {}
    model_file = onnx_file
    if p["precision"] == "INT8":
        float_layers = json.loads(ctx.input("float_layers").read_text())["float_layers"] \
            if p.get("mixed_precision") == "auto" else []
        model_file = work / "quantized.onnx"
        samples = list(calibration_samples(node, ctx, spec, p.get("dims"), p["batch"]))
        result["mask_path"] = quantize(onnx_file, model_file, samples, per_channel=spec.opset >= 13,
                                       float_layers=float_layers)
        result["calibration"] = {"samples": len(samples), "synthetic": not (node.sources or p["real_data"]),
                                 "from_images": p["real_data"]}
        ctx.log(f"quantized on {len(samples)} calibration samples "
                f"({'made from images' if p['real_data'] else 'from .npz files' if node.sources else 'synthetic'})")
        result["float_layers"] = float_layers
    # The artifact itself, loaded from its ORT file, on the reference inputs.
    out = ctx.tmp("ort")
    to_ort_format(model_file, out)
    figures, problem = Acceptance(node, ctx, spec, inputs, reference).evaluate(out)
    if problem is not None:
        if model_file == onnx_file:
            raise GateError(problem)
        found, _ = _localized(onnx_file, model_file, inputs, p["precision"])
        ctx.log(f"localization ({found['compared']} activations compared): {json.dumps(found)}")
        raise GateError(f"{problem}; {describe(found, p['precision'])}", finding=found)
    rule = "the token agreement rule" if p.get("token_gate") else "min cosine {}, max relative error {}".format(
        *ACCEPT[p["precision"]])
    ctx.log(f"{out.name}: accepted against the ONNX reference ({rule}): {figures}")
    if result.get("float_layers"):
        result["summary"] = f"mixed: {len(result['float_layers'])} nodes in float"
    return {**result, "figures": figures, "ort_bytes": out.stat().st_size,
            **({"acceptance": "tokens_vs_onnx"} if "tokens_vs_onnx" in figures else {}),
            "onnx_bytes": onnx_file.stat().st_size}


def run_float_search(node: Node, ctx) -> dict:
    """The fewest nodes to keep in float for this graph's INT8 model to pass its acceptance: none
    when pure INT8 passes; else the search in compile/localization.py, within the budget."""
    import json

    from compile.localization import search_float_layers
    from compile.ort_precision import mask_path
    from export.reference import read_io

    p = node.params
    spec = GRAPHS[p["graph"]]
    onnx_file = ctx.input("onnx")
    inputs, reference = read_io(ctx.input("reference"))
    samples = list(calibration_samples(node, ctx, spec, p.get("dims"), p["batch"]))
    work = ctx.workdir()
    count = [0]
    masks = mask_path(onnx_file, samples)  # the same for every try

    def quantized(float_layers) -> Path:
        count[0] += 1
        out = work / f"quantized_{count[0]}.onnx"
        quantize(onnx_file, out, samples, per_channel=spec.opset >= 13, float_layers=float_layers, masks=masks)
        return out

    acceptance = Acceptance(node, ctx, spec, inputs, reference)
    pure = quantized([])
    _, problem = acceptance.evaluate(pure)
    table = {"float_layers": [], "tensors": [], "quantizations": 1, "pure": {"passes": problem is None}}
    if problem is not None:
        found, entries = _localized(onnx_file, pure, inputs, p["precision"])
        table["pure"].update(problem=problem, localized=found)
        ctx.log(f"pure {p['precision']}: {problem}")
        searched = search_float_layers(entries, lambda layers: acceptance.evaluate(quantized(layers))[1] is None,
                                       p["max_float_layers"], ctx.log)
        table.update(float_layers=searched["float_layers"], tensors=searched["tensors"], quantizations=searched["tries"] + 1)
    ctx.tmp("float_layers").write_text(json.dumps(table, indent=1))
    return {"float_layers": table["float_layers"], "quantizations": table["quantizations"],
            "summary": f"{len(table['float_layers'])} nodes kept in float, {table['quantizations']} quantizations"}

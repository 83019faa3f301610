"""Backend ONNX Runtime: ORT-format models (`.ort`, what ORT Mobile and edge CPUs load) for the
target `cpu`, in F32 and INT8 (stage `ort`).

INT8 is ORT's static quantization (QDQ, 8-bit weights and activations), calibrated on the same
samples as TPU-MLIR's (calibration.data, else the synthetic ones). Each artifact is loaded from
its ORT file, run on the reference inputs and accepted against the ONNX reference with the same
per-precision rule as a bmodel.
"""
from __future__ import annotations

import sys
from pathlib import Path

from buildplan.core import Node, Setting, StageError
from buildplan.toolchains import Toolchain, installed_versions, memoised, short_sha
from compile.acceptance import ACCEPT, accept, calibration_files, calibration_samples
from export.specs import GRAPHS

NAME = "onnxruntime"
LABEL = "ONNX Runtime"
TARGETS = ("cpu",)
PRECISIONS = ("F32", "INT8")
SETTINGS = (
    Setting("precisions", "choices", "one ORT-format model each; INT8 is ORT static quantization (QDQ)",
            default=("F32",), allowed=PRECISIONS, axis=True),
)
STAGE_DOCS = {"ort": "ONNX Runtime ORT-format model"}
MEMORY_MB = {"ort": {"tiny": 800, "base": 6000}}  # peak RSS of the build process, measured on tiny; base a guess
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
    for graph in target.graphs:
        for bs in target.batch_sizes:
            simplified = exported.fixed(graph, bs)
            for precision in target.settings["precisions"]:
                int8 = precision == "INT8"
                plan.add(Node(
                    id=f"ort:{model.name}.{graph}.{target.name}.{precision}.{bs}b", stage="ort", model=model.name,
                    outputs={"ort": ort_path(model.name, graph, precision, bs)}, action="compile.ort:run",
                    toolchain=NAME, deps=(simplified,),
                    sources=calibration_files(model.calibration["data"]) if int8 else (),
                    params={"graph": graph, "batch": bs, "precision": precision, "optimization": OPTIMIZATION,
                            **({"samples": model.calibration["samples"], "dims": dims} if int8 else {})},
                    labels={"graph": graph, "batch": bs, "target": target.name, "precision": precision}),
                    f"compile:{target.name}")


# --- run -------------------------------------------------------------------------------------
def quantize(onnx_file: Path, out: Path, samples, per_channel: bool) -> None:
    """ORT static quantization, QDQ format: int8 weights, uint8 activations whose ranges come
    from `samples`. Per-channel weight scales need opset 13 (DequantizeLinear's axis)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(samples)

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(onnx_file), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


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


def run(node: Node, ctx) -> dict:
    import onnxruntime as ort

    from export.gates import worst
    from export.reference import read_io

    p = node.params
    spec = GRAPHS[p["graph"]]
    onnx_file = ctx.input("onnx")
    work = ctx.workdir()
    result: dict = {}
    if p["precision"] == "INT8":
        quantized = work / "quantized.onnx"
        count = [0]

        def counted(samples):
            for sample in samples:
                count[0] += 1
                yield sample
        quantize(onnx_file, quantized, counted(calibration_samples(node, spec, p.get("dims"), p["batch"])),
                 per_channel=spec.opset >= 13)
        result["calibration"] = {"samples": count[0], "synthetic": not node.sources}
        onnx_file = quantized
    out = ctx.tmp("ort")
    to_ort_format(onnx_file, out)
    # The artifact itself, loaded from its ORT file, on the reference inputs.
    inputs, reference = read_io(ctx.input("reference"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    produced = session.run([t.name for t in spec.outputs], inputs)
    figures = accept(spec, reference, produced, p["precision"])
    min_cos, max_rel = ACCEPT[p["precision"]]
    ctx.log(f"{out.name}: accepted against the ONNX reference (min cosine {min_cos}, max relative error {max_rel}): "
            f"{figures}")
    return {**result, "figures": {"ort_vs_onnx": worst(figures)}, "ort_bytes": out.stat().st_size,
            "onnx_bytes": ctx.input("onnx").stat().st_size}

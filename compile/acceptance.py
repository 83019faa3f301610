"""The acceptance every backend applies to what it compiled: its outputs on the spec's sample
inputs against the ONNX reference (`.io.npz`) that the export stage proved against PyTorch."""
from __future__ import annotations

from buildplan.core import StageError

# Per precision: minimum cosine, largest error relative to the reference's largest magnitude.
ACCEPT = {"F32": (0.999, 0.01), "F16": (0.99, 0.05), "BF16": (0.98, 0.1), "INT8": (0.95, 0.2)}


def accept(spec, reference: dict, produced: list, precision: str) -> dict:
    """Compare a compiled graph's outputs (in the spec's order) with the ONNX reference; raise
    a StageError naming the output when it is off by more than the precision allows."""
    import numpy as np

    from export.gates import compare

    if len(produced) != len(spec.outputs):
        raise StageError(f"{spec.name}: {len(produced)} outputs, the spec has {len(spec.outputs)}")
    candidate = {}
    for t, got in zip(spec.outputs, produced, strict=True):
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


def calibration_files(data_dir: str | None) -> tuple[str, ...]:
    """A user's calibration samples: the .npz files of calibration.data, sorted."""
    from pathlib import Path

    return tuple(sorted(str(p) for p in Path(data_dir).glob("*.npz"))) if data_dir else ()


def calibration_samples(node, spec, dims: dict, batch: int):
    """The calibration inputs, one dict per sample: the user's files (node.sources) when
    calibration.data is set, else synthetic samples (enough to prove the INT8 path, not for
    accuracy). Every backend calibrates on the same ones."""
    import numpy as np

    from export.samples import make_inputs

    if node.sources:
        for src in node.sources:
            with np.load(src) as z:
                yield {k: z[k] for k in z.files}
    else:
        for i in range(node.params["samples"]):
            yield make_inputs(spec, dims, batch, seed=1000 + i)

"""The acceptance every backend applies to what it compiled: its outputs on the spec's sample
inputs against the ONNX reference (`.io.npz`) that the export stage proved against PyTorch."""
from __future__ import annotations

from buildplan.core import GateError, StageError

# Per precision: minimum cosine, largest error relative to the reference's largest magnitude.
ACCEPT = {"F32": (0.999, 0.01), "F16": (0.99, 0.05), "BF16": (0.98, 0.1), "INT8": (0.95, 0.2)}


def accept(spec, reference: dict, produced: list, precision: str) -> dict:
    """Compare a compiled graph's outputs (in the spec's order) with the ONNX reference; raise
    a GateError naming the output when it is off by more than the precision allows."""
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
            raise GateError(f"{spec.name} {precision}: output {name} vs the ONNX reference: cosine {f['cosine']:.5f} "
                             f"(min {min_cos}), relative max error {f['rel_max_abs']:.4f} (max {max_rel})")
    return figures


def calibration_files(data_dir: str | None) -> tuple[str, ...]:
    """A user's calibration samples: the .npz files of calibration.data, sorted."""
    from pathlib import Path

    return tuple(sorted(str(p) for p in Path(data_dir).glob("*.npz"))) if data_dir else ()


def calibration_inputs(model, exported, graph: str, batch: int) -> tuple[dict, tuple, tuple]:
    """(params, sources, deps) of a node that calibrates `graph` at `batch`: on samples made from
    the model's images and texts, its .npz files, or synthetic samples (calibration_samples)."""
    real = exported.calibration(graph, batch)
    params = {"samples": model.calibration["samples"], "real_data": bool(real), "user_data": bool(model.calibration["data"])}
    return params, calibration_files(model.calibration["data"]), (real,) if real else ()


def calibration_samples(node, ctx, spec, dims: dict, batch: int):
    """The calibration inputs, one dict per sample: made from the model's images and texts (the
    dependency with role "calibration_set"), else the user's .npz files (node.sources) when
    calibration.data is set, else synthetic samples (enough to prove the INT8 path, not for
    accuracy). Every backend calibrates on the same ones."""
    import numpy as np

    from export.samples import make_inputs, unpack

    if node.params.get("real_data"):
        with np.load(ctx.input("calibration_set")) as z:
            yield from unpack(z)
    elif node.sources:
        for src in node.sources:
            with np.load(src) as z:
                yield {k: z[k] for k in z.files}
    else:
        for i in range(node.params["samples"]):
            yield make_inputs(spec, dims, batch, seed=1000 + i, full_row=False)


# --- decoders below F32 -------------------------------------------------------------------------
# A reduced precision moves every logit by about its rounding error; where the reference's two best
# tokens are closer than that, the greedy choice is a coin toss, and a free-running loop differs
# from the first flipped token on. Exact equality then measures the luck of near ties on one input,
# not the artifact. Below F32 a decoder is held instead to the share of identical decisions over
# GATE_SAMPLES inputs: whole greedy sequences (the loop of a step decoder, the rows of an unrolled
# one) and, for a step decoder, each next token chosen after the same prefix (the step graph called
# once on the sample's token ids, every position checked). F32 keeps exact equality.
TOKEN_AGREEMENT = {"F16": 0.9, "BF16": 0.8, "INT8": 0.7}
GATE_SAMPLES = 10  # the reference's own inputs and 9 more: one call each (a step decoder's next tokens)
GATE_LOOPS = 4  # of which the first 4 also run the whole greedy loop (a call per token: the cmodel's cost)
DECODER_GATES = ("agreement", "exact")
GATE_SEED = 7000  # sample seeds GATE_SEED + 1.. (calibration uses 1000+, the export stage 0-1)


def token_gate(spec, precision: str, rule: str, dims: dict, real_samples=lambda: None) -> tuple[dict | None, tuple]:
    """The node parameters of a decoder's agreement gate (None when the exact rule applies), and
    what the node then depends on: `real_samples()`, called only for a gate, gives the node of
    samples made from the model's images and texts (gate_samples), or None."""
    if not spec.discrete_outputs or precision == "F32" or rule == "exact":
        return None, ()
    real = real_samples()
    # An unrolled decoder's call is a whole sequence: as many inputs as a step decoder's loops.
    return {"rule": "agreement", "min_share": TOKEN_AGREEMENT[precision],
            "samples": GATE_SAMPLES if spec.decoding else GATE_LOOPS, "loops": GATE_LOOPS if spec.decoding else 0,
            "dims": dims, **({"real_data": True} if real else {})}, (real,) if real else ()


def gate_samples(model, exported, graph: str, batch: int) -> str | None:
    """The node of samples made from the model's images and texts, as BLIP makes its inputs, that a
    decoder's agreement gate runs on; None (synthetic inputs) when the model has no images or does
    not export the graphs that compute the decoder's feature inputs from them. A decoder's choices
    on random features are as uncertain as its weights allow; on real data they are what ships."""
    from export.specs import producers

    if not model.calibration.get("images") or any(g not in model.graphs for g in producers(graph)):
        return None
    return exported.calibration(graph, batch)


def gate_inputs(spec, gate: dict, batch: int, first: dict, file_of) -> list[dict]:
    """The agreement gate's inputs: with real data, the first of its samples (`file_of` the role
    "calibration_set"), as many as the gate takes; else the reference file's sample, then seeded
    synthetic ones."""
    import numpy as np

    from export.samples import make_inputs, unpack

    if gate.get("real_data"):
        with np.load(file_of("calibration_set")) as z:
            return unpack(z)[:gate["samples"]]
    return [first] + [make_inputs(spec, gate["dims"], batch, seed=GATE_SEED + i, full_row=False) for i in range(1, gate["samples"])]


def onnx_runs(model_file, spec, samples: list[dict], loop: dict | None, loops: int) -> list[dict]:
    """Each sample on ONNX Runtime: its outputs by spec name, and for the first `loops` samples
    a step decoder's greedy loop ids under "loop"."""
    import onnxruntime as ort

    from export.decoding import greedy_loop

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]
    runs = []
    for index, feeds in enumerate(samples):
        run = dict(zip(names, session.run(names, feeds), strict=True))
        if loop and index < loops:
            run["loop"] = greedy_loop(lambda f: session.run(names[:1], f)[0], feeds, **loop)
        runs.append(run)
    return runs


def _first_difference(want, got) -> int | None:
    import numpy as np

    diff = np.flatnonzero(want != got)
    return int(diff[0]) if diff.size else None


def accept_tokens(spec, reference_runs: list[dict], candidate_runs: list[dict], precision: str, min_share: float) -> dict:
    """The agreement rule: at least `min_share` of the sequences identical to the reference's, and
    (step decoders) of the next tokens chosen after the same prefix. Raises a GateError
    with the figures when either share is lower."""
    import numpy as np

    sequences, identical, divergences, decisions, same = 0, 0, [], 0, 0
    for ref, got in zip(reference_runs, candidate_runs, strict=True):
        pairs = [(ref["loop"], got["loop"])] if "loop" in ref else []
        for t in spec.outputs:
            want = np.asarray(ref[t.name])
            have = np.asarray(got[t.name]).reshape(want.shape)
            if spec.decoding:  # next_ids[:, t] after ids[:, :t+1]: one decision per position
                decisions += want.size
                same += int(np.sum(want == have))
            else:  # an unrolled decoder's rows are whole sequences
                pairs.append((want, have))
        for want, have in pairs:
            for row_want, row_have in zip(np.asarray(want), np.asarray(have).reshape(np.shape(want)), strict=True):
                sequences += 1
                first = _first_difference(row_want, row_have)
                if first is None:
                    identical += 1
                else:
                    divergences.append(first)
    figures = {"rule": "agreement", "min_share": min_share, "samples": len(reference_runs), "sequences": sequences,
               "identical_sequences": identical / sequences if sequences else 1.0,
               "first_divergence": min(divergences) if divergences else None}
    if decisions:
        figures["next_token_agreement"] = same / decisions
    short = [f"{label} {figures[key]:.3f}" for key, label in (("identical_sequences", "identical sequences"),
                                                             ("next_token_agreement", "next-token agreement"))
             if figures.get(key, 1.0) < min_share]
    if short:
        where = f", the earliest divergence at position {figures['first_divergence']}" if divergences else ""
        raise GateError(f"{spec.name} {precision}: token agreement with the ONNX reference over "
                         f"{len(reference_runs)} inputs: {', '.join(short)} (min {min_share}){where}")
    return figures

"""How close a step decoder's two best logits are at each greedy decision: the share of decisions
a reduced precision can flip without any layer being wrong (docs/precision.md, near ties).

    .venv/bin/python bench/logit_margins.py ARTIFACTS/captioning/onnx/blip_cap_step_bs1.onnx --arch tiny

Runs the simplified ONNX step decoder on ONNX Runtime, greedily, on the agreement gate's synthetic
inputs (batch size 1), with the scores its ArgMax reads made an output. Per decision: the gap
between the best and the second best score over the root mean square of the scores (the -1e9
end-token penalty left out). A precision that moves the scores by e % of their RMS can flip the
decisions whose gap is below about e %.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def margins(onnx_file: str, graph: str, arch: str, inputs: int) -> list[float]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from compile.acceptance import GATE_SEED
    from export.decoding import greedy_loop, loop_settings
    from export.presets import resolve_dims
    from export.samples import make_inputs
    from export.specs import GRAPHS

    spec = GRAPHS[graph]
    dims = resolve_dims(arch, spec.task)
    model = onnx.load(onnx_file)
    choice = next(n for n in model.graph.node if n.op_type == "ArgMax")
    model.graph.output.append(onnx.helper.make_tensor_value_info(choice.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    loop = loop_settings(spec, dims)
    gaps = []
    for i in range(inputs):
        calls = []  # each step call's scores; call k decides position len(prompt) - 1 + k

        def step(feeds, calls=calls):
            next_ids, scores = session.run(None, feeds)
            calls.append(scores.reshape(loop["length"], -1))
            return next_ids

        greedy_loop(step, make_inputs(spec, dims, 1, seed=GATE_SEED + i, full_row=False), **loop)
        for k, scores in enumerate(calls):
            decided = scores[len(loop["prompt_ids"]) - 1 + k]
            best, second = np.sort(decided)[-2:][::-1]
            gaps.append(float((best - second) / np.sqrt(np.mean(decided[decided > -1e8] ** 2))))
    return gaps


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("onnx", help="a simplified step decoder at batch size 1 (blip_cap_step or blip_vqa_tdec_step)")
    ap.add_argument("--graph", default="blip_cap_step", choices=("blip_cap_step", "blip_vqa_tdec_step"))
    ap.add_argument("--arch", default="tiny", choices=("tiny", "base"))
    ap.add_argument("--inputs", type=int, default=4, help="greedy loops (the gate runs 4)")
    args = ap.parse_args()
    gaps = np.array(margins(args.onnx, args.graph, args.arch, args.inputs))
    print(f"{args.graph} ({args.arch}): {gaps.size} decisions over {args.inputs} inputs; gap between the two best "
          f"scores / their RMS: median {np.median(gaps):.3f}, 10th percentile {np.percentile(gaps, 10):.3f}; "
          f"below 0.01: {np.mean(gaps < 0.01):.0%}, below 0.05: {np.mean(gaps < 0.05):.0%}")


if __name__ == "__main__":
    main()

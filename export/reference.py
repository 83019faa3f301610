"""The reference file (`.io.npz`) the simplify stage writes per graph and batch size, and every
backend accepts its artifacts against: sample inputs, the ONNX graph's outputs on them, and for
a step decoder the tokens of the whole greedy loop."""
from __future__ import annotations


def write_io(path, inputs: dict, outputs: dict, loop: dict) -> None:
    import numpy as np

    np.savez(path, **{f"input:{k}": v for k, v in inputs.items()}, **{f"output:{k}": v for k, v in outputs.items()},
             **{f"loop:{k}": v for k, v in loop.items()})


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

"""A step decoder's greedy loop on the TPU-MLIR cmodel, in one process (one model_runner call per
step would pay its start-up each time). Runs in the toolchain's Python:

    python cmodel_loop.py MODEL.bmodel INPUTS.npz SETTINGS_JSON OUT.npz

INPUTS holds the step graph's inputs (the ids input is ignored: the loop makes its own);
SETTINGS_JSON is export.decoding.loop_settings; OUT gets `ids`, the tokens of the whole loop.
"""
import json
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# compile/tpu_mlir.py would shadow the toolchain's tpu_mlir package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

if "TPUC_ROOT" not in os.environ:
    import tpu_mlir  # noqa: F401  sets PATH, PYTHONPATH and LD_LIBRARY_PATH for its runtime
    os.execve(sys.executable, [sys.executable, *sys.argv], os.environ)  # the loader needs them at start

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(_HERE))
from export.decoding import greedy_loop  # noqa: E402
from tools.model_runner import model_inference  # noqa: E402


def main(bmodel: str, inputs: str, settings: str, out: str) -> None:
    with np.load(inputs) as z:
        feeds = {k: z[k] for k in z.files}
    calls = []

    def step(f):
        calls.append(1)
        return next(iter(model_inference(f, bmodel, dump_all=False).values()))

    ids = greedy_loop(step, feeds, **json.loads(settings))
    np.savez(out, ids=ids)
    print(f"cmodel loop: {len(calls)} step calls, ids {ids.tolist()}")


if __name__ == "__main__":
    main(*sys.argv[1:])

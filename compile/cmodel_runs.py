"""A graph's bmodel on the TPU-MLIR cmodel over several samples, loaded once (model_runner's
model_inference loads the bmodel and the chip's kernels again on every call, which a greedy loop
over many samples would pay hundreds of times). Runs in the toolchain's Python:

    python cmodel_runs.py MODEL.bmodel SAMPLES.npz SETTINGS_JSON LOOPS OUT.npz

SAMPLES holds `<i>/<input name>` per sample i. OUT gets `<i>/<k>`, the bmodel's k-th output on
sample i, and, when SETTINGS_JSON (export.decoding.loop_settings) is not `null`, `<i>/loop` for
the first LOOPS samples: the token ids of the step decoder's whole greedy loop from that sample.

    python cmodel_runs.py --task BUNDLE.bmodel RAW.npz CHAIN_JSON SETTINGS_JSON OUT.npz

runs a whole task from a file holding its nets (export.decoding.task_loop): RAW holds
`<i>/<kind>` (image, text_ids, text_mask) per sample i; OUT gets `<i>/loop`.
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
from export.decoding import greedy_loop, task_loop  # noqa: E402
from export.samples import unpack  # noqa: E402
from tools import model_runner  # noqa: E402


class LoadedBmodel:
    """One net of the bmodel (its first, or `net` by name) on the cmodel, called like
    model_inference: inputs by name in, the outputs (float, dequantized as model_inference does)
    in the net's order out."""

    def __init__(self, path: str, net: str | None = None):
        import importlib

        from filelock import FileLock

        chip = model_runner.get_chip_from_model(path)
        rvti = model_runner.get_kernel_mode_from_model(path) == "1"
        with FileLock("/tmp/cmodel_so.lock"):  # the lock model_runner holds while it relinks the cmodel
            model_runner.link_cmodel_so(chip, rvti)
            model_runner.link_custom_so(chip)
            model_runner.link_bmlib_so(chip)
            runtime = importlib.import_module("pyruntime_bm")
            model_runner.bind_cmodel_so(chip, rvti)
        self.model = runtime.Model(path, 0, "")
        self.net = self.model.Net(net or self.model.networks[0])

    def __call__(self, feeds: dict) -> list:
        shapes = []
        for i in self.net.inputs:
            x = np.asarray(feeds[i.name])
            shapes.append(list(x.shape) if x.size < i.data.size else list(i.data.shape))
            i.data.reshape(-1)[:x.size] = model_runner.lowering(x, pdtype=i.dtype, pshape=x.shape,
                                                                 pzero_point=i.qzero_point, pscale=i.qscale).flatten()
        produced = []
        for i, shape in zip(self.net.outputs, self.net.forward_dynamic(shapes), strict=True):
            if i.data.dtype in (np.int8, np.uint8) and i.qscale != 0:
                value = (i.data.astype(np.float32) - i.qzero_point) * np.float32(i.qscale)
            elif i.dtype == "bf16":
                value = model_runner.bf16_to_fp32(i.data)
            elif i.dtype in ("u16", "f16"):
                value = i.data.astype(np.float32)
            else:
                value = np.array(i.data)
            produced.append(np.array(value).reshape(-1)[:int(np.prod(shape))].reshape(shape))
        return produced


def main(bmodel: str, samples: str, settings: str, loops: str, out: str) -> None:
    loop = json.loads(settings)
    with np.load(samples) as z:
        feeds = unpack(z)
    net = LoadedBmodel(bmodel)
    results, calls = {}, 0

    def run(f):
        nonlocal calls
        calls += 1
        return net(f)

    for index, sample in enumerate(feeds):
        results.update({f"{index}/{k}": v for k, v in enumerate(run(sample))})
        if loop and index < int(loops):
            results[f"{index}/loop"] = greedy_loop(lambda f: run(f)[0], sample, **loop)
    np.savez(out, **{k: np.asarray(v) for k, v in results.items()})
    print(f"cmodel: {len(feeds)} samples, {calls} bmodel calls")


def main_task(bundle: str, raw: str, chain: str, settings: str, out: str) -> None:
    chain_ = json.loads(chain)
    nets = {g["name"]: LoadedBmodel(bundle, g["name"]) for g in chain_}
    names = {g["name"]: g["outputs"] for g in chain_}
    with np.load(raw) as z:
        samples = unpack(z)

    def call(graph, feeds):
        return dict(zip(names[graph], nets[graph](feeds), strict=True))

    ids = {f"{i}/loop": task_loop(call, sample, chain_, json.loads(settings)) for i, sample in enumerate(samples)}
    np.savez(out, **ids)
    print(f"cmodel task: {len(ids)} samples through {', '.join(nets)}")


if __name__ == "__main__":
    if sys.argv[1] == "--task":
        main_task(*sys.argv[2:])
    else:
        main(*sys.argv[1:])

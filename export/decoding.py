"""The greedy loop a runtime runs around a step decoder (`GraphSpec.decoding`), numpy only.

The same function drives ONNX Runtime in the export and simplify gates and the bmodel on the
TPU-MLIR cmodel (compile/cmodel_runs.py runs it inside the toolchain's Python), so every
runtime is held to the same loop that is proven equal to transformers' generate().
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np

from export.presets import PAD_ID, SEP_ID


def greedy_loop(step: Callable[[dict], np.ndarray], feeds: dict, ids_name: str, prompt_ids, length: int) -> np.ndarray:
    """Token ids [B, length]: the prompt, then one step call per new token; PAD after EOS.

    `step(feeds)` returns next_ids [B, length], where next_ids[:, t] follows ids[:, :t+1]."""
    import numpy as np  # here, not at the top: the plan imports loop_settings, and numpy costs ~40 ms

    batch = next(v for k, v in feeds.items() if k != ids_name).shape[0]
    ids = np.full((batch, length), PAD_ID, dtype=np.int64)
    ids[:, : len(prompt_ids)] = prompt_ids
    done = np.zeros(batch, dtype=bool)
    for t in range(len(prompt_ids) - 1, length - 1):
        if done.all():  # the rest is PAD already: no need to pay for the calls
            break
        nxt = np.asarray(step({**feeds, ids_name: ids.copy()})).reshape(batch, length)[:, t].astype(np.int64)
        nxt = np.where(done, PAD_ID, nxt)
        done |= nxt == SEP_ID
        ids[:, t + 1] = nxt
    return ids


def loop_settings(spec, dims: dict) -> dict:
    """What greedy_loop needs besides the step function, as plain data (JSON for subprocesses)."""
    d = dims[spec.decoding]
    return {"ids_name": spec.inputs[-1].name, "prompt_ids": list(d["prompt_ids"]), "length": d["max_length"]}


def task_loop(call: Callable[[str, dict], dict], raw: dict, chain: list[dict], loop: dict) -> np.ndarray:
    """A whole task as a runtime runs it: each graph of `chain` in order on the sample's data
    (`raw`: by input kind, "image", "text_ids", "text_mask") and the features earlier graphs made,
    the last one a step decoder looped greedily. `chain`: [{"name", "inputs": [[name, kind]],
    "outputs": [names]}]; `call(graph, feeds)` returns that graph's outputs by name."""
    features: dict = {}

    def feeds_of(graph: dict) -> dict:
        return {name: raw[kind] if kind in raw else features[name] for name, kind in graph["inputs"]
                if kind != "decoder_ids"}

    for graph in chain[:-1]:
        features.update(call(graph["name"], feeds_of(graph)))
    decoder = chain[-1]
    return greedy_loop(lambda f: call(decoder["name"], f)[decoder["outputs"][0]], feeds_of(decoder), **loop)

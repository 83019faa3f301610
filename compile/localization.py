"""Where a reduced-precision artifact parts from its float model, and which layers to keep in
float: shared by every backend, which supplies per-tensor figures in graph order (ONNX Runtime:
compile/ort_precision.py; TPU-MLIR: its TPU dialect against the top MLIR).

Each entry names a layer (`node`), its op type, the tensor it produces, the tensors it reads
(`inputs`), the layers to keep in float with it (`consumers`), and the figures of the reduced
tensor against the float one under the precision's rule (acceptance.ACCEPT): cosine, largest
error relative to the reference's largest magnitude, and severity (the larger of (1 - cosine) /
(1 - min cosine) and relative error / max relative error; above 1 misses the rule).

The mixed-precision search ranks the activations by severity, keeps the k worst in float and
bisects k between 1 and what the budget allows; then it tries dropping kept ones, least severe
first, in halving groups, keeping every drop that still passes. Its cost: about log2(budget) + 1
tries to find k, and at most PRUNE_TRIES to prune (with one kept tensor or a few, every single
drop is tried: the set is then irreducible).
"""
from __future__ import annotations

import numpy as np

from buildplan.core import GateError
from compile.acceptance import ACCEPT

PRUNE_TRIES = 24  # tries spent dropping unneeded float layers after the bisection
# The magnitude of an additive mask: BERT's -10000 on padded positions, the step decoders' -1e9 on
# blocked tokens. An INT8 scale that spans it has steps of 40-80 or more: the signal added to it is
# lost, so every backend keeps the tensors that reach it, and the ops reading them, in float.
MASK_MAGNITUDE = 1e4


def input_match(precision: str) -> float:
    """How close an input must be for the error to start at its consumer: a fifth of the
    precision's allowed 1 - cosine (INT8: 0.99)."""
    return 1.0 - (1.0 - ACCEPT[precision][0]) / 5


def tensor_figures(ref: np.ndarray, got: np.ndarray, precision: str) -> dict:
    r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cosine = float(r @ g / denom) if denom > 0 else float(np.allclose(r, g))
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    rel = float(np.max(np.abs(r - g)) / scale) if scale > 0 else float(np.max(np.abs(g), initial=0.0) > 0)
    min_cos, max_rel = ACCEPT[precision]
    return {"cosine": cosine, "rel_max_abs": rel,
            "severity": max((1.0 - cosine) / (1.0 - min_cos), rel / max_rel)}


def findings(entries: list[dict], precision: str, graph_inputs=()) -> dict:
    """The first activation off (severity > 1), whether its error starts there, and the worst."""
    by_tensor = {e["tensor"]: e for e in entries}
    match = input_match(precision)
    out = {"compared": len(entries), "input_match": match}
    first = next((e for e in entries if e["severity"] > 1.0), None)
    if first is not None:
        inputs = {i: by_tensor[i]["cosine"] for i in first["inputs"] if i in by_tensor}
        inputs.update({i: 1.0 for i in first["inputs"] if i in graph_inputs})
        out["first_off"] = {**_short(first), "inputs": inputs,
                            "starts_here": all(c >= match for c in inputs.values())}
    if entries:
        out["worst"] = _short(max(entries, key=lambda e: e["severity"]))
    return out


def _short(e: dict) -> dict:
    return {k: e[k] for k in ("node", "op", "tensor", "cosine", "rel_max_abs", "severity")}


def describe(found: dict, precision: str) -> str:
    """One line for a failure message, the console and the dashboard."""
    first = found.get("first_off")
    if first is None:
        return f"every intermediate tensor meets the {precision} rule; only the outputs miss it"
    worst_input = min(first["inputs"].values(), default=1.0)
    where = (f"its inputs still match (cosine >= {found['input_match']:.3g}): the error starts there"
             if first["starts_here"] else
             f"its inputs already differ (cosine {worst_input:.4f}): the error accumulated before it")
    text = (f"first layer off in {precision}: {first['node']} ({first['op']}), cosine {first['cosine']:.4f}, "
            f"relative max error {first['rel_max_abs']:.3f}; {where}")
    worst = found.get("worst")
    if worst and worst["node"] != first["node"]:
        text += (f"; worst: {worst['node']} ({worst['op']}), cosine {worst['cosine']:.4f}, "
                 f"relative max error {worst['rel_max_abs']:.3f}")
    return text


def float_nodes(entries: list[dict]) -> list[str]:
    """The nodes to exclude from quantization so that these activations stay float."""
    nodes: list[str] = []
    for e in entries:
        nodes += [n for n in [e["node"], *e["consumers"]] if n and n not in nodes]
    return nodes


def search_float_layers(entries: list[dict], passes, budget: int, log, prune_tries: int = PRUNE_TRIES) -> dict:
    """The fewest activations (and so nodes) to keep in float for `passes(nodes)` to be true,
    within `budget` nodes. `entries`: the figures of the pure precision that failed."""
    ranked = sorted((e for e in entries if e["severity"] > 0.0), key=lambda e: -e["severity"])
    most = 0
    while most < len(ranked) and len(float_nodes(ranked[:most + 1])) <= budget:
        most += 1
    tries = 0

    def tried(k: int) -> bool:
        nonlocal tries
        tries += 1
        ok = passes(float_nodes(ranked[:k]))
        log(f"mixed precision: the {k} worst activations in float ({len(float_nodes(ranked[:k]))} nodes): "
            f"{'passes' if ok else 'misses'}")
        return ok

    if most == 0 or not tried(most):
        raise GateError(f"mixed precision: even the {most} worst activations in float "
                        f"({len(float_nodes(ranked[:most]))} of a budget of {budget} nodes) do not make it pass; "
                        f"worst: {ranked[0]['node'] if ranked else '-'}. Raise max_float_layers or keep F32")
    low, high = 0, most  # low fails (k=0 is the pure quantization), high passes
    while high - low > 1:
        mid = (low + high) // 2
        if tried(mid):
            high = mid
        else:
            low = mid
    kept = ranked[:high]
    # With the others in float some may be unneeded: try dropping them, least severe first, in
    # halving groups (one try can drop many), within PRUNE_TRIES quantizations.
    size, pruning = max(1, len(kept) // 2), 0
    while size >= 1 and pruning < prune_tries and len(kept) > 1:
        start = len(kept)
        while start > 0 and pruning < prune_tries:
            group = kept[max(0, start - size):start]
            trial = [k for k in kept if all(k is not g for g in group)]
            start -= size
            if not trial:
                continue
            pruning += 1
            tries += 1
            if passes(float_nodes(trial)):
                log(f"mixed precision: {len(group)} activations need not stay float ({group[0]['node']} ...)")
                kept = trial
        size //= 2
    return {"float_layers": float_nodes(kept), "tensors": [e["tensor"] for e in kept], "tries": tries}

"""Numeric comparison of a candidate's outputs with a reference: the gate of every stage."""
from __future__ import annotations

import numpy as np

from buildplan.core import GateError


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], atol: float,
            discrete: bool = False) -> dict:
    """Max-abs error and cosine per output. Discrete outputs (token ids) must match exactly."""
    figures = {}
    for name, ref in reference.items():
        if name not in candidate:
            raise GateError(f"output {name!r} missing (got {sorted(candidate)})")
        got = np.asarray(candidate[name])
        if got.shape != ref.shape:
            raise GateError(f"output {name!r}: shape {list(got.shape)} != reference {list(ref.shape)}")
        r, g = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
        max_abs = float(np.max(np.abs(r - g))) if r.size else 0.0
        denom = np.linalg.norm(r) * np.linalg.norm(g)
        cosine = float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))
        fig = {"max_abs": max_abs, "cosine": cosine}
        if discrete:
            fig["match"] = float(np.mean(r == g)) if r.size else 1.0
        figures[name] = fig
        ok = fig["match"] == 1.0 if discrete else max_abs <= atol
        if not ok:
            what = f"token match {fig['match']:.4f} (must be 1)" if discrete else f"max-abs error {max_abs:.3g} > {atol:g}"
            raise GateError(f"output {name!r}: {what}, cosine {cosine:.6f}")
    return figures


def worst(figures: dict) -> dict:
    """One summary over all outputs of a gate: the largest error and the smallest cosine."""
    out = {"max_abs": max(f["max_abs"] for f in figures.values()),
           "cosine": min(f["cosine"] for f in figures.values())}
    for key, pick in (("rel_max_abs", max), ("match", min)):
        if all(key in f for f in figures.values()):
            out[key] = pick(f[key] for f in figures.values())
    return out

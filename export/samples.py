"""Deterministic sample inputs for a graph spec (numpy only; the compile stages use them too)."""
from __future__ import annotations

import numpy as np

from export.presets import CLS_ID, PAD_ID, SEP_ID
from export.specs import GraphSpec


def make_inputs(spec: GraphSpec, dims: dict, batch: int, seed: int = 0, full_row: bool = True) -> dict[str, np.ndarray]:
    """One batch of plausible inputs. Text lengths vary per row so padding is exercised; with
    `full_row`, the first row fills the whole window (a reference sample covers both). Without
    it every row is as long as it happens to be, as real text is: what calibration and the
    decoder gates need, or at batch size 1 no sample would ever be padded (an INT8 table would
    then hold the attention mask's range as 0 and clip every padded position's -10000 to it)."""
    rng = np.random.default_rng([seed, batch, sum(map(ord, spec.name))])
    shapes = spec.shapes(dims, batch)
    lengths = None
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = shapes[t.name]
        if t.sample == "image":
            # ImageNet-normalised pixels of a random image span roughly [-2.1, 2.6].
            out[t.name] = rng.uniform(-1.8, 2.2, size=shape).astype(np.float32)
        elif t.sample in ("text_ids", "text_mask"):
            if lengths is None:
                lengths = rng.integers(max(3, shape[1] // 3), shape[1] + 1, size=shape[0])
                if full_row:
                    lengths[0] = shape[1]
            if t.sample == "text_ids":
                ids = rng.integers(1000, 30000, size=shape, dtype=np.int64)
                ids[:, 0] = CLS_ID
                for row, n in enumerate(lengths):
                    ids[row, n - 1] = SEP_ID
                    ids[row, n:] = PAD_ID
                out[t.name] = ids
            else:
                out[t.name] = (np.arange(shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        elif t.sample == "decoder_ids":
            # the decoding prompt, then plausible tokens: every position's next token is checked
            prompt = dims[spec.decoding]["prompt_ids"]
            ids = rng.integers(1000, 30000, size=shape, dtype=np.int64)
            ids[:, : len(prompt)] = prompt
            out[t.name] = ids
        else:
            out[t.name] = rng.standard_normal(size=shape).astype(np.float32)
    return out


def pack(samples) -> dict:
    """Several samples in one .npz (what a subprocess or another stage reads): `<i>/<name>` holds
    sample i's array `name`."""
    return {f"{i}/{name}": value for i, sample in enumerate(samples) for name, value in sample.items()}


def unpack(npz) -> list[dict]:
    """pack's samples, in order, from an open .npz."""
    samples: dict[int, dict] = {}
    for key in npz.files:
        index, name = key.split("/", 1)
        samples.setdefault(int(index), {})[name] = npz[key]
    return [samples[i] for i in sorted(samples)]

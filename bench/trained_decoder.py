"""A tiny captioning checkpoint whose decoder has been trained, in BLIP's key layout: for measuring
the token gates on a decoder whose choices are not near ties (docs/precision.md).

    .venv/bin/python bench/trained_decoder.py OUT.pth [--seed 1] [--steps 400]

Starts from the synthetic tiny checkpoint (`checkpoint: {synthetic: tiny, seed: 1}`) and trains
the whole model with BLIP's captioning loss (the prompt "a picture of " masked out, label
smoothing 0.1 as in transformers' BLIP) on synthetic pairs: random images, each with a caption
of 6 to 12 words drawn from 300 word ids. A few minutes on 2 cores. Synthetic random weights
give nearly flat logits (bench/logit_margins.py); trained ones are peaked, as a released
checkpoint's are. The result is not a captioner: it only has a trained decoder's confidence.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pairs(count: int, dims: dict, seed: int):
    """Images [count, 3, H, W] and token ids / attention masks / labels [count, max_length]."""
    import numpy as np
    import torch

    from export.presets import PAD_ID, SEP_ID

    rng = np.random.default_rng(seed)
    size, loop = dims["image_size"], dims["caption"]
    images = rng.uniform(-1.8, 2.2, size=(count, 3, size, size)).astype(np.float32)
    words = rng.choice(np.arange(2000, 8000), size=300, replace=False)
    prompt = list(loop["prompt_ids"])
    ids = np.full((count, loop["max_length"]), PAD_ID, dtype=np.int64)
    for row in range(count):
        caption = rng.choice(words, size=int(rng.integers(6, 13))).tolist()
        text = (prompt + caption + [SEP_ID])[:loop["max_length"]]
        ids[row, :len(text)] = text
    mask = (ids != PAD_ID).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    labels[:, :len(prompt)] = -100  # BLIP trains the caption, not its prompt
    return [torch.from_numpy(a) for a in (images, ids, mask, labels)]


def train(seed: int, steps: int, count: int = 64, batch: int = 16):
    import torch

    from export.loading import load_model, original_to_hf
    from export.presets import resolve_dims
    from export.synthetic import save, synthetic_state_dict

    dims = resolve_dims("tiny", "captioning")
    state = synthetic_state_dict("captioning", "tiny", seed)
    with tempfile.TemporaryDirectory() as tmp:
        save(state, Path(tmp) / "start.pth")
        model, _ = load_model(str(Path(tmp) / "start.pth"), "pth", "captioning", dims)
    images, ids, mask, labels = pairs(count, dims, seed)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        rows = torch.randint(0, count, (batch,))
        loss = model(pixel_values=images[rows], input_ids=ids[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    trained = model.state_dict()
    for key in state:  # the synthetic file's own keys and layout, with the trained values
        if original_to_hf(key) in trained:
            state[key] = trained[original_to_hf(key)].detach().clone()
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    return state


def main() -> None:
    from export.synthetic import save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    started = time.monotonic()
    save(train(args.seed, args.steps), args.out)
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

"""A tiny captioning checkpoint whose decoder has been trained, in BLIP's key layout, and the
images, captions and tokenizer it was trained on: for measuring the token gates on a decoder
whose choices are not near ties (docs/precision.md).

    .venv/bin/python bench/trained_decoder.py OUT.pth DATA_DIR [--seed 1] [--steps 400]

Writes DATA_DIR/images (32 small PNGs), DATA_DIR/captions.txt (one caption per image, in file
order) and DATA_DIR/tokenizer/vocab.txt (BERT's special and prompt ids, 40 caption words), so a
models.yaml can declare `calibration: {images, texts, tokenizer}` and the agreement gates run on
these pairs, made as BLIP makes its inputs. Starts from the synthetic tiny checkpoint
(`{synthetic: tiny, seed: 1}`) and trains the whole model with BLIP's captioning loss (the
prompt "a picture of " masked out) on the same preprocessing: a minute or two on 2 cores. The
result is not a captioner; it has a trained decoder's confidence on its data, which random
weights lack (bench/logit_margins.py).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


WORDS = ["red", "blue", "green", "yellow", "black", "white", "dog", "cat", "bird", "horse", "car", "boat", "man",
         "woman", "child", "sitting", "standing", "running", "lying", "flying", "on", "in", "near", "under", "the",
         "grass", "water", "road", "beach", "snow", "table", "bed", "with", "and", "two", "small", "large", "old",
         "young", "field"]


def write_data(folder: Path, seed: int, count: int = 32) -> None:
    """Images, one caption per image (in the images' sorted order) and a BERT-like vocab.txt whose
    ids match BLIP's prompt ("a picture of ": 1037 3861 1997) and special tokens."""
    import numpy as np
    from PIL import Image

    from export.presets import CAPTION_PROMPT_IDS, CLS_ID, PAD_ID, SEP_ID

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(count):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # a coarse colour pattern per image
        Image.fromarray(np.kron(blocks, np.ones((24, 24, 1), dtype=np.uint8))).save(folder / f"images/{i:03d}.png")
        captions.append(" ".join(rng.choice(WORDS, size=int(rng.integers(4, 10)))))
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    vocab = [f"[unused{i}]" for i in range(30522)]
    named = {PAD_ID: "[PAD]", 100: "[UNK]", CLS_ID: "[CLS]", SEP_ID: "[SEP]", 103: "[MASK]",
             **dict(zip(CAPTION_PROMPT_IDS[1:], ("a", "picture", "of"), strict=True)),
             **{2000 + k: w for k, w in enumerate(WORDS)}}
    for index, token in named.items():
        vocab[index] = token
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer/vocab.txt").write_text("\n".join(vocab) + "\n")


def pairs(folder: Path, dims: dict):
    """Pixels [n, 3, H, W] as BLIP preprocesses them, and token ids / attention masks / labels
    [n, max_length] as the calibration samples write a caption: prompt, caption, [SEP]."""
    import numpy as np
    import torch
    from transformers import BertTokenizer

    from export.calibration_set import pixels
    from export.datasets import image_files, read_texts

    files, texts = image_files(str(folder / "images")), read_texts(str(folder / "captions.txt"))
    tokenizer = BertTokenizer.from_pretrained(str(folder / "tokenizer"))
    loop = dims["caption"]
    prompt = list(loop["prompt_ids"])
    ids = np.full((len(files), loop["max_length"]), tokenizer.pad_token_id, dtype=np.int64)
    for row, (text, _) in enumerate(texts[:len(files)]):
        tokens = (prompt + tokenizer.encode(text, add_special_tokens=False) + [tokenizer.sep_token_id])[:loop["max_length"]]
        ids[row, :len(tokens)] = tokens
    mask = (ids != tokenizer.pad_token_id).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    labels[:, :len(prompt)] = -100  # BLIP trains the caption, not its prompt
    return [torch.from_numpy(a) for a in (pixels(list(files), dims["image_size"]), ids, mask, labels)]


def train(folder: Path, seed: int, steps: int, batch: int = 16):
    import torch

    from export.loading import load_model, original_to_hf
    from export.presets import resolve_dims
    from export.synthetic import save, synthetic_state_dict

    dims = resolve_dims("tiny", "captioning")
    state = synthetic_state_dict("captioning", "tiny", seed)
    with tempfile.TemporaryDirectory() as tmp:
        save(state, Path(tmp) / "start.pth")
        model, _ = load_model(str(Path(tmp) / "start.pth"), "pth", "captioning", dims)
    images, ids, mask, labels = pairs(folder, dims)
    count = len(ids)
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
    ap.add_argument("data", help="a folder for the images, captions and tokenizer (written when absent)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    started = time.monotonic()
    data = Path(args.data)
    if not (data / "captions.txt").exists():
        write_data(data, args.seed)
    save(train(data, args.seed, args.steps), args.out)
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

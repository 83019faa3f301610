"""A tiny BLIP checkpoint (captioning or VQA) whose decoder has been trained, in BLIP's key layout,
and the images, texts and tokenizer it was trained on: for measuring the token gates on a decoder
whose choices are not near ties (docs/precision.md).

    .venv/bin/python bench/trained_decoder.py OUT.pth DATA_DIR [--task captioning|vqa] [--steps 400]

Writes DATA_DIR/images (32 small PNGs), DATA_DIR/captions.txt (one caption per image, in file
order), DATA_DIR/questions.txt (`question<TAB>answer` per image) and DATA_DIR/tokenizer/vocab.txt
(BERT's special and prompt ids, 40 words), so a models.yaml can declare `calibration: {images,
texts, tokenizer}` and the agreement gates run on these pairs, made as BLIP makes its inputs.
Starts from the synthetic tiny checkpoint of the task (`{synthetic: tiny, seed}`) and trains the
whole model with BLIP's loss (captioning: the prompt "a picture of " masked out; VQA: the answer
after [DEC], the question with [ENC] in place of [CLS]) on the same preprocessing: a minute or two
on 2 cores. The result is not a captioner; it has a trained decoder's confidence on its data,
which random weights lack (bench/logit_margins.py).
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
    captions, questions = [], []
    for i in range(count):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # a coarse colour pattern per image
        Image.fromarray(np.kron(blocks, np.ones((24, 24, 1), dtype=np.uint8))).save(folder / f"images/{i:03d}.png")
        captions.append(" ".join(rng.choice(WORDS, size=int(rng.integers(4, 10)))))
        question, answer = (" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers((4, 1), (9, 3)))
        questions.append(f"{question}\t{answer}")
    (folder / "captions.txt").write_text("\n".join(captions) + "\n")
    (folder / "questions.txt").write_text("\n".join(questions) + "\n")
    vocab = [f"[unused{i}]" for i in range(30522)]
    named = {PAD_ID: "[PAD]", 100: "[UNK]", CLS_ID: "[CLS]", SEP_ID: "[SEP]", 103: "[MASK]",
             **dict(zip(CAPTION_PROMPT_IDS[1:], ("a", "picture", "of"), strict=True)),
             **{2000 + k: w for k, w in enumerate(WORDS)}}
    for index, token in named.items():
        vocab[index] = token
    (folder / "tokenizer").mkdir(exist_ok=True)
    (folder / "tokenizer/vocab.txt").write_text("\n".join(vocab) + "\n")


def batches(folder: Path, task: str, dims: dict) -> dict:
    """The training set as the model's keyword arguments, [n, ...] each: pixels as BLIP preprocesses
    them, and the text as the calibration samples write it. Captioning: prompt, caption, [SEP];
    VQA: the question ([ENC] for [CLS], padded to the text length) and [DEC], answer, [SEP]."""
    import numpy as np
    import torch
    from transformers import BertTokenizer

    from export.calibration_set import decoder_ids, pixels
    from export.datasets import image_files, read_texts
    from export.presets import ENC_ID

    files = image_files(str(folder / "images"))
    texts = read_texts(str(folder / ("captions.txt" if task == "captioning" else "questions.txt")))[:len(files)]
    tokenizer = BertTokenizer.from_pretrained(str(folder / "tokenizer"))
    decoding = dims["caption" if task == "captioning" else "vqa_answer"]
    ids = decoder_ids(decoding, tokenizer, [text if task == "captioning" else answer for text, answer in texts])
    mask = (ids != tokenizer.pad_token_id).astype(np.int64)
    labels = np.where(mask == 1, ids, -100)
    labels[:, :len(decoding["prompt_ids"])] = -100  # the prompt is given, not learnt
    data = {"pixel_values": pixels(list(files), dims["image_size"])}
    if task == "captioning":
        data.update(input_ids=ids, attention_mask=mask, labels=labels)
    else:
        question = tokenizer([t for t, _ in texts], padding="max_length", truncation=True, max_length=dims["text_len"])
        data.update(input_ids=np.asarray(question["input_ids"]), attention_mask=np.asarray(question["attention_mask"]),
                    decoder_input_ids=ids, decoder_attention_mask=mask, labels=labels)
        data["input_ids"][:, 0] = ENC_ID  # as BLIP's VQA model and the exported question encoder do
    return {k: torch.from_numpy(np.asarray(v)) for k, v in data.items()}


def train(folder: Path, task: str, seed: int, steps: int, batch: int = 16):
    import torch

    from export.loading import load_model, original_to_hf
    from export.presets import resolve_dims
    from export.synthetic import save, synthetic_state_dict

    dims = resolve_dims("tiny", task)
    state = synthetic_state_dict(task, "tiny", seed)
    with tempfile.TemporaryDirectory() as tmp:
        save(state, Path(tmp) / "start.pth")
        model, _ = load_model(str(Path(tmp) / "start.pth"), "pth", task, dims)
    data = batches(folder, task, dims)
    count = len(data["labels"])
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        rows = torch.randint(0, count, (batch,))
        loss = model(**{k: v[rows] for k, v in data.items()}).loss
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
    ap.add_argument("--task", default="captioning", choices=("captioning", "vqa"))
    ap.add_argument("--seed", type=int, default=None, help="the synthetic checkpoint's (default: models.full.yaml's, "
                    "captioning 1, vqa 2)")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    started = time.monotonic()
    seed = args.seed if args.seed is not None else {"captioning": 1, "vqa": 2}[args.task]
    data = Path(args.data)
    if not (data / "questions.txt").exists():
        write_data(data, seed)
    save(train(data, args.task, seed, args.steps), args.out)
    print(f"wrote {args.out} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()

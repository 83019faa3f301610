"""Stage `calibration_set`: calibration samples made from real data, per (graph, batch size).

A model's `calibration: {images: DIR, texts: FILE}` gives a folder of images and a text file
with one caption (retrieval, captioning) or question (VQA; `question<TAB>answer` also feeds the
answer decoder) per line. Each sample is what the graph's inputs would be in BLIP's own
pipeline:
- pixels: RGB, resized to the model's image size with bicubic interpolation and normalized with
  BLIP's mean and std (its `transform_test`: Resize, ToTensor, Normalize);
- text ids and masks: BERT's WordPiece tokenizer (`tokenizer:` or the checkpoint's folder),
  padded to the graph's text length;
- decoder ids: the decoding prompt, then the caption's or answer's tokens, [SEP], padding;
- features another graph computes (image_embeds, image_feat, question_states): that graph's
  simplified F32 ONNX run on the sample's own pixels and text, so every graph of a task is
  calibrated on what it will really see.
The samples depend only on the data, the graph and the batch size: every chip, precision and
backend calibrates on the same file.
"""
from __future__ import annotations

from buildplan.core import PYTHON, Node, StageError
from export.datasets import image_files, read_texts
from export.specs import GRAPHS, producer_of, producers

STAGE_DOCS = {"calibration_set": "calibration samples from images and texts"}
MEMORY_MB = {"calibration_set": {"tiny": 600, "base": 6000}}  # the producing graphs' ORT sessions; base a guess
# BLIP's image normalization (its transform_test; the CLIP statistics)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def path(model: str, graph: str, batch: int) -> str:
    return f"{model}/calibration/{graph}_{batch}b.npz"


def declare(plan, model, dims: dict, exported):
    """The last export stage: with `calibration.images`, the backends' calibration asks for
    samples made from them (declared per graph and batch size as asked)."""
    if model.calibration.get("images"):
        exported.calibration_source = lambda graph, batch: declare_samples(plan, exported, graph, batch)
    return exported


def declare_samples(plan, exported, graph: str, batch: int) -> str:
    """The node that makes `graph`'s calibration samples at `batch` from the model's images and
    texts, with the simplified graphs that compute its feature inputs as dependencies."""
    model, cal = exported.model, exported.model.calibration
    upstream = {name: exported.fixed(name, batch) for name in producers(graph)}
    images = image_files(cal["images"])
    vocab = f"{cal['tokenizer']}/vocab.txt"
    return plan.add(Node(
        id=f"calibration_set:{model.name}.{graph}.{batch}b", stage="calibration_set", model=model.name,
        outputs={"calibration_set": path(model.name, graph, batch)}, action="export.calibration_set:run",
        toolchain=PYTHON, deps=tuple(upstream.values()), sources=(*images, cal["texts"], vocab),
        params={"graph": graph, "batch": batch, "samples": cal["samples"], "dims": exported.dims,
                "images": list(images), "texts": cal["texts"], "vocab": vocab,
                "producers": {name: plan.nodes[node].outputs["onnx"] for name, node in upstream.items()}},
        labels={"graph": graph, "batch": batch}), f"export:{model.name}").id


def pixels(files: list[str], size: int):
    """BLIP's test-time image transform, as a [B, 3, size, size] float32 batch."""
    import numpy as np
    from PIL import Image

    batch = []
    for f in files:
        with Image.open(f) as im:
            rgb = im.convert("RGB").resize((size, size), Image.BICUBIC)
        x = np.asarray(rgb, dtype=np.float32) / 255.0
        batch.append(((x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def run(node: Node, ctx) -> dict:
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort
    from transformers import BertTokenizer

    from export.samples import pack

    p = node.params
    spec, dims, bs = GRAPHS[p["graph"]], p["dims"], p["batch"]
    texts = read_texts(p["texts"])
    if not texts or not p["images"]:
        raise StageError(f"calibration needs images and lines of text: {len(p['images'])} images, {len(texts)} lines")
    tokenizer = BertTokenizer.from_pretrained(str(Path(p["vocab"]).parent))  # its vocab.txt, lower-cased as BLIP's
    sessions = {name: ort.InferenceSession(str(ctx.path(onnx)), providers=["CPUExecutionProvider"])
                for name, onnx in p["producers"].items()}
    shapes = spec.shapes(dims, bs)
    samples = []
    for i in range(p["samples"]):
        rows = [(i * bs + j) for j in range(bs)]
        image_batch = pixels([p["images"][r % len(p["images"])] for r in rows], dims["image_size"])
        lines = [texts[r % len(texts)] for r in rows]
        raw = {"image": image_batch}
        encoded = tokenizer([t for t, _ in lines], padding="max_length", truncation=True, max_length=dims["text_len"])
        raw["text_ids"] = np.asarray(encoded["input_ids"], dtype=np.int64)
        raw["text_mask"] = np.asarray(encoded["attention_mask"], dtype=np.int64)
        feeds = _feeds(spec, raw, sessions, dims, tokenizer, lines)
        for name, value in feeds.items():
            if list(value.shape) != shapes[name]:
                raise StageError(f"calibration sample {i}: {name} has shape {list(value.shape)}, {spec.name} wants {shapes[name]}")
        samples.append(feeds)
    np.savez(ctx.tmp("calibration_set"), **pack(samples))
    return {"calibration": {"samples": p["samples"], "images": len(p["images"]), "texts": len(texts),
                            "producers": list(p["producers"])}}


def decoder_ids(decoding: dict, tokenizer, targets: list[str]):
    """[len(targets), max_length] token ids as a decoder reads a caption or answer: the decoding
    prompt, the target's words, [SEP], then padding (cut at max_length)."""
    import numpy as np

    length = decoding["max_length"]
    ids = np.full((len(targets), length), tokenizer.pad_token_id, dtype=np.int64)
    for row, target in enumerate(targets):
        tokens = list(decoding["prompt_ids"]) + tokenizer.encode(target, add_special_tokens=False) + [tokenizer.sep_token_id]
        ids[row, : min(length, len(tokens))] = tokens[:length]
    return ids


def _feeds(spec, raw: dict, sessions: dict, dims: dict, tokenizer, lines) -> dict:
    """One sample's inputs of `spec`, computing feature inputs with their producing graphs."""
    feeds = {}
    for t in spec.inputs:
        if t.sample in ("image", "text_ids", "text_mask"):
            feeds[t.name] = raw[t.sample]
        elif t.sample == "decoder_ids":
            feeds[t.name] = decoder_ids(dims[spec.decoding], tokenizer,
                                        [answer if spec.task == "vqa" else text for text, answer in lines])
        else:  # a feature another graph computes
            source = GRAPHS[producer_of(t.name, spec.task)]
            inputs = _feeds(source, raw, sessions, dims, tokenizer, lines)
            session = sessions[source.name]
            feeds[t.name] = session.run([t.name], {i.name: inputs[i.name] for i in source.inputs})[0]
    return feeds

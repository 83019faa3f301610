"""Architecture presets: the dimensions of each BLIP variant, as plain data.

Kept free of torch so the build plan can derive every tensor shape without loading a model.
`base` is BLIP-base (ViT-B/16 + BERT-base) with the exact settings the original BLIP uses;
`tiny` keeps every structural feature (cross-attention, decoder, vocab, projection) at
sizes that export and compile in seconds.
"""
from __future__ import annotations

# Token ids of bert-base-uncased plus BLIP's two added tokens.
PAD_ID = 0
CLS_ID = 101
SEP_ID = 102
DEC_ID = 30522  # BLIP's [DEC], the decoder's bos token
ENC_ID = 30523  # BLIP's [ENC], replaces [CLS] for image-grounded text encoding (ITM, VQA)
VOCAB_SIZE = 30524
# "a picture of " after BLIP's prompt handling: [DEC] a picture of  (the trailing [SEP] is dropped)
CAPTION_PROMPT_IDS = (DEC_ID, 1037, 3861, 1997)

ARCHS: dict[str, dict] = {
    "tiny": {
        "vision": {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "patch": 16},
        "text": {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "max_positions": 512},
        "image_size": {"retrieval": 64, "captioning": 64, "vqa": 80},
        "text_len": 12,
    },
    "base": {
        "vision": {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072, "patch": 16},
        "text": {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072, "max_positions": 512},
        "image_size": {"retrieval": 384, "captioning": 384, "vqa": 480},
        "text_len": 35,
    },
}

COMMON = {
    "vocab": VOCAB_SIZE,
    "projection": 256,
    "vision_eps": 1e-6,
    "text_eps": 1e-12,
    "caption": {"max_length": 20, "min_length": 5, "prompt_ids": list(CAPTION_PROMPT_IDS)},
    "vqa_answer": {"max_length": 10, "min_length": 1, "prompt_ids": [DEC_ID]},
}

TASKS = ("retrieval", "captioning", "vqa")


def resolve_dims(arch: str, task: str, image_size: int | None = None) -> dict:
    """Every dimension a graph of `task` on `arch` needs, as one flat, JSON-able dict."""
    spec = ARCHS[arch]
    size = image_size or spec["image_size"][task]
    patch = spec["vision"]["patch"]
    return {
        "arch": arch,
        "task": task,
        "image_size": size,
        "patch": patch,
        "tokens": (size // patch) ** 2 + 1,
        "vision": dict(spec["vision"]),
        "text": dict(spec["text"]),
        "text_len": spec["text_len"],
        **{k: (dict(v) if isinstance(v, dict) else v) for k, v in COMMON.items()},
    }

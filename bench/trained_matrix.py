"""models.full.yaml's precision matrix with the decoders trained: the same targets, precisions and
budgets, the captioning and VQA checkpoints replaced by bench/trained_decoder.py's (the tiny
synthetic checkpoint of the same seed, trained on 32 images and texts it writes) and their
agreement gates run on that data (docs/precision.md, "The whole matrix with trained decoders").

    .venv/bin/python bench/trained_matrix.py OUT_DIR            # train (when absent), write OUT_DIR/models.yaml
    .venv/bin/doit config=OUT_DIR/models.yaml nightly           # the coverage, as for models.full.yaml

The retrieval model keeps its random weights: it has no decoder, and its cells pass on them.
"""
import argparse
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

TEXTS = {"captioning": "captions.txt", "vqa": "questions.txt"}


def trained_config(full: dict, out: Path, checkpoints: dict) -> dict:
    """`full` (models.full.yaml as data) with each decoder model's checkpoint and calibration
    replaced; everything else as declared."""
    config = {**full, "artifacts": str(out / "artifacts"), "models": []}
    for model in full["models"]:
        if model["task"] in checkpoints:
            data = out / model["task"]
            model = {**model, "checkpoint": str(checkpoints[model["task"]]), "arch": "tiny",
                     "calibration": {"images": str(data / "images"), "texts": str(data / TEXTS[model["task"]]),
                                     "tokenizer": str(data / "tokenizer"), "samples": 10}}
        config["models"].append(model)
    return config


def main() -> None:
    from export.synthetic import save
    from trained_decoder import train, write_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    full = yaml.safe_load((REPO / "models.full.yaml").read_text())
    checkpoints = {}
    for model in full["models"]:
        task = model["task"]
        if task not in TEXTS:
            continue
        checkpoints[task] = out / f"{task}.pth"
        if checkpoints[task].exists():
            continue
        started = time.monotonic()
        if not (out / task / TEXTS[task]).exists():
            write_data(out / task, model["checkpoint"]["seed"])
        save(train(out / task, task, model["checkpoint"]["seed"], args.steps), checkpoints[task])
        print(f"trained {checkpoints[task]} in {time.monotonic() - started:.0f} s", flush=True)
    (out / "models.yaml").write_text(yaml.safe_dump(trained_config(full, out, checkpoints), sort_keys=False))
    print(f"wrote {out / 'models.yaml'}: .venv/bin/doit config={out / 'models.yaml'} nightly")


if __name__ == "__main__":
    main()

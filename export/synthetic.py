"""Stage `checkpoint`: synthetic BLIP checkpoints in the original Salesforce key layout.

Real checkpoints cannot be downloaded here, so the embedded demo and the tests generate
them from a fixed seed and then go through the same loading path a real .pth takes.
Same preset, task and seed give the same bytes.
"""
from __future__ import annotations

from buildplan.core import PYTHON, Node
from buildplan.files import CHECKPOINTS_DIR

STAGE_DOCS = {"checkpoint": "synthetic checkpoint"}
MEMORY_MB = {"checkpoint": {"tiny": 800, "base": 6000}}  # peak RSS, measured (README), rounded up

QUEUE_SIZE = {"tiny": 32, "base": 57600}  # retrieval queues, as BLIP's training state


def declare(plan, model, dims: dict, previous=None) -> dict:
    """The first export stage. Returns where the model's checkpoint comes from: {"node": id or None,
    "path": ..., "kind": ...}; a synthetic one is built, a user's is a source file."""
    ck = model.checkpoint
    if ck.kind != "synthetic":
        return {"node": None, "path": ck.path, "kind": ck.kind}
    node = plan.add(Node(
        id=f"checkpoint:{model.name}", stage="checkpoint", model=model.name,
        outputs={"checkpoint": f"{CHECKPOINTS_DIR}/{model.name}.pth"}, action="export.synthetic:run", toolchain=PYTHON,
        params={"preset": ck.preset, "seed": ck.seed, "task": model.task, "image_size": model.image_size},
        labels={},
    ), f"export:{model.name}")
    return {"node": node.id, "path": node.outputs["checkpoint"], "kind": "pth"}


def synthetic_state_dict(task: str, preset: str, seed: int, image_size: int | None = None) -> dict:
    import torch

    from export.loading import hf_to_original, new_model
    from export.presets import resolve_dims

    dims = resolve_dims(preset, task, image_size)
    shapes = {k: v.shape for k, v in new_model(task, dims).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        if key == "text_decoder.cls.predictions.decoder.weight":
            continue  # tied to the word embeddings, as in BLIP
        state[hf_to_original(key)] = _init(key, shapes[key], gen)
    if "text_decoder.cls.predictions.decoder.bias" in state:
        state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    if task == "retrieval":  # momentum encoders and queues, which inference ignores
        for key in list(state):
            for prefix in ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."):
                if key.startswith(prefix):
                    state[prefix[:-1] + "_m." + key[len(prefix):]] = state[key].clone()
        q = QUEUE_SIZE[preset]
        state["image_queue"] = torch.randn(dims["projection"], q, generator=gen)
        state["text_queue"] = torch.randn(dims["projection"], q, generator=gen)
        state["idx_queue"] = torch.full((1, q), -100, dtype=torch.long)
        state["ptr_queue"] = torch.zeros(1, dtype=torch.long)
        state["temp"] = torch.tensor(0.07)
    for key in [k for k in state if k.startswith(("text_encoder.", "text_decoder.bert.")) and k.endswith("word_embeddings.weight")]:
        pos = key.replace("word_embeddings", "position_embeddings")
        state[key.replace("word_embeddings.weight", "position_ids")] = torch.arange(state[pos].shape[0]).unsqueeze(0)
    return state


def _init(key: str, shape, gen):
    """Scaled random weights: activations stay O(1) through the layers, so numerics are meaningful."""
    import torch

    if key.endswith(("LayerNorm.weight", "layer_norm1.weight", "layer_norm2.weight", "post_layernorm.weight",
                     "transform.LayerNorm.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key.endswith("bias") or len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=gen)
    if key.endswith(("class_embedding", "position_embedding")) or "_embeddings." in key:
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(shape, generator=gen) / fan_in ** 0.5


def save(state: dict, path) -> None:
    """torch.save to a buffer: the zip's record names then don't depend on the file name."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"model": state}, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def run(node: Node, ctx) -> dict:
    p = node.params
    state = synthetic_state_dict(p["task"], p["preset"], p["seed"], p["image_size"])
    save(state, ctx.tmp("checkpoint"))
    return {"keys": len(state), "params": int(sum(v.numel() for v in state.values()))}


# The BLIP release's file names of the three BLIP-base checkpoints models.blip-base.yaml uses.
BASE_RELEASE_FILES = {"retrieval": "model_base_retrieval_coco.pth", "captioning": "model_base_capfilt_large.pth",
                      "vqa": "model_base_vqa_capfilt_large.pth"}


def main(argv=None) -> None:
    """Write synthetic stand-ins for the BLIP release's checkpoints (original layout, real sizes) so
    that models.blip-base.yaml builds here; real ones replace them under the same names."""
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m export.synthetic", description=main.__doc__)
    ap.add_argument("folder", nargs="?", default=".", help="where to write them (default: here)")
    ap.add_argument("--preset", default="base", choices=("tiny", "base"))
    args = ap.parse_args(argv)
    for seed, (task, name) in enumerate(BASE_RELEASE_FILES.items()):
        path = Path(args.folder) / name
        if path.exists():
            print(f"{path}: exists, kept")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        save(synthetic_state_dict(task, args.preset, seed), tmp)
        tmp.replace(path)
        print(f"{path}: synthetic {args.preset} {task} checkpoint (seed {seed}), {path.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

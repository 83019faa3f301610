"""Load a BLIP checkpoint (original Salesforce .pth or a transformers folder) into transformers.

Original keys map onto transformers' BLIP classes by renaming the vision keys only; text keys,
vision_proj, text_proj and itm_head keep their names. Momentum copies, queues and the
temperature are training state: ignored, and listed so the user sees what was dropped.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

from buildplan.core import CheckpointError
from export.presets import DEC_ID, PAD_ID, SEP_ID

TASK_CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "captioning": "BlipForConditionalGeneration",
    "vqa": "BlipForQuestionAnswering",
}

# Applied in order, as the original conversion does.
_VISION_RENAMES = (
    ("visual_encoder", "vision_model.encoder"),
    ("blocks", "layers"),
    ("attn", "self_attn"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
    ("encoder.norm", "post_layernorm"),
    ("encoder.patch_embed.proj", "embeddings.patch_embedding"),
    ("encoder.pos_embed", "embeddings.position_embedding"),
    ("encoder.cls_token", "embeddings.class_embedding"),
    ("self_attn.proj", "self_attn.projection"),
)
_IGNORED_PREFIXES = ("visual_encoder_m.", "text_encoder_m.", "text_decoder_m.", "vision_proj_m.", "text_proj_m.")
_IGNORED_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue", "temp")
_IGNORED_SUFFIXES = (".position_ids",)  # buffers older transformers saved; rebuilt at init


def original_to_hf(key: str) -> str:
    if not key.startswith("visual_encoder."):
        return key
    for old, new in _VISION_RENAMES:
        key = key.replace(old, new)
    return key


def hf_to_original(key: str) -> str:
    """Inverse of original_to_hf, used to write synthetic checkpoints in the original layout."""
    if not key.startswith("vision_model."):
        return key
    rest = key[len("vision_model."):]
    for new, old in _VISION_INVERSE:
        rest = rest.replace(new, old)
    return "visual_encoder." + rest


_VISION_INVERSE = (
    ("embeddings.class_embedding", "cls_token"),
    ("embeddings.position_embedding", "pos_embed"),
    ("embeddings.patch_embedding", "patch_embed.proj"),
    ("post_layernorm", "norm"),
    ("encoder.layers", "blocks"),
    ("self_attn.projection", "attn.proj"),
    ("self_attn", "attn"),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
)


def is_training_state(key: str) -> bool:
    return key.startswith(_IGNORED_PREFIXES) or key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES)


def hf_config(dims: dict, image_size: int | None = None):
    from transformers import BlipConfig

    v, t = dims["vision"], dims["text"]
    config = BlipConfig(
        text_config=dict(
            vocab_size=dims["vocab"], hidden_size=t["hidden"], encoder_hidden_size=v["hidden"],
            intermediate_size=t["mlp"], num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
            max_position_embeddings=t["max_positions"], layer_norm_eps=dims["text_eps"],
            bos_token_id=DEC_ID, sep_token_id=SEP_ID, pad_token_id=PAD_ID,
        ),
        vision_config=dict(
            hidden_size=v["hidden"], intermediate_size=v["mlp"], num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"], image_size=image_size or dims["image_size"],
            patch_size=dims["patch"], layer_norm_eps=dims["vision_eps"],
        ),
        image_text_hidden_size=dims["projection"],
    )
    return config


def new_model(task: str, dims: dict, image_size: int | None = None):
    import transformers

    cls = getattr(transformers, TASK_CLASSES[task])
    # Eager attention traces to plain MatMul/Softmax, which every backend compiler accepts.
    model = cls._from_config(hf_config(dims, image_size), attn_implementation="eager")
    return model.eval()


def _unsafe_pickle(path, e: Exception) -> CheckpointError:
    # torch's message opens with advice to retry with weights_only=False: exactly what must not
    # be done with a file like this. Keep only its line naming what the pickle asked for.
    what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
    return CheckpointError(
        f"{path}: refused to load: the file's pickle wants to run code or build objects that are not "
        f"plain tensors{f' ({what})' if what else ''}. Only weight files are accepted; re-save it as "
        f"{{'model': state_dict}} (or as safetensors) from a trusted environment.")


def _pickle_refused_in(folder: str, e: Exception) -> CheckpointError:
    """Which pickled weight file of a transformers folder torch refused (transformers does not say)."""
    for candidate in sorted(Path(folder).glob("*.bin")) + sorted(Path(folder).glob("*.pt*")):
        try:
            torch.load(candidate, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as found:
            return _unsafe_pickle(candidate, found)
        except Exception:  # noqa: BLE001, S112 - damaged in another way: not the file refused here
            continue
    return _unsafe_pickle(folder, e)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth safely: weights_only refuses any pickle that would run code."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe_pickle(path, e) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"The file may be truncated or not a .pth at all; download it again."
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected {{'model': state_dict}} or a state_dict of tensors, "
                              f"found {type(obj).__name__}")
    return obj


def interpolate_pos_embed(pos: torch.Tensor, tokens: int) -> torch.Tensor:
    """Resize a [1, 1+g*g, C] position table to `tokens` entries (bicubic on the patch grid)."""
    if pos.shape[1] == tokens:
        return pos
    cls, grid = pos[:, :1], pos[:, 1:]
    old, new = int(round((grid.shape[1]) ** 0.5)), int(round((tokens - 1) ** 0.5))
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def load_model(checkpoint_path: str, kind: str, task: str, dims: dict):
    """Returns (model, report) where report lists ignored training-state keys and resizes."""
    if kind == "hf_dir":
        import transformers

        cls = getattr(transformers, TASK_CLASSES[task])
        try:
            model = cls.from_pretrained(checkpoint_path, attn_implementation="eager", local_files_only=True)
        except pickle.UnpicklingError as e:
            raise _pickle_refused_in(checkpoint_path, e) from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{checkpoint_path}: not a loadable transformers {cls.__name__} folder: {e}") from None
        return model.eval(), {"ignored": [], "interpolated_pos_embed": None}

    state = read_state_dict(checkpoint_path)
    model = new_model(task, dims)
    ignored = sorted(k for k in state if is_training_state(k))
    mapped = {original_to_hf(k): v for k, v in state.items() if k not in ignored}
    expected = model.state_dict()
    report = {"ignored": ignored, "interpolated_pos_embed": None}
    pos_key = "vision_model.embeddings.position_embedding"
    if pos_key in mapped and mapped[pos_key].shape != expected[pos_key].shape:
        report["interpolated_pos_embed"] = [list(mapped[pos_key].shape), list(expected[pos_key].shape)]
        mapped[pos_key] = interpolate_pos_embed(mapped[pos_key], expected[pos_key].shape[1])
    # Tied LM-head weights exist once in transformers' state_dict view but may be absent on disk.
    tied = {"text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
            "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight"}
    for dst, src in tied.items():
        if dst in expected and dst not in mapped and src in mapped:
            mapped[dst] = mapped[src]
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_path}: does not fit {TASK_CLASSES[task]} ({dims['arch']} architecture): "
            + (f"missing {len(missing)} weights {_preview(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} weights {_preview(unexpected)}" if unexpected else "")
            + ". Check the model's `task` and `arch` in models.yaml."
        )
    bad = [k for k in expected if tuple(mapped[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(
            f"{checkpoint_path}: shape mismatch for {_preview(bad)} (e.g. {bad[0]}: file {list(mapped[bad[0]].shape)}, "
            f"model {list(expected[bad[0]].shape)}). Check `arch` in models.yaml."
        )
    model.load_state_dict(mapped, strict=True)
    return model.eval(), report


def _preview(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}]"



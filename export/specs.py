"""Declarative specs of every split graph: names, shapes, dtypes, dynamic axes, samples.

Like an exporter config: the export code builds the module named by `builder`, the plan
reads shapes from here (no torch import), and samples are made by `export.samples`.
Dimension symbols resolve against `export.presets.resolve_dims`:
  B batch, S image size, N vision tokens, V vision hidden, T text hidden, L text length,
  P projection, C caption length, A answer length.
"""
from __future__ import annotations

from typing import NamedTuple


# NamedTuples, not dataclasses: building 9 dataclasses costs ~9 ms of every no-op `doit`.
class TensorSpec(NamedTuple):
    name: str
    dims: tuple  # ints or dimension symbols
    dtype: str  # numpy dtype name
    layout: str = "ND"  # what ATC's --input_format wants for this input
    sample: str = "normal"  # generator in export.samples


class GraphSpec(NamedTuple):
    name: str
    task: str
    builder: str  # factory in export.graphs
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    batch_axis_name: str  # the name of the dynamic batch dimension in the raw export
    atol: float  # allowed max-abs error of a float output (gates and compile validation)
    description: str
    atc_op_precision: str | None = None  # content of ATC's --op_precision_mode ini
    discrete_outputs: bool = False  # token ids: compared exactly, not by tolerance
    # A one-step decoder that a runtime calls in a loop (export/decoding.py): the dims key of its
    # decoding settings (max_length, min_length, prompt_ids). Its last input is the token ids.
    decoding: str | None = None

    def shapes(self, dims: dict, batch: int) -> dict[str, list[int]]:
        return {t.name: resolve_shape(t.dims, dims, batch) for t in self.inputs}

    def output_shapes(self, dims: dict, batch: int) -> dict[str, list[int]]:
        return {t.name: resolve_shape(t.dims, dims, batch) for t in self.outputs}

    def as_dict(self) -> dict:
        return {**self._asdict(), "inputs": [t._asdict() for t in self.inputs],
                "outputs": [t._asdict() for t in self.outputs]}


def _dim_values(dims: dict) -> dict:
    return {
        "S": dims["image_size"],
        "N": dims["tokens"],
        "V": dims["vision"]["hidden"],
        "T": dims["text"]["hidden"],
        "L": dims["text_len"],
        "P": dims["projection"],
        "C": dims["caption"]["max_length"],
        "A": dims["vqa_answer"]["max_length"],
    }


def resolve_shape(symbols: tuple, dims: dict, batch: int | None) -> list:
    """Concrete shape; with batch=None the batch dim stays the string 'B' (dynamic)."""
    values = _dim_values(dims)
    out = []
    for s in symbols:
        if s == "B":
            out.append("B" if batch is None else batch)
        elif isinstance(s, str):
            out.append(values[s])
        else:
            out.append(s)
    return out


_IMAGE = lambda name: TensorSpec(name, ("B", 3, "S", "S"), "float32", "NCHW", "image")  # noqa: E731
_IDS = lambda name: TensorSpec(name, ("B", "L"), "int64", "ND", "text_ids")  # noqa: E731
_MASK = lambda name: TensorSpec(name, ("B", "L"), "int64", "ND", "text_mask")  # noqa: E731
_DECODER_IDS = lambda length: TensorSpec("input_ids", ("B", length), "int64", "ND", "decoder_ids")  # noqa: E731
_NEXT_IDS = lambda length: (TensorSpec("next_ids", ("B", length), "int64"),)  # noqa: E731

GRAPHS: dict[str, GraphSpec] = {
    g.name: g
    for g in (
        # Ascend seed (retrieval): three graphs, opset 11, outputs under their documented names.
        GraphSpec(
            "BLIP_text", "retrieval", "text_embed",
            (_IDS("text_ids"), _MASK("text_atten_mask")),
            (TensorSpec("text_embed", ("B", "P"), "float32"),),
            opset=11, batch_axis_name="batch", atol=1e-4,
            description="text-only BERT, [CLS] -> text_proj -> L2 normalize",
            atc_op_precision="Gelu=high_performance\n",
        ),
        GraphSpec(
            "BLIP_image", "retrieval", "image_embed",
            (_IMAGE("input_image"),),
            (TensorSpec("image_embed", ("B", "P"), "float32"),),
            opset=11, batch_axis_name="batch", atol=1e-4,
            description="ViT [CLS] -> vision_proj -> L2 normalize",
        ),
        GraphSpec(
            "BLIP_image_feat", "retrieval", "image_feat",
            (_IMAGE("input_image"),),
            (TensorSpec("image_feat", ("B", "N", "V"), "float32"),),
            opset=11, batch_axis_name="batch", atol=1e-3,
            description="ViT last hidden state (all tokens)",
        ),
        GraphSpec(
            "BLIP_itm", "retrieval", "itm_logits",
            (TensorSpec("image_feat", ("B", "N", "V"), "float32"), _IDS("text_ids"), _MASK("text_atten_mask")),
            (TensorSpec("itm_logits", ("B", 2), "float32"),),
            opset=11, batch_axis_name="batch", atol=1e-3,
            description="ITM re-rank head on device: [ENC]-text x image_feat cross-attention -> itm_head",
        ),
        # SOPHGO seed: opset 13, batch axis named batch_size.
        GraphSpec(
            "blip_itm", "retrieval", "itm_score",
            (_IMAGE("pixel_values"), _IDS("input_ids"), _MASK("attention_mask")),
            (TensorSpec("itm_score", ("B",), "float32"),),
            opset=13, batch_axis_name="batch_size", atol=1e-4,
            description="image-text match probability softmax(itm_head)[:, 1]",
        ),
        GraphSpec(
            "blip_cap", "captioning", "caption",
            (_IMAGE("pixel_values"),),
            (TensorSpec("caption_ids", ("B", "C"), "int64"),),
            opset=13, batch_axis_name="batch_size", atol=0.0,
            description="greedy caption with prompt 'a picture of ', unrolled",
            discrete_outputs=True,
        ),
        # Captioning as a step decoder (weights stored once; what fits a device at BLIP-base size):
        # the image encoder once, then one call of the step graph per generated token.
        GraphSpec(
            "blip_cap_venc", "captioning", "vqa_vision",
            (_IMAGE("pixel_values"),),
            (TensorSpec("image_embeds", ("B", "N", "V"), "float32"),),
            opset=13, batch_axis_name="batch_size", atol=1e-3,
            description="captioning ViT encoder (input of blip_cap_step)",
        ),
        GraphSpec(
            "blip_cap_step", "captioning", "caption_step",
            (TensorSpec("image_embeds", ("B", "N", "V"), "float32"), _DECODER_IDS("C")),
            _NEXT_IDS("C"),
            opset=13, batch_axis_name="batch_size", atol=0.0,
            description="one greedy caption step at every position (prompt 'a picture of ', min 5), looped by the runtime",
            discrete_outputs=True, decoding="caption",
        ),
        GraphSpec(
            "blip_vqa_venc", "vqa", "vqa_vision",
            (_IMAGE("pixel_values"),),
            (TensorSpec("image_embeds", ("B", "N", "V"), "float32"),),
            opset=13, batch_axis_name="batch_size", atol=1e-3,
            description="VQA ViT encoder",
        ),
        GraphSpec(
            "blip_vqa_tenc", "vqa", "vqa_question",
            (TensorSpec("image_embeds", ("B", "N", "V"), "float32"), _IDS("input_ids"), _MASK("attention_mask")),
            (TensorSpec("question_states", ("B", "L", "T"), "float32"),),
            opset=13, batch_axis_name="batch_size", atol=1e-3,
            description="question encoder with cross-attention over the image",
        ),
        GraphSpec(
            "blip_vqa_tdec", "vqa", "vqa_answer",
            (TensorSpec("question_states", ("B", "L", "T"), "float32"), _MASK("question_mask")),
            (TensorSpec("answer_ids", ("B", "A"), "int64"),),
            opset=13, batch_axis_name="batch_size", atol=0.0,
            description="greedy answer decoder from [DEC], unrolled; attends to the question's real tokens only",
            discrete_outputs=True,
        ),
        GraphSpec(
            "blip_vqa_tdec_step", "vqa", "vqa_answer_step",
            (TensorSpec("question_states", ("B", "L", "T"), "float32"), _MASK("question_mask"), _DECODER_IDS("A")),
            _NEXT_IDS("A"),
            opset=13, batch_axis_name="batch_size", atol=0.0,
            description="one greedy answer step at every position, looped by the runtime",
            discrete_outputs=True, decoding="vqa_answer",
        ),
    )
}


def graphs_for_task(task: str) -> list[str]:
    return [name for name, g in GRAPHS.items() if g.task == task]


RAW_SAMPLES = ("image", "text_ids", "text_mask", "decoder_ids")  # inputs made from data, not by a graph


def producer_of(tensor: str, task: str) -> str:
    """The graph of `task` whose output `tensor` another graph takes as a feature input."""
    found = [g.name for g in GRAPHS.values() if g.task == task and any(o.name == tensor for o in g.outputs)]
    if len(found) != 1:
        raise KeyError(f"{len(found)} graphs of task {task} output {tensor}: {found}")
    return found[0]


def producers(graph: str) -> list[str]:
    """The graphs that compute `graph`'s feature inputs from data, recursively, producers first."""
    spec, found = GRAPHS[graph], []
    for t in spec.inputs:
        if t.sample not in RAW_SAMPLES:
            source = producer_of(t.name, spec.task)
            found += [name for name in [*producers(source), source] if name not in found]
    return found


# The nets a task's runtime needs, in the order it runs them (the last a step decoder): what one
# file per task holds (compile/tpu_mlir.py, task_bundle).
TASK_BUNDLES = {"captioning": ("blip_cap_venc", "blip_cap_step"),
                "vqa": ("blip_vqa_venc", "blip_vqa_tenc", "blip_vqa_tdec_step")}


def task_chain(task: str) -> list[dict]:
    """TASK_BUNDLES[task] as plain data for export.decoding.task_loop."""
    return [{"name": g, "inputs": [[t.name, t.sample] for t in GRAPHS[g].inputs],
             "outputs": [t.name for t in GRAPHS[g].outputs]} for g in TASK_BUNDLES[task]]
